"""The chat format an Ollama TEMPLATE is generated from (`chat_format`): a loraft template's own parts, or for a
model's own chat template the one of a few formats (ChatML, Llama-3, Mistral) that its Jinja is proven to render on
probe conversations. `ChatFormat.render` writes a conversation as the TEMPLATE generated from the format does
(loraft.export.ollama), so the proof compares the model's Jinja with what Ollama will render.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from loraft.errors import TemplateError
from loraft.templates import RAW_TEXT, TEMPLATES, Template, Turn

KNOWN_FAMILIES = "ChatML, Llama-3, Mistral"


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as the Go template is generated from it (and as `render` writes it, for comparisons).

    Attributes:
        name: for notes ("loraft's chatml template", "the Llama-3 format", ...).
        system, user: how those messages are written.
        assistant: how an assistant message is written: prefix = its header, suffix = its end of turn and after.
        generation_prompt: written after a final non-assistant message (the Jinja's add_generation_prompt).
        system_in: "turn" (a system message is its own turn), "first_user" / "last_user" (Mistral: joined into
            that user turn as system + system_separator + content) or "refused" (the model's template raises).
        default_system: the system line written when the first message is not a system message (the Modelfile's
            SYSTEM, which Ollama puts first under that same condition).
    """

    name: str
    system: Turn
    user: Turn
    assistant: Turn
    generation_prompt: str
    system_in: str = "turn"
    system_separator: str = ""
    default_system: Optional[str] = None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> Optional[str]:
        """The text Ollama renders with this format's Go template (None where the model's template refuses the
        conversation: a system message when system_in is "refused")."""
        messages = list(messages)
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.default_system})
        if self.system_in == "refused" and any(m["role"] == "system" for m in messages):
            return None
        system = None
        text = ""
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system" and self.system_in == "turn":
                text += _apply(self.system, content)
            elif role == "system":
                system = content
            elif role == "user":
                if system is not None and (self.system_in == "first_user" or index == len(messages) - 1):
                    content = system + self.system_separator + content
                    system = None if self.system_in == "first_user" else system
                text += _apply(self.user, content)
            elif role == "assistant":
                text += _apply(self.assistant, content)
        if add_generation_prompt:
            text += self.generation_prompt
        return text


def _apply(turn: Turn, content: str) -> str:
    if turn.strip == "joined":
        return (turn.prefix + content).strip() + turn.suffix
    return turn.prefix + (content.strip() if turn.strip == "content" else content) + turn.suffix


def _families(eos_token: str) -> list[ChatFormat]:
    """The model-template formats loraft maps, as their reference templates render them (BOS left out: llama.cpp
    adds it when it tokenizes, as loraft's encoder does when the template does not write it)."""
    chatml = Turn("<|im_start|>assistant\n", "<|im_end|>\n")

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    return [
        # Qwen2 / Qwen2.5 and other ChatML templates (a default system prompt is found by the probes).
        ChatFormat("the ChatML format", Turn("<|im_start|>system\n", "<|im_end|>\n"),
                   Turn("<|im_start|>user\n", "<|im_end|>\n"), chatml, chatml.prefix),
        # Meta-Llama-3-Instruct: every content `| trim`med, <|eot_id|> ends every turn.
        ChatFormat("the Llama-3 format", Turn(header("system"), "<|eot_id|>", "content"),
                   Turn(header("user"), "<|eot_id|>", "content"), Turn(header("assistant"), "<|eot_id|>", "content"),
                   header("assistant")),
        # Mistral-7B-Instruct v0.1/v0.2 and Mixtral-8x7B-Instruct as first released: no system message.
        ChatFormat("the Mistral [INST] format (v0.1)", Turn(), Turn("[INST] ", " [/INST]"), Turn("", eos_token), "",
                   system_in="refused"),
        # Their later templates: the system prompt opens the first user turn.
        ChatFormat("the Mistral [INST] format (v0.2)", Turn(), Turn(" [INST] ", " [/INST]"), Turn(" ", eos_token),
                   "", system_in="first_user", system_separator="\n\n"),
        # Mistral-7B-Instruct-v0.3: the system prompt opens the last user turn, when the conversation ends there.
        ChatFormat("the Mistral [INST] format (v0.3)", Turn(), Turn("[INST] ", "[/INST]"),
                   Turn(" ", eos_token, "content"), "", system_in="last_user", system_separator="\n\n"),
    ]


# Probe conversations a model's template must render exactly as a format does: one turn, several, whitespace
# around contents (pins which are stripped), Chinese, a system prompt with conversations ending either way.
_PROBES: list[tuple[list[dict], bool]] = [
    ([{"role": "user", "content": "Hi there"}], True),
    ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}], False),
    ([{"role": "user", "content": " padded question \n"}, {"role": "assistant", "content": "  padded answer \n"},
      {"role": "user", "content": "第二个问题"}], True),
    ([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
      {"role": "user", "content": "three"}, {"role": "assistant", "content": "四"}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4"}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
      {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}], True),
]
_MARK = "\u2063loraft-system\u2063"  # stands in for a default system prompt; no template produces it


def _own_rendering(template: Template, messages: list[dict], eos_token: str, add_generation_prompt: bool
                   ) -> Optional[str]:
    """The model template's rendering without its leading BOS (None where the template refuses it)."""
    try:
        text = template.render_text(messages, eos_token, add_generation_prompt)
    except TemplateError:
        return None
    bos = template.special_tokens.get("bos_token")
    # only a BOS the template writes as the token (SmolLM2's BOS is <|im_start|>, which its ChatML writes as text)
    writes_bos = isinstance(bos, str) and bos and "bos_token" in template.jinja and text.startswith(bos)
    return text[len(bos):] if writes_bos else text


def _fit(template: Template, family: ChatFormat, eos_token: str) -> Optional[ChatFormat]:
    """`family` (with the model's default system prompt, if it writes one) when the template renders every probe
    exactly as it does, else None."""
    question = [{"role": "user", "content": "Hi there"}]
    own = _own_rendering(template, question, eos_token, True)
    if own is None:
        return None
    if own != family.render(question, True):
        marked = family.render([{"role": "system", "content": _MARK}, *question], True)
        if marked is None or _MARK not in marked:
            return None
        before, after = marked.split(_MARK, 1)
        if not (own.startswith(before) and own.endswith(after) and len(own) > len(before) + len(after)):
            return None
        family = replace(family, default_system=own[len(before):len(own) - len(after)])
    for messages, add_generation_prompt in _PROBES:
        if _own_rendering(template, messages, eos_token, add_generation_prompt) != family.render(
                messages, add_generation_prompt):
            return None
    return family


def chat_format(template: Template, eos_token: str) -> Optional[ChatFormat]:
    """The format the Go template is generated from: a loraft template's own parts (also where a run's tokenizer
    carries a loraft template's Jinja as its chat template), the family a model's own template is proven to render
    as, or None."""
    own = template if template.parts is not None else next(
        (t for t in (*TEMPLATES.values(), RAW_TEXT) if t.jinja == template.jinja), None)
    if own is not None and own.parts is not None:
        parts = own.parts
        end = eos_token if parts.end is None else parts.end
        return ChatFormat(f"loraft's {own.name} template", parts.system, parts.user,
                          Turn(parts.header, end + parts.after), parts.header, default_system=parts.default_system)
    for family in _families(eos_token):
        found = _fit(template, family, eos_token)
        if found is not None:
            return found
    return None
