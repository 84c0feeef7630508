"""Prompt templates: each one is a Jinja chat template, rendered by the same code for training and for chat.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`. A template renders it into
segments in order; a segment is either prompt (label -100) or response (supervised). The text comes from
transformers' own chat-template renderer (`render_jinja_template`, what `apply_chat_template` runs), so what a
run's tokenizer renders as its `chat_template` is what training saw, by construction. Which text is supervised:
- loraft's templates mark each assistant turn's content and its end-of-turn text with `{% generation %}`;
- a model's own template (`data.template: model`) is split by per-turn prefix differences: the prompt of turn i
  is the conversation before it rendered with the generation prompt; what the full render adds after that is the
  assistant content plus the end-of-turn token (supervised) and any trailing text (prompt). A template whose
  renders are not prefixes of each other (one that rewrites earlier turns), or that drops the content, is refused
  with the record and the reason. Where a model template has `{% generation %}` blocks those are used instead.

Each segment is tokenized on its own (loraft.data), exactly as the reference recipe tokenizes its prompt and
its response separately, so the ids of a single-turn alpaca record equal the reference `preprocess_function`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from loraft.errors import ConfigError, TemplateError

ROLES = ("system", "user", "assistant")
MODEL = "model"  # data.template: the tokenizer's own chat_template
AUTO = "auto"  # data.template: the tokenizer's own chat_template when it has one, else human_assistant
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Stands in for assistant content when a template's end-of-turn text is derived; no template produces it.
_PROBE = "\u2063loraft-probe\u2063"


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `supervised` pieces are trained on, the rest get label -100."""

    text: str
    supervised: bool


@dataclass(frozen=True)
class Turn:
    """How a loraft template writes one message: `prefix + content + suffix`. `strip` applies Python's
    `str.strip()`: "joined" to `prefix + content` (the reference recipe's `"Human: ..."`.strip()), "content" to the
    content alone (Llama-3's `content | trim`), "" to nothing."""

    prefix: str = ""
    suffix: str = ""
    strip: str = ""

    def jinja(self) -> str:
        """The Jinja expression of this turn (`c` is the message content)."""
        if self.strip == "joined":
            return " + ".join([f"({self.prefix!r} + c).strip()"] + ([repr(self.suffix)] if self.suffix else []))
        content = "c.strip()" if self.strip == "content" else "c"
        return " + ".join(([repr(self.prefix)] if self.prefix else []) + [content]
                          + ([repr(self.suffix)] if self.suffix else []))


@dataclass(frozen=True)
class TemplateParts:
    """What a loraft template is made of, kept as data so other formats (the Ollama Modelfile's Go template, in
    loraft.export.ollama) are generated from the same parts as the Jinja, not written twice.

    Attributes:
        system, user: how those messages are written.
        header: before each assistant content; also the generation prompt.
        end: the end-of-turn after an assistant's content (supervised with it); None: the EOS token.
        after: after the end-of-turn (prompt text).
        default_system: written as a system message when the conversation has none.
    """

    system: Turn
    user: Turn
    header: str
    end: Optional[str]
    after: str
    default_system: Optional[str] = None


@dataclass(frozen=True)
class Template:
    """A prompt format: a Jinja chat template and how its supervised text is found.

    Attributes:
        name: the name configs use (`model` for a tokenizer's own template).
        description: one line for `loraft templates`.
        jinja: the chat template; it sees `messages`, `add_generation_prompt` and the tokenizer's special tokens.
        special_tokens: values for `eos_token`, `bos_token`, ... (a model template's; loraft's need only eos,
            which `render` is given).
        parts: a loraft template's parts (the Jinja is generated from them); None for a model's own template.
    """

    name: str
    description: str
    jinja: str
    special_tokens: dict = field(default_factory=dict, compare=False)
    parts: Optional[TemplateParts] = field(default=None, compare=False)

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks assistant text with `{% generation %}` (else prefix differences are used)."""
        return bool(_GENERATION_TAG.search(self.jinja))

    def _render(self, messages: Sequence[dict], eos_token: str, add_generation_prompt: bool,
                track: bool) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        tokens = {"bos_token": "", "pad_token": "", "unk_token": "", **self.special_tokens, "eos_token": eos_token}
        try:
            return _jinja_render(self.jinja, messages, add_generation_prompt, track, tokens)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.name}: the chat template failed on a conversation ({exc})") from None

    def render_text(self, messages: Sequence[dict], eos_token: str, add_generation_prompt: bool = False) -> str:
        """The whole rendered conversation as one string (what `apply_chat_template` returns)."""
        return self._render(messages, eos_token, add_generation_prompt, track=False)[0]

    def render(self, messages: Sequence[dict], eos_token: str, add_generation_prompt: bool = False) -> list[Segment]:
        """Render a conversation into alternating prompt/response segments.

        Args:
            messages: the conversation; assistant turns become supervised segments.
            eos_token: the tokenizer's EOS string, which templates may end a turn with.
            add_generation_prompt: end with the assistant header, ready for generation.
        """
        if self.marks_generation:
            text, spans = self._render(messages, eos_token, add_generation_prompt, track=True)
        else:
            text, spans = self._prefix_spans(messages, eos_token, add_generation_prompt)
        segments: list[Segment] = []
        position = 0
        for start, end in spans:
            segments += [Segment(text[position:start], False), Segment(text[start:end], True)]
            position = end
        segments.append(Segment(text[position:], False))
        merged: list[Segment] = []
        for segment in segments:
            if not segment.text:
                continue
            if merged and merged[-1].supervised == segment.supervised:
                merged[-1] = Segment(merged[-1].text + segment.text, segment.supervised)
            else:
                merged.append(segment)
        return merged

    def stop_text(self, eos_token: str) -> str:
        """The text that ends an assistant turn (generation stops at its token): derived from the template."""
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
        text, spans = (self._render(messages, eos_token, False, track=True) if self.marks_generation
                       else self._prefix_spans(messages, eos_token, False))
        start, end = spans[-1]
        return text[start:end].split(_PROBE, 1)[1]

    def _end_of_turn(self, after_content: str, eos_token: str) -> str:
        """The end-of-turn text at the start of what a model template writes after an assistant's content: the
        longest special token it starts with (`<|im_end|>`, `<|eot_id|>`, EOS), with any whitespace before it."""
        specials = {eos_token, *self.special_tokens.get("additional_special_tokens", ()),
                    *(v for k, v in self.special_tokens.items() if isinstance(v, str) and k != "bos_token")}
        rest = after_content.lstrip()
        found = [token for token in specials if token and rest.startswith(token)]
        return after_content[:len(after_content) - len(rest)] + max(found, key=len) if found else ""

    def _prefix_spans(self, messages: Sequence[dict], eos_token: str,
                      add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """Supervised spans by per-turn prefix differences (see the module docstring)."""
        full = self.render_text(messages, eos_token, add_generation_prompt)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render_text(messages[:index], eos_token, add_generation_prompt=True) if index else ""
            through = self.render_text(messages[:index + 1], eos_token)
            if not (through.startswith(prompt) and full.startswith(through)):
                raise TemplateError(f"template {self.name}: rendering the conversation one turn longer changes the "
                                f"text before it (at message {index + 1}), so the assistant masks cannot be derived "
                                "from it; choose a loraft template (data.template) or a template with "
                                "{% generation %} blocks")
            added = through[len(prompt):]
            content = message["content"]
            offset = added.find(content) if content else 0
            if content and offset < 0:
                offset = added.find(content.strip())
                content = content.strip()
            if offset < 0:
                raise TemplateError(f"template {self.name}: the assistant content of message {index + 1} does not appear "
                                "in the template's rendering of it, so the assistant masks cannot be derived")
            end_of_turn = self._end_of_turn(added[offset + len(content):], eos_token)
            if not end_of_turn:
                raise TemplateError(f"template {self.name}: no special token (such as EOS) ends the assistant turn of "
                                f"message {index + 1}, so the model would never learn to stop; choose a loraft "
                                "template (data.template) or a template that ends turns with one")
            end = offset + len(content) + len(end_of_turn)
            spans.append((len(prompt) + offset, len(prompt) + end))
        return full, spans


def _renderer_internals():
    """transformers' template compiler and tracked renderer (private: (None, None) where they moved)."""
    from transformers.utils import chat_template_utils as chat

    return getattr(chat, "_compile_jinja_template", None), getattr(chat, "_render_with_assistant_indices", None)


def _jinja_render(jinja: str, messages: Sequence[dict], add_generation_prompt: bool, track: bool,
                  tokens: dict) -> tuple[str, list[tuple[int, int]]]:
    """Render with transformers' chat-template renderer: its compiled, sandboxed template and {% generation %}
    tracking directly (half the time of `render_jinja_template`, which also normalises tools and documents the
    data stage never has: 17 vs 35 us a conversation), or the public function where those internals moved."""
    from transformers.utils import chat_template_utils as chat

    compile_template, render_tracked = _renderer_internals()
    if compile_template is None or render_tracked is None:
        rendered, indices = chat.render_jinja_template(
            [list(messages)], chat_template=jinja, return_assistant_tokens_mask=track,
            add_generation_prompt=add_generation_prompt, **tokens)
        return rendered[0], (indices[0] if track else [])
    compiled = compile_template(jinja)
    if track:
        return render_tracked(compiled, list(messages), None, None, add_generation_prompt, **tokens)
    return compiled.render(messages=list(messages), tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **tokens), []


def _loraft_template(name: str, description: str, parts: TemplateParts) -> Template:
    """A loraft template from its parts; the assistant's content and `end` are one `{% generation %}` block, so they
    are what training supervises."""
    system, user = parts.system.jinja(), parts.user.jinja()
    header, after = repr(parts.header), repr(parts.after)
    end = "eos_token" if parts.end is None else repr(parts.end)
    default = ""
    if parts.default_system is not None:
        default = ("{%- if messages|selectattr('role', 'equalto', 'system')|list|length == 0 -%}"
                   "{%- set c = " + repr(parts.default_system) + " -%}{{ " + system + " }}{%- endif -%}")
    jinja = (
        default
        + "{%- for message in messages -%}{%- set c = message['content'] -%}"
        "{%- if message['role'] == 'system' -%}{{ " + system + " }}"
        "{%- elif message['role'] == 'user' -%}{{ " + user + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ " + header + " }}"
        "{%- generation -%}{{ c + " + end + " }}{%- endgeneration -%}{{ " + after + " }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + header + " }}{%- endif -%}"
    )
    return Template(name=name, description=description, jinja=jinja, parts=parts)


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # The reference strips the joined "Human: instruction\ninput" before adding the assistant header.
    _loraft_template(
        "human_assistant",
        'The reference recipe: "Human: {instruction}\\n{input}".strip() + "\\n\\nAssistant: ", response + EOS.',
        TemplateParts(system=Turn(suffix="\n\n"), user=Turn("Human: ", "\n\n", strip="joined"),
                      header="Assistant: ", end=None, after="")),
    _loraft_template(
        "alpaca",
        "Stanford Alpaca: default system line, '### Instruction:' / '### Response:' blocks, response + EOS.",
        TemplateParts(system=Turn(suffix="\n\n"), user=Turn("### Instruction:\n", "\n\n"), header="### Response:\n",
                      end=None, after="\n\n", default_system=ALPACA_SYSTEM)),
    _loraft_template(
        "chatml",
        "ChatML (Qwen, many others): <|im_start|>role ... <|im_end|>; needs <|im_end|> in the vocabulary.",
        TemplateParts(system=Turn("<|im_start|>system\n", "<|im_end|>\n"),
                      user=Turn("<|im_start|>user\n", "<|im_end|>\n"), header="<|im_start|>assistant\n",
                      end="<|im_end|>", after="\n")),
)}
# No template: the text as it is (the server's /v1/completions continues a prompt), answers end with EOS.
RAW_TEXT = _loraft_template("raw", "No template: the prompt text as it is (for /v1/completions).",
                            TemplateParts(system=Turn(), user=Turn(), header="", end=None, after=""))


def model_template(tokenizer) -> Template:
    """The tokenizer's own chat template as a loraft Template (`data.template: model`)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, dict):  # several named templates: the default one
        jinja = jinja.get("default")
    if not isinstance(jinja, str) or not jinja.strip():
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(f"data.template: model: {name} has no chat_template; name a template "
                          f"({', '.join(sorted(TEMPLATES))})")
    specials = {key: value for key, value in tokenizer.special_tokens_map.items()}
    specials["additional_special_tokens"] = [str(t) for t in getattr(tokenizer, "all_special_tokens", [])] + [
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return Template(name=MODEL, description="The model's own chat template (from its tokenizer).", jinja=jinja,
                    special_tokens=specials)


def get_template(name: str, tokenizer=None) -> Template:
    """Look a template up by name: a loraft template, `model` (the tokenizer's own; needs `tokenizer`), or `auto`
    (the tokenizer's own when it has one, else human_assistant). The error lists the known names."""
    if name == AUTO:
        has_own = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        return model_template(tokenizer) if has_own else TEMPLATES["human_assistant"]
    if name == MODEL:
        if tokenizer is None:
            raise ConfigError("data.template: model needs the model's tokenizer (give --model)")
        return model_template(tokenizer)
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted([*TEMPLATES, AUTO, MODEL]))
        raise ConfigError(f"data.template: unknown template {name!r} (known: {known})") from None
