"""Reading training data: a source's records (read by loraft.sources from a save_to_disk directory, a .json, .jsonl,
.csv or .parquet file, or a hub dataset id) in their record format, validated into conversations.

Record formats (auto-detected from the first record):
alpaca (instruction / input / output, optional system and history), messages ({role, content} list) and
sharegpt ({from, value} list under `conversations`). Every record becomes a Conversation:
`{"messages": [{"role", "content"}, ...], "source": "<file>, line 3"}` ("record 3" where there are no lines).

Preference data (`load_preferences`) is a prompt in one of those three styles plus completions:
preference_* records hold `chosen` and `rejected` (DPO pairs: LLaMA-Factory's alpaca and sharegpt ranking formats,
TRL's conversational and standard preference formats), unpaired_* records a `completion` and a boolean `label`
(KTO: TRL's unpaired preference format). A completion is a string, an assistant message ({role, content} or
{from: gpt, value}), or a list holding one (TRL's). Every record becomes a Preference:
`{"prompt": [messages ending with a user turn], "chosen": str, "rejected": str, "source", "prompt_field"}`, or
with `"completion": str, "label": bool` in place of chosen and rejected.
Every error names the file, the line or record, and the field.
"""

from __future__ import annotations

from typing import Any

from loraft.config import DataConfig
from loraft.errors import DataError
from loraft.sources import (FILE_KINDS, Records, describe_value, field_names, load_hub_dataset, read_json_records,
                            read_records)

__all__ = [
    "ASSISTANT_TAGS", "CHAT_ROLES", "PAIRED_FIELDS", "PREFERENCE_FORMATS", "PROMPT_FIELD", "PROMPT_STYLES",
    "SHAREGPT_FIELD", "SHAREGPT_ROLES", "UNPAIRED_FIELDS", "Conversation", "Preference", "chat_turns",
    "load_conversations", "load_preferences", "prompt_messages", "read_preferences_with_report", "read_with_report", "source_format",
    # read by loraft.sources, imported from here too
    "FILE_KINDS", "Records", "load_hub_dataset", "read_json_records",
]

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_FIELD = "conversations"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

# Preference data: the field holding the prompt in the messages style (TRL's), and the completions' fields.
PROMPT_FIELD = "prompt"
PAIRED_FIELDS = ("chosen", "rejected")
UNPAIRED_FIELDS = ("completion", "label")
PROMPT_STYLES = ("alpaca", "messages", "sharegpt")
PREFERENCE_FORMATS = tuple(f"{kind}_{style}" for kind in ("preference", "unpaired") for style in PROMPT_STYLES)
ASSISTANT_TAGS = ({"role": "assistant"}, {"from": "gpt"})  # how a completion message may say who speaks

Conversation = dict  # {"messages": [{"role": str, "content": str}, ...], "source": "<file>, line 3"}
Preference = dict  # {"prompt": [...], "chosen": str, "rejected": str} or {... "completion": str, "label": bool}


# ------------------------------------------------------------------------------- records -> messages


def _detect_format(path: str, data: DataConfig, where: str, record: Any) -> str:
    if data.format != "auto":
        return data.format
    if not isinstance(record, dict):
        raise DataError(path, f"expected an object with fields, got {describe_value(record)}", where=where)
    kind = ("preference" if any(field in record for field in PAIRED_FIELDS)
            else "unpaired" if all(field in record for field in UNPAIRED_FIELDS) else None)
    for style in PROMPT_STYLES:
        if _prompt_field(style, data, preference=kind is not None) in record:
            return style if kind is None else f"{kind}_{style}"
    if kind is not None:
        fields = ", ".join(_prompt_field(style, data, preference=True) for style in PROMPT_STYLES)
        message = (f"a {kind} record, but no prompt field ({fields}) among its fields ({field_names(record)}); "
                   "set data.instruction_field or give the prompt")
        raise DataError(path, message, where=where)
    raise DataError(
        path,
        f"cannot tell the record format from its fields ({field_names(record)}); expected alpaca "
        f"({data.instruction_field}/{data.output_field}), messages ({data.messages_field}) or sharegpt "
        f"({SHAREGPT_FIELD}); set data.format and the data.*_field names",
        where=where,
    )


def _prompt_field(style: str, data: DataConfig, preference: bool) -> str:
    """The field holding a record's prompt (SFT: its conversation) in a prompt style."""
    if style == "alpaca":
        return data.instruction_field
    if style == "sharegpt":
        return SHAREGPT_FIELD
    return PROMPT_FIELD if preference else data.messages_field


def _string(path: str, where: str, record: dict, field: str, required: bool = True) -> str:
    """A text field. Optional ones read absent or null as "" (Arrow fills missing cells with null)."""
    value = record.get(field)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    if field not in record:
        raise DataError(path, f"missing (the record has {field_names(record)})", where=where, field=field)
    raise DataError(path, f"expected a string, got {describe_value(value)}", where=where, field=field)


def _alpaca_messages(path: str, where: str, record: dict, data: DataConfig) -> list[dict]:
    _string(path, where, record, data.instruction_field)  # named first when both it and the output are missing
    output = _string(path, where, record, data.output_field)
    return _alpaca_prompt(path, where, record, data) + [{"role": "assistant", "content": output}]


def _alpaca_prompt(path: str, where: str, record: dict, data: DataConfig) -> list[dict]:
    """An alpaca record's messages up to its last user turn (system, history, instruction + input)."""
    instruction = _string(path, where, record, data.instruction_field)
    prompt_input = _string(path, where, record, data.input_field, required=False)
    system = _string(path, where, record, data.system_field, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = record.get(data.history_field)
    if history is not None and not isinstance(history, (list, tuple)):
        message = f"expected a list of [user, assistant] pairs, got {describe_value(history)}"
        raise DataError(path, message, where=where, field=data.history_field)
    for index, pair in enumerate(history or [], 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            message = f"item {index}: expected a [user, assistant] pair of strings"
            raise DataError(path, message, where=where, field=data.history_field)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # The reference's "\n".join([instruction, input]), without the dangling "\n" of an empty input (which its
    # .strip() removes; a model's own template would keep it)
    messages.append({"role": "user", "content": "\n".join([instruction, prompt_input]) if prompt_input else instruction})
    return messages


def _chat_messages(path: str, where: str, record: dict, field: str, sharegpt: bool) -> list[dict]:
    messages = chat_turns(path, where, record, field, sharegpt)
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(path, "no assistant message, so nothing to train on", where=where, field=field)
    return messages


def chat_turns(path: str, where: str, record: dict, field: str = "messages", sharegpt: bool = False) -> list[dict]:
    """The validated `[{role, content}]` turns of a messages (or ShareGPT) record; DataError names the turn."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else CHAT_ROLES
    if field not in record:
        raise DataError(path, f"missing (the record has {field_names(record)})", where=where, field=field)
    turns = record[field]
    if not isinstance(turns, (list, tuple)):
        raise DataError(path, f"expected a list of messages, got {describe_value(turns)}", where=where, field=field)
    messages = []
    for index, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            problem = f": expected an object, got {describe_value(turn)}"
        elif turn.get(role_key) not in roles:
            known = ", ".join(list(roles)[:-1]) + f" or {list(roles)[-1]}"
            problem = f" has unknown {role_key!r} {turn.get(role_key)!r} (expected {known})"
        elif not isinstance(turn.get(content_key), str):
            problem = f" {content_key!r}: expected a string, got {describe_value(turn.get(content_key))}"
        else:
            messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
            continue
        raise DataError(path, f"message {index}{problem}", where=where, field=field)
    return messages


def load_conversations(path: str, data: DataConfig) -> list[Conversation]:
    """Read and validate a data source into conversations, in source order (the first data.limit records).

    Raises:
        DataError: naming the file, the line or record, and the field of the first bad record.
    """
    return _read_conversations(str(path), data)[0]


def source_format(path: str, data: DataConfig) -> str:
    """The record format a source is read in: data.format, or detected from its first record."""
    records = read_records(str(path), data.model_copy(update={"limit": 1}))[2]
    if not records:
        raise DataError(str(path), "holds no records")
    return _detect_format(str(path), data, *records[0])


def _records_in_format(path: str, data: DataConfig) -> tuple[str, str, Records]:
    """The source kind, the record format and the raw records."""
    kind, header, records = read_records(path, data)
    if not records:
        raise DataError(path, "holds no records")
    fmt = _detect_format(path, data, *records[0])
    kind_of_data, _, style = fmt.rpartition("_")
    needed = [_prompt_field(style, data, preference=bool(kind_of_data))]
    needed += {"": [data.output_field] if style == "alpaca" else [], "preference": list(PAIRED_FIELDS),
               "unpaired": list(UNPAIRED_FIELDS)}[kind_of_data]
    for column in needed if header is not None else []:  # CSV: name a missing column once, not on every row
        if column not in header:
            message = f"no such column in the CSV header (columns: {', '.join(header)})"
            raise DataError(path, message, where="line 1", field=column)
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(path, f"expected an object with fields, got {describe_value(record)}", where=where)
    return kind, fmt, records


def _with_system_prompt(messages: list[dict], data: DataConfig) -> list[dict]:
    if data.system_prompt and not any(message["role"] == "system" for message in messages):
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    return messages


def _read_conversations(path: str, data: DataConfig) -> tuple[list[Conversation], str, str]:
    """Conversations plus the source kind and the record format used."""
    kind, fmt, records = _records_in_format(path, data)
    if fmt in PREFERENCE_FORMATS:
        raise DataError(path, f"holds preference records ({fmt}), not instruction data: train on them with "
                        "train.objective=dpo, kto or orpo")
    conversations = []
    for where, record in records:
        if fmt == "alpaca":
            messages = _alpaca_messages(path, where, record, data)
        else:
            field = data.messages_field if fmt == "messages" else SHAREGPT_FIELD
            messages = _chat_messages(path, where, record, field, sharegpt=fmt == "sharegpt")
        conversations.append({"messages": _with_system_prompt(messages, data), "source": f"{path}, {where}"})
    return conversations, kind, fmt


def read_with_report(path: str, data: DataConfig) -> tuple[list[Conversation], dict]:
    """Conversations and the record-level report (what `loraft data check` shows without a tokenizer)."""
    conversations, kind, fmt = _read_conversations(path, data)
    turns = [message for conversation in conversations for message in conversation["messages"]]
    answers = [sum(m["role"] == "assistant" for m in conversation["messages"]) for conversation in conversations]
    return conversations, {
        "path": path, "source_kind": kind, "format": fmt, "records_read": len(conversations),
        "roles": {role: sum(m["role"] == role for m in turns) for role in CHAT_ROLES},
        "empty_outputs": sum(m["role"] == "assistant" and m["content"] == "" for m in turns),
        "multi_turn_records": sum(count > 1 for count in answers),
    }


# ------------------------------------------------------------------------------ preference records


def prompt_messages(path: str, where: str, record: dict, style: str, data: DataConfig,
                    field: str | None = None) -> list[dict]:
    """A prompt's messages, ending with the user turn a completion answers (a preference record's prompt, a GRPO
    prompt record): alpaca instruction/input, a string (the user turn) or messages under `field` (default: the
    style's prompt field), or ShareGPT turns, with data.system_prompt added; DataError names the record and field."""
    field = field or _prompt_field(style, data, preference=True)
    if style == "alpaca":
        messages = _alpaca_prompt(path, where, record, data)
    elif style == "messages" and isinstance(record.get(field), str):
        messages = [{"role": "user", "content": record[field]}]  # TRL's standard format: the text is the user turn
    elif style == "messages" and field in record and not isinstance(record[field], (list, tuple)):
        message = f"expected a string or a list of messages, got {describe_value(record[field])}"
        raise DataError(path, message, where=where, field=field)
    else:
        messages = chat_turns(path, where, record, field, sharegpt=style == "sharegpt")
    if not messages or messages[-1]["role"] != "user":
        problem = f"ends with a message from the {messages[-1]['role']}" if messages else "holds no message"
        raise DataError(path, f"the prompt {problem}; it must end with the user message the completions answer",
                        where=where, field=field)
    return _with_system_prompt(messages, data)


def _completion(path: str, where: str, record: dict, field: str) -> str:
    """A completion's text: a string, the assistant's message, or a list holding it (TRL's conversational)."""
    if field not in record:
        raise DataError(path, f"missing (the record has {field_names(record)})", where=where, field=field)
    value = record[field]
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]
    problem = None
    if isinstance(value, dict):
        role_key, content_key, role = ("role", "content", "assistant") if "role" in value else ("from", "value", "gpt")
        if value.get(role_key) != role:
            problem = f"expected the assistant's message ({role_key} {role!r}), got {role_key} {value.get(role_key)!r}"
        elif not isinstance(value.get(content_key), str):
            problem = f"{content_key!r}: expected a string, got {describe_value(value.get(content_key))}"
        else:
            value = value[content_key]
    elif not isinstance(value, str):
        problem = f"expected a string or the assistant's message (or a list holding it), got {describe_value(value)}"
    if problem is None and not value.strip():
        problem = "empty: there is no answer to prefer or reject"
    if problem:
        raise DataError(path, problem, where=where, field=field)
    return value


def _label(path: str, where: str, record: dict, source_kind: str) -> bool:
    value = record.get("label")
    if "label" not in record:
        raise DataError(path, f"missing (the record has {field_names(record)})", where=where, field="label")
    if source_kind == "csv" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"  # a CSV cell is text
    if not isinstance(value, bool):
        meaning = "true: a desirable completion, false: an undesirable one"
        raise DataError(path, f"expected a boolean ({meaning}), got {describe_value(value)}", where=where,
                        field="label")
    return value


def _read_preferences(path: str, data: DataConfig) -> tuple[list[Preference], str, str]:
    kind, fmt, records = _records_in_format(path, data)
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(path, f"holds {fmt} records, not preference records (chosen and rejected, or completion "
                        "and label)")
    paired, _, style = fmt.partition("_")
    preferences = []
    for where, record in records:
        item = {"prompt": prompt_messages(path, where, record, style, data), "source": f"{path}, {where}",
                "prompt_field": _prompt_field(style, data, preference=True)}
        if paired == "preference":
            chosen, rejected = (_completion(path, where, record, field) for field in PAIRED_FIELDS)
            if chosen == rejected:
                raise DataError(path, "the same text as 'chosen', so the pair prefers neither", where=where,
                                field="rejected")
            item.update(chosen=chosen, rejected=rejected)
        else:
            item.update(completion=_completion(path, where, record, "completion"),
                        label=_label(path, where, record, kind))
        preferences.append(item)
    return preferences, kind, fmt


def load_preferences(path: str, data: DataConfig) -> list[Preference]:
    """Read and validate preference records (preference_* or unpaired_* formats), in source order.

    Raises:
        DataError: naming the file, the line or record, and the field of the first bad record: a missing
            chosen/rejected/label, chosen identical to rejected, an empty completion, a label that is no boolean.
    """
    return read_preferences_with_report(str(path), data)[0]


def read_preferences_with_report(path: str, data: DataConfig) -> tuple[list[Preference], dict]:
    """Preference records and the record-level report (what `loraft data check` shows without a tokenizer)."""
    preferences, kind, fmt = _read_preferences(str(path), data)
    turns = [message for preference in preferences for message in preference["prompt"]]
    report = {
        "path": str(path), "source_kind": kind, "format": fmt, "records_read": len(preferences),
        "prompt_roles": {role: sum(m["role"] == role for m in turns) for role in CHAT_ROLES},
        "multi_turn_records": sum(any(m["role"] == "assistant" for m in p["prompt"]) for p in preferences),
    }
    if fmt.startswith("unpaired_"):
        desirable = sum(preference["label"] for preference in preferences)
        report["labels"] = {"desirable": desirable, "undesirable": len(preferences) - desirable}
    return preferences, report
