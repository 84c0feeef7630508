"""Chat and batch generation with a run's saved template.

Prompts are encoded segment by segment exactly as in training (data.encode_segments), so the model
sees at inference the same token boundaries it was trained on. Generation stops at the template's end
token (EOS for human_assistant).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from transformers import TextIteratorStreamer

from loraft.config import GenerationConfig
from loraft.errors import ConfigError, DataError, LoraftError
from loraft.encode import encode_segments
from loraft.templates import Template, get_template


Overrides = Union[GenerationConfig, Mapping[str, Any], None]


class GenerationSettingError(ConfigError):
    """A generation setting out of its range; `field`, `reason` and `value` let the server answer in its terms."""

    def __init__(self, label: str, field: str, reason: str, value: Any):
        super().__init__(f"{label}: {reason} (got {value!r})")
        self.field, self.reason, self.value = field, reason, value


def resolve_generation(saved: GenerationConfig, overrides: Overrides = None,
                       label=lambda field: f"generation.{field}") -> GenerationConfig:
    """The one resolver of generation settings: the run's saved `generation.*`, then only the overrides actually
    given on top (a mapping's None values and a GenerationConfig's unset fields are not given), validated by the
    GenerationConfig schema, which owns the ranges. chat, generate, eval and serve all resolve through here.

    Args:
        label: names a field in the error (`--temperature` for a CLI flag; the server maps fields to its own).
    Raises:
        GenerationSettingError: a value out of range, or a field GenerationConfig does not have.
    """
    from pydantic import ValidationError

    if isinstance(overrides, GenerationConfig):
        given = overrides.model_dump(exclude_unset=True)
    else:
        given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for field in given:
        if field not in GenerationConfig.model_fields:
            raise GenerationSettingError(label(field), field, "not a generation setting", given[field])
    try:
        return GenerationConfig.model_validate({**saved.model_dump(), **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0])
        reason = error["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
        raise GenerationSettingError(label(field), field, "must be " + reason, error.get("input")) from None


def cli_flag(field: str) -> str:
    """The CLI flag of a generation field: max_new_tokens -> --max-new-tokens."""
    return "--" + field.replace("_", "-")


def open_for_generation(run_dir: str | Path, overrides: Overrides = None, access=None):
    """(the opened run, its saved generation settings with CLI overrides on top): the run checked and its settings
    resolved before any model is loaded, the run opened once."""
    from loraft.run_access import RunAccess, open_run

    run = open_run(run_dir, access or RunAccess())
    return run, resolve_generation(run.config.generation, overrides, label=cli_flag)


def encode_prompt(tokenizer, template: Template, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation ending in a user turn, followed by the assistant header."""
    segments = template.render(messages, tokenizer.eos_token, add_generation_prompt=True)
    input_ids, _ = encode_segments(tokenizer, segments)
    return input_ids


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """Token ids that end an answer: the template's end token and the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id}
    stop = tokenizer(template.stop_text(tokenizer.eos_token).strip(), add_special_tokens=False)["input_ids"]
    if len(stop) == 1:
        ids.add(stop[0])
    return sorted(i for i in ids if i is not None)


def generation_kwargs(tokenizer, template: Template, settings: GenerationConfig) -> dict:
    """Arguments for `model.generate`: greedy when temperature is 0, sampling otherwise."""
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": stop_token_ids(tokenizer, template),
        "pad_token_id": tokenizer.pad_token_id,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.min_new_tokens > 0:
        kwargs["min_new_tokens"] = min(settings.min_new_tokens, settings.max_new_tokens)
    if settings.temperature <= 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        if settings.top_k > 0:
            kwargs["top_k"] = settings.top_k
    return kwargs


class Answer(NamedTuple):
    """One generated answer: its text, how many tokens were generated for it (the end token not counted),
    and whether it ended on an end token (else it ran into max_new_tokens)."""

    text: str
    tokens: int
    ended: bool
    ids: tuple = ()  # the generated token ids, its end token included (generate_answers; empty where streamed)


def _count(generated: Sequence[int], stop_ids: Sequence[int]) -> tuple[int, bool]:
    """(tokens before the first end token, whether there was one) for one row of generated ids."""
    for position, token in enumerate(generated):
        if token in stop_ids:
            return position, True
    return len(generated), False


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    template: Template,
    conversations: Sequence[Sequence[dict]],
    settings: GenerationConfig,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Answer]:
    """Answer each conversation; batches are left-padded so every prompt ends where generation starts."""
    from tqdm.auto import tqdm

    encoded = [encode_prompt(tokenizer, template, messages) for messages in conversations]
    # Longest prompts first keeps padding low; answers are put back in input order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[Optional[Answer]] = [None] * len(encoded)
    kwargs = generation_kwargs(tokenizer, template, settings)
    stop_ids = set(kwargs["eos_token_id"])
    device = next(model.parameters()).device
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
        for row, index in enumerate(batch):
            generated = output[row, width:].tolist()
            tokens, ended = _count(generated, stop_ids)
            answers[index] = Answer(tokenizer.decode(generated[:tokens], skip_special_tokens=True), tokens, ended,
                                    tuple(generated[:tokens + ended]))
    return [a for a in answers if a is not None]


def generate_batch(*args, **kwargs) -> list[str]:
    """The answers' texts; the arguments are generate_answers'."""
    return [answer.text for answer in generate_answers(*args, **kwargs)]


class CountingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also counts its answer's generated tokens and notes an end token."""

    def __init__(self, answer: "AnswerStream", stop_ids: set, **kwargs):
        super().__init__(answer.tokenizer, **kwargs)
        self.answer, self.stop_ids = answer, stop_ids

    def put(self, value):
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            for token in value.reshape(-1).tolist():
                if self.answer.ended:
                    break
                if token in self.stop_ids:
                    self.answer.ended = True
                else:
                    self.answer.tokens += 1
        super().put(value)


class AnswerStream:
    """The answer to one conversation, iterated piece by piece as it is generated; once iteration ends,
    `tokens` and `ended` say what `Answer` says."""

    def __init__(self, model, tokenizer, template: Template, messages: Sequence[dict], settings: GenerationConfig,
                 prompt_ids: Optional[Sequence[int]] = None, stopping_criteria=None):
        self.model, self.tokenizer = model, tokenizer
        if prompt_ids is None:
            prompt_ids = encode_prompt(tokenizer, template, messages)
        self.input_ids = torch.tensor([list(prompt_ids)], device=next(model.parameters()).device)
        self.kwargs = generation_kwargs(tokenizer, template, settings)
        if stopping_criteria is not None:
            self.kwargs["stopping_criteria"] = stopping_criteria
        self.tokens, self.ended = 0, False

    def __iter__(self) -> Iterator[str]:
        streamer = CountingStreamer(self, set(self.kwargs["eos_token_id"]), skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                        streamer=streamer, **self.kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if errors:
            raise errors[0]


def stream_answer(model, tokenizer, template: Template, messages: Sequence[dict], settings: GenerationConfig,
                  prompt_ids: Optional[Sequence[int]] = None, stopping_criteria=None) -> AnswerStream:
    """The answer to a conversation, piece by piece as it is generated (an iterable AnswerStream).

    Args:
        prompt_ids: the conversation already encoded (encode_prompt), so a caller that counted its tokens does
            not tokenize it again.
        stopping_criteria: a transformers StoppingCriteriaList ending generation early (stop strings, a client
            that left); the template's end tokens and max_new_tokens end it in any case.
    """
    return AnswerStream(model, tokenizer, template, messages, settings, prompt_ids, stopping_criteria)


def load_run(run, device: Optional[str] = None, dtype: Optional[str] = None, access=None, base_only: bool = False):
    """(model, tokenizer, template, run_info) for a run: a UsableRun its caller opened (loraft.run_access.open_run),
    or a run directory, opened here (then `access` applies: unfinished runs, remote code).

    Args:
        dtype: weights dtype (`generation.dtype`: auto, fp32, bf16, fp16), decided by the plan's rule
            (loraft.precision.choose_inference_dtype); None = fp32, as evaluation wants.
        base_only: the run's base model without the adapter (with the run's tokenizer and template).
    """
    from loraft.model import load_run_model
    from loraft.precision import DTYPES, choose_inference_dtype, machine_capabilities
    from loraft.run_access import RunAccess, UsableRun, open_run

    if not isinstance(run, UsableRun):
        run = open_run(run, access or RunAccess())
    name, _ = choose_inference_dtype(dtype, machine_capabilities(device or run.config.model.device))
    model, tokenizer = load_run_model(run, dtype=DTYPES[name], device=device, adapter=not base_only)
    # the run's tokenizer carries the template it was trained with (a model's own one included)
    template = get_template(run.record.get("template") or run.config.data.template, tokenizer)
    info = {"config": run.config, **run.record, "adapter_dir": None if base_only else str(run.adapter_dir),
            "dtype": name}
    return model, tokenizer, template, info


def chat(run_dir: str | Path, overrides: Overrides = None, system: Optional[str] = None, stdin=None, stdout=None,
         access=None, base_only: bool = False) -> None:
    """Multi-turn chat in the terminal: streams answers, keeps history; /reset clears it, /exit quits.

    Args:
        overrides: generation settings over the run's saved `generation.*` (resolve_generation).
        base_only: chat with the run's base model without the adapter (same template and settings).
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    run, settings = open_for_generation(run_dir, overrides, access)
    model, tokenizer, template, _ = load_run(run, dtype=settings.dtype, base_only=base_only)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    what = "its base model, without the adapter" if base_only else run.adapter_dir.name
    stdout.write(f"loraft chat: {run_dir}, {what} ({template.name} template). /reset clears the history, "
                 "/exit quits.\n")
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            history = history[:1] if system else []
            stdout.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        stdout.write("assistant> ")
        pieces = []
        for piece in stream_answer(model, tokenizer, template, history, settings):
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})


def read_prompts(path: str | Path) -> list[tuple[dict, list[dict]]]:
    """Read a .jsonl/.json file of prompts: each record has `messages`, `instruction` (+`input`) or `prompt`.

    Returns:
        (record, conversation-to-answer) pairs; a trailing assistant message is dropped.
    """
    from loraft.records import chat_turns, read_json_records

    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    numbered = read_json_records(str(path))
    if not numbered:
        raise DataError(str(path), "file holds no prompts")
    prompts = []
    for where, record in numbered:
        if not isinstance(record, dict):
            raise DataError(str(path), "each prompt must be a JSON object", where=where)
        if "messages" in record:
            messages = chat_turns(str(path), where, record)
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise DataError(str(path), "no message to answer", where=where, field="messages")
        elif "instruction" in record:
            given = str(record.get("input") or "")  # joined as training data is (loraft.records)
            messages = [{"role": "user", "content": "\n".join([str(record["instruction"]), given]) if given
                         else str(record["instruction"])}]
        elif "prompt" in record:
            messages = [{"role": "user", "content": str(record["prompt"])}]
        else:
            raise DataError(str(path), "needs one of messages, instruction or prompt", where=where, field="prompt")
        prompts.append((record, messages))
    return prompts


def generate_to_file(
    run_dir: str | Path, input_path: str | Path, output_path: str | Path, overrides: Overrides = None,
    batch_size: int = 8, access=None,
) -> int:
    """Answer every prompt in `input_path`; write each record plus `response` to `output_path` (JSONL)."""
    from loraft.files import write_text_atomically

    output_path = Path(output_path)
    if output_path.exists():
        raise LoraftError(f"{output_path}: exists already; choose another --output")
    prompts = read_prompts(input_path)
    run, settings = open_for_generation(run_dir, overrides, access)
    model, tokenizer, template, _ = load_run(run, dtype=settings.dtype)
    answers = generate_batch(model, tokenizer, template, [m for _, m in prompts], settings, batch_size, progress=True)
    write_text_atomically(output_path, "".join(json.dumps({**record, "response": answer}, ensure_ascii=False) + "\n"
                                               for (record, _), answer in zip(prompts, answers)))
    return len(answers)


def generate_one(run_dir: str | Path, prompt: str, overrides: Overrides = None, access=None) -> Iterable[str]:
    """Stream the answer to a single user prompt, with the run's generation settings under `overrides`."""
    run, settings = open_for_generation(run_dir, overrides, access)
    model, tokenizer, template, _ = load_run(run, dtype=settings.dtype)
    return stream_answer(model, tokenizer, template, [{"role": "user", "content": prompt}], settings)
