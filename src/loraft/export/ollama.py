"""The Ollama Modelfile for a GGUF export, with a TEMPLATE that renders what the run's Jinja template renders.

Ollama does not reliably use the chat template inside a GGUF (it picks the closest of its own built-in templates,
server/model.go detectChatTemplate), so the Modelfile carries a TEMPLATE in Ollama's dialect of Go's text/template,
generated from a template's parts (`loraft.templates.TemplateParts`) or, for a model's own chat template, from the
one of a few formats (ChatML, Llama-3, Mistral) that its Jinja is proven to render on probe conversations
(loraft.export.chat_formats).

What Ollama does with a chat request, and so what the TEMPLATE is written for (github.com/ollama/ollama):
- server/routes.go ChatHandler: `if req.Messages[0].Role != "system" && m.System != ""` the Modelfile's SYSTEM is
  put first in the messages, so a default system line goes in SYSTEM and the TEMPLATE renders system messages;
- template/template.go Execute/collate: the template sees `.Messages` (each with `.Role`, `.Content`), after
  consecutive messages of one role were merged with "\\n\\n", and the template FuncMap adds only `json`,
  `currentDate`, `yesterdayDate` and `toTypeScriptType` to Go's builtins (there is no strip/trim);
- template/template.go Identifiers: a `{{ template "name" }}` call without an argument is refused, so every call
  here passes one.
tests/go/ renders a TEMPLATE the same way, and tests/test_ollama.py proves the renderings equal.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path, PurePath
from typing import Mapping, NamedTuple, Optional, Sequence, Union

from loraft.errors import ConfigError, TemplateError
from loraft.export.chat_formats import KNOWN_FAMILIES, ChatFormat, chat_format
from loraft.templates import Template, Turn

RSTRIP, STRIP = "loraft_rstrip", "loraft_strip"  # the Go templates that do str.strip()


@lru_cache(maxsize=1)
def _whitespace_by_length() -> dict[int, list[str]]:
    """What Python's str.strip() (so Jinja's `.strip()` and `| trim`) removes, grouped by UTF-8 length."""
    groups: dict[int, list[str]] = {}
    for code in range(0x110000):
        if chr(code).isspace():
            groups.setdefault(len(chr(code).encode()), []).append(chr(code))
    return groups


def _go_string(text: str) -> str:
    """A Go string literal of `text`: printable ASCII as it is, everything else escaped, so the TEMPLATE has no
    `\"\"\"` (which would end the Modelfile value) and no character the Modelfile parser drops."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _literal(text: str) -> str:
    return "{{ " + _go_string(text) + " }}" if text else ""


def _strip_definitions(names: set[str]) -> str:
    """Go templates that write their argument without the whitespace str.strip() removes: rstrip cuts the last
    character while it is whitespace, strip the first, then hands over to rstrip. Go's templates have no string
    functions and Ollama adds none, so they recurse on `slice`, which cuts bytes: a UTF-8 suffix (or prefix) that
    encodes a whitespace character can only be that character. `and` stops at the length test (Go >= 1.18). Go's
    template depth limit (100000) bounds the whitespace cut from one content."""
    groups = _whitespace_by_length()

    def definition(name: str, edge: str, rest: str, otherwise: str) -> str:
        text = '{{- define "' + name + '" }}\n'
        for index, length in enumerate(sorted(groups)):
            chars = " ".join(_go_string(c) for c in groups[length])
            text += ("{{- " + ("if" if index == 0 else "else if") + f" and (ge (len .) {length}) (eq "
                     + edge.format(n=length) + " " + chars + ") }}"
                     + '{{ template "' + name + '" ' + rest.format(n=length) + " }}\n")
        return text + "{{- else }}" + otherwise + "\n{{- end }}\n{{- end }}\n"

    text = ""
    if RSTRIP in names:
        text += definition(RSTRIP, "(slice . (len (slice . {n})))", "(slice . 0 (len (slice . {n})))", "{{ . }}")
    if STRIP in names:
        text += definition(STRIP, "(slice . 0 {n})", "(slice . {n})", '{{ template "' + RSTRIP + '" . }}')
    return text


def _go_turn(turn: Turn, content: str, needs: set[str]) -> str:
    """A turn in Go: `content` is the Go expression of the message content."""
    if turn.strip == "joined":
        name = RSTRIP if turn.prefix and not turn.prefix[0].isspace() else STRIP  # nothing to cut on the left
        needs.add(name)
        argument = f"(print {_go_string(turn.prefix)} {content})" if turn.prefix else content
        return f'{{{{ template "{name}" {argument} }}}}' + _literal(turn.suffix)
    if turn.strip == "content":
        needs.add(STRIP)
        return _literal(turn.prefix) + f'{{{{ template "{STRIP}" {content} }}}}' + _literal(turn.suffix)
    return _literal(turn.prefix) + "{{ " + content + " }}" + _literal(turn.suffix)


def _go_source(chat: ChatFormat) -> str:
    needs: set[str] = set()
    joined = chat.system_in in ("first_user", "last_user")
    if joined and chat.user.strip:
        raise ValueError(f"{chat.name}: a system prompt joined into a stripped user turn is not supported")
    if chat.system_in == "turn":
        system = _go_turn(chat.system, "$m.Content", needs)
    elif joined:
        system = "{{ $system = $m.Content }}{{ $hasSystem = true }}"
    else:
        system = ""  # the model's template takes no system message: Ollama's are left out
    user = _go_turn(chat.user, "$m.Content", needs)
    if joined:
        condition = "$hasSystem" if chat.system_in == "first_user" else "and $last $hasSystem"
        reset = "{{ $hasSystem = false }}" if chat.system_in == "first_user" else ""
        user = (_literal(chat.user.prefix) + f"{{{{ if {condition} }}}}{{{{ $system }}}}"
                + _literal(chat.system_separator) + reset + "{{ end }}"
                + _go_turn(replace(chat.user, prefix=""), "$m.Content", needs))
    assistant = _go_turn(chat.assistant, "$m.Content", needs)
    if STRIP in needs:
        needs.add(RSTRIP)
    return (
        f"{{{{- /* generated by loraft from {chat.name}: renders what its Jinja renders */ -}}}}\n"
        + _strip_definitions(needs)
        + ("{{- $system := \"\" }}\n{{- $hasSystem := false }}\n" if joined else "")
        + "{{- range $i, $m := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        '{{- if eq $m.Role "system" }}' + system + "\n"
        '{{- else if eq $m.Role "user" }}' + user + "\n"
        '{{- else if eq $m.Role "assistant" }}' + assistant + "\n"
        "{{- end }}\n"
        + ('{{- if and $last (ne $m.Role "assistant") }}' + _literal(chat.generation_prompt) + "{{ end }}\n"
           if chat.generation_prompt else "")
        + "{{- end }}"
    )


def go_template(template: Template, eos_token: str) -> Optional[str]:
    """The Ollama TEMPLATE (Go text/template over `.Messages`) for `template`, or None for a model's own template
    that is not a format loraft can prove (ChatML, Llama-3, Mistral).

    It renders exactly what `template.render_text(messages, eos_token, add_generation_prompt=True)` renders for a
    conversation ending in a user (or system) message, and what `add_generation_prompt=False` renders for one ending
    in an assistant message, with the eos token as literal text (llama.cpp parses it as the special token), given
    the Modelfile's SYSTEM (the default system line) as Ollama passes it. human_assistant's
    `("Human: " + content).strip()` and Llama-3's `content | trim` are done by recursive Go templates, so contents
    with surrounding whitespace render the same too. Where the renderings can differ:
    - a BOS the model's Jinja writes first (Llama-3, Mistral) is not in the TEMPLATE: llama.cpp adds it when it
      tokenizes (the GGUF's add_bos_token), as loraft's encoder adds it where a template does not write it;
    - Ollama merges consecutive messages of one role into one with "\\n\\n" before rendering;
    - a default system line (alpaca's, a model's own) is written by Ollama when the first message is not a system
      message, while alpaca's Jinja writes it only when no message is a system message;
    - conversations a model's Jinja refuses (Mistral: roles that do not alternate; v0.1: any system message) are
      rendered anyway, turn by turn (v0.1's TEMPLATE leaves system messages out);
    - more than 100000 whitespace characters around one content exceed Go's template depth (Ollama then errors).
    """
    chat = chat_format(template, eos_token)
    return None if chat is None else _go_source(chat)


class Modelfile(NamedTuple):
    """The Modelfile's text and notes for the export report."""

    text: str
    notes: list[str]


def _unquote(value: str) -> Optional[str]:
    if value.startswith('"""'):
        return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value


def _read_back(written: str) -> Optional[str]:
    """The value Ollama's Modelfile parser (parser/parser.go ParseFile) reads from `written`, the text after
    `COMMAND `, or None where it would stop early or never: it keeps printable characters, tabs and line breaks,
    and the value ends at the first line break where the text so far, trimmed, is complete: bare, "..." or
    \"\"\"...\"\"\" (no escapes of any kind)."""
    buffer = ""
    for index, char in enumerate(written + "\n"):
        if char in "\r\n":
            value = _unquote(buffer.strip())
            if value is not None:
                return value if index == len(written) else None
            buffer += char
        elif char == "\t" or char.isprintable():
            buffer += char
    return None


def _value(text: str, what: str, quotes: str = '"') -> str:
    """`text` as a Modelfile value that reads back as exactly `text`: quoted with `quotes` ("" = bare where it can
    be, else "..."), or a TemplateError saying why the Modelfile format cannot hold it."""
    if not quotes:
        bare = text and text == text.strip() and "\n" not in text and not text.startswith('"')
        quotes = "" if bare else '"'
    written = quotes + text + quotes
    if _read_back(written) == text:
        return written
    hidden = next((c for c in text if not (c in "\t\r\n" or c.isprintable())), None)
    if hidden is not None:
        reason = f"contains the non-printable character U+{ord(hidden):04X}, which Ollama's Modelfile parser drops"
    elif '"""' in text:
        reason = 'contains """, which ends a Modelfile value (the Modelfile format has no escape for it)'
    else:
        reason = "has quotes where a Modelfile value begins or ends, and the Modelfile format has no escape for them"
    raise TemplateError(f"Modelfile {what}: {text!r} {reason}")


def _path(path: Union[str, PurePath]) -> str:
    """A GGUF path for FROM / ADAPTER: relative paths as ./name (Ollama resolves them from the Modelfile's folder)."""
    text = path.as_posix() if isinstance(path, PurePath) else str(path)
    if not (Path(text).is_absolute() or text.startswith(("./", "../"))):
        text = "./" + text
    return text


def modelfile(from_path: Union[str, PurePath], template: Template, eos_token: str,
              adapter_path: Union[str, PurePath, None] = None, stop_strings: Optional[Sequence[str]] = None,
              parameters: Optional[Mapping[str, object]] = None) -> Modelfile:
    """The Ollama Modelfile for a GGUF beside it.

    Args:
        from_path: the GGUF, relative to the Modelfile (`./model-f16.gguf`).
        template: the run's template; its TEMPLATE is `go_template`'s, left out (with a note) where there is none.
        eos_token: the tokenizer's EOS text.
        adapter_path: a LoRA GGUF for ADAPTER, relative likewise.
        stop_strings: the `PARAMETER stop` strings; default: the template's end-of-turn text and EOS.
        parameters: further PARAMETER lines, e.g. {"temperature": 0.7, "num_ctx": 4096} (a list: one line each).

    Returns:
        (text, notes): the Modelfile and sentences for the export report.

    Raises:
        TemplateError: a SYSTEM, stop or parameter value the Modelfile format cannot hold (a \"\"\", a
            non-printable character); ConfigError: a parameter name it cannot hold.
    """
    notes: list[str] = []
    chat = chat_format(template, eos_token)
    lines = ["# Ollama Modelfile written by loraft: `ollama create NAME -f Modelfile` in this folder.",
             "FROM " + _value(_path(from_path), "FROM", quotes="")]
    if adapter_path is not None:
        lines.append("ADAPTER " + _value(_path(adapter_path), "ADAPTER", quotes=""))
    if chat is None:
        notes.append(f"the model's own chat template is not a format loraft can prove equal in Ollama's Go template "
                     f"({KNOWN_FAMILIES}): TEMPLATE left out, so Ollama uses the closest of its built-in templates "
                     "to the GGUF's chat template, or none")
    else:
        lines.append("TEMPLATE " + _value(_go_source(chat), "TEMPLATE", quotes='"""'))
        if chat.default_system is not None:
            lines.append("SYSTEM " + _value(chat.default_system, "SYSTEM", quotes='"""'))
        if template.parts is None:
            notes.append(f"the model's own chat template renders as {chat.name}: TEMPLATE is that format in Go"
                         + (", SYSTEM its default system prompt" if chat.default_system is not None else ""))
        if chat.system_in == "refused":
            notes.append("the model's own chat template takes no system message: the TEMPLATE leaves system "
                         "messages out")
    if stop_strings is None:
        try:
            end_of_turn = template.stop_text(eos_token).strip()
        except TemplateError as exc:
            end_of_turn = ""
            notes.append(f"no end-of-turn text found in the template ({exc}): stop is EOS only")
        stop_strings = [end_of_turn, eos_token]
    parameters = dict(parameters or {})
    extra_stops = parameters.pop("stop", [])
    stops = list(dict.fromkeys(s for s in [*stop_strings, *([extra_stops] if isinstance(extra_stops, str)
                                                                else extra_stops)] if s))
    lines += [f"PARAMETER stop {_value(stop, 'PARAMETER stop')}" for stop in stops]
    for name, value in parameters.items():
        if not (name and all(c.isascii() and (c.isalnum() or c == "_") for c in name)):
            raise ConfigError(f"Modelfile PARAMETER: {name!r} is not a parameter name (letters, digits, _)")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            quotes = '"' if isinstance(item, str) else ""
            lines.append(f"PARAMETER {name} {_value(text, f'PARAMETER {name}', quotes=quotes)}")
    return Modelfile("\n".join(lines) + "\n", notes)
