"""Prompt templates: render a conversation into prompt/response segments, mask the prompt, export a chat_template.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`. `render` returns
segments in order; a segment is either prompt (label -100) or response (supervised). Each segment is
tokenized on its own, exactly as the reference recipe tokenizes its prompt and its response separately,
so the ids of a single-turn alpaca record equal the reference `preprocess_function`'s.

The same template is written into the saved tokenizer as a Jinja `chat_template`, so `apply_chat_template`
on the run's tokenizer produces the same text as `render` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `supervised` pieces are trained on, the rest get label -100."""

    text: str
    supervised: bool


@dataclass(frozen=True)
class Template:
    """A prompt format made of small string functions, mirrored by a Jinja chat_template.

    Attributes:
        name: template name used in configs.
        description: one line for `loraft templates`.
        system: renders a system message.
        user: renders a user message (prompt side).
        assistant_header: prompt text that opens every assistant turn (and the generation prompt).
        assistant_end: supervised text closing an assistant turn; "{eos}" means the tokenizer's EOS token.
        after_assistant: prompt-side text after an assistant turn (e.g. a newline), not supervised.
        default_system: system prompt used when a conversation has none (None = no system text).
        jinja: the chat_template, using `eos_token` and `add_generation_prompt` like HF templates.
    """

    name: str
    description: str
    system: Callable[[str], str]
    user: Callable[[str], str]
    assistant_header: str
    assistant_end: str
    after_assistant: str
    default_system: Optional[str]
    jinja: str

    def stop_text(self, eos_token: str) -> str:
        """The text that ends an assistant turn; generation stops at its token."""
        return self.assistant_end.replace("{eos}", eos_token)

    def render(self, messages: Sequence[dict], eos_token: str, add_generation_prompt: bool = False) -> list[Segment]:
        """Render a conversation into alternating prompt/response segments (adjacent prompt text merged).

        Args:
            messages: the conversation; assistant turns become supervised segments.
            eos_token: the tokenizer's EOS string, appended where the template ends a turn with EOS.
            add_generation_prompt: end with the assistant header, ready for generation.
        """
        segments: list[Segment] = []

        def add(text: str, supervised: bool) -> None:
            if not text:
                return
            if segments and segments[-1].supervised == supervised:
                segments[-1] = Segment(segments[-1].text + text, supervised)
            else:
                segments.append(Segment(text, supervised))

        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            add(self.system(self.default_system), False)
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                add(self.system(content), False)
            elif role == "user":
                add(self.user(content), False)
            elif role == "assistant":
                add(self.assistant_header, False)
                add(content + self.stop_text(eos_token), True)
                add(self.after_assistant, False)
            else:
                raise ValueError(f"unknown role {role!r}")
        if add_generation_prompt:
            add(self.assistant_header, False)
        return segments

    def render_text(self, messages: Sequence[dict], eos_token: str, add_generation_prompt: bool = False) -> str:
        """The whole rendered conversation as one string."""
        return "".join(s.text for s in self.render(messages, eos_token, add_generation_prompt))


def _jinja(system: str, user: str, header: str, end: str, after: str, default_system: Optional[str]) -> str:
    """Build a chat_template from Jinja expressions for each part (`c` is the message content)."""
    default = ""
    if default_system is not None:
        default = (
            "{%- if messages|selectattr('role', 'equalto', 'system')|list|length == 0 -%}"
            "{%- set c = " + repr(default_system) + " -%}{{ " + system + " }}{%- endif -%}"
        )
    return (
        default
        + "{%- for message in messages -%}{%- set c = message['content'] -%}"
        "{%- if message['role'] == 'system' -%}{{ " + system + " }}"
        "{%- elif message['role'] == 'user' -%}{{ " + user + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ " + header + " + c + " + end + " + " + after + " }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + header + " }}{%- endif -%}"
    )


HUMAN_ASSISTANT = Template(
    name="human_assistant",
    description='The reference recipe: "Human: {instruction}\\n{input}".strip() + "\\n\\nAssistant: ", response + EOS.',
    system=lambda c: c + "\n\n",
    # The reference strips the joined "Human: instruction\ninput" before adding the assistant header.
    user=lambda c: ("Human: " + c).strip() + "\n\n",
    assistant_header="Assistant: ",
    assistant_end="{eos}",
    after_assistant="",
    default_system=None,
    jinja=_jinja("c + '\\n\\n'", "('Human: ' + c).strip() + '\\n\\n'", "'Assistant: '", "eos_token", "''", None),
)

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

ALPACA = Template(
    name="alpaca",
    description="Stanford Alpaca: default system line, '### Instruction:' / '### Response:' blocks, response + EOS.",
    system=lambda c: c + "\n\n",
    user=lambda c: "### Instruction:\n" + c + "\n\n",
    assistant_header="### Response:\n",
    assistant_end="{eos}",
    after_assistant="\n\n",
    default_system=ALPACA_SYSTEM,
    jinja=_jinja(
        "c + '\\n\\n'", "'### Instruction:\\n' + c + '\\n\\n'", "'### Response:\\n'", "eos_token", "'\\n\\n'",
        ALPACA_SYSTEM,
    ),
)

CHATML = Template(
    name="chatml",
    description="ChatML (Qwen, many others): <|im_start|>role ... <|im_end|>; needs <|im_end|> in the vocabulary.",
    system=lambda c: "<|im_start|>system\n" + c + "<|im_end|>\n",
    user=lambda c: "<|im_start|>user\n" + c + "<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    after_assistant="\n",
    default_system=None,
    jinja=_jinja(
        "'<|im_start|>system\\n' + c + '<|im_end|>\\n'",
        "'<|im_start|>user\\n' + c + '<|im_end|>\\n'",
        "'<|im_start|>assistant\\n'",
        "'<|im_end|>'",
        "'\\n'",
        None,
    ),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (HUMAN_ASSISTANT, ALPACA, CHATML)}


def get_template(name: str) -> Template:
    """Look a template up by name; the error lists the known names."""
    try:
        return TEMPLATES[name]
    except KeyError:
        from loraft.errors import ConfigError

        known = ", ".join(sorted(TEMPLATES))
        raise ConfigError(f"data.template: unknown template {name!r} (known: {known})") from None


def encode_segments(tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """Tokenize segments one by one (as the reference does) into input ids and labels.

    The first segment gets the tokenizer's special tokens (BOS where the model uses one); later segments
    get none, so a Llama-style BOS is not repeated mid-sequence. BLOOM adds no special tokens, so this
    equals the reference's `tokenizer(prompt)` + `tokenizer(response)` exactly.

    Returns:
        (input_ids, labels) with labels -100 on prompt tokens.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for index, segment in enumerate(segments):
        ids = tokenizer(segment.text, add_special_tokens=index == 0)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if segment.supervised else [-100] * len(ids))
    return input_ids, labels
