"""Property tests of the record readers: whatever bytes or JSON a data file holds, reading it either gives
validated conversations or stops with one DataError sentence naming the file, never another exception."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraft.config import DataConfig
from loraft.errors import DataError
from loraft.records import CHAT_ROLES, load_conversations
from loraft.generate import read_prompts

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# records that look like the real formats, with any field possibly wrong, missing or of the wrong type
field_names = st.sampled_from(["instruction", "input", "output", "system", "history", "messages", "conversations",
                               "role", "content", "from", "value", "x"])
message = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                          st.sampled_from(list(CHAT_ROLES) + ["human", "gpt", "", None, 3]) | st.text(max_size=8),
                          max_size=3)
near_records = st.dictionaries(field_names, json_values | st.lists(message, max_size=4), max_size=5)


def _check(path: Path, reader) -> None:
    try:
        result = reader(path)
    except DataError as error:
        message = str(error)
        assert message.startswith(str(path)) and "\n" not in message
        return
    assert isinstance(result, list)


def _conversations(path: Path):
    conversations = load_conversations(str(path), DataConfig(path=str(path)))
    for conversation in conversations:
        assert all(m["role"] in CHAT_ROLES and isinstance(m["content"], str) for m in conversation["messages"])
    return conversations


@SETTINGS
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_arbitrary_bytes_never_escape_as_another_exception(raw, suffix):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(raw)
        _check(path, _conversations)
        if suffix != ".csv":
            _check(path, read_prompts)


@SETTINGS
@given(records=st.lists(near_records | json_values, max_size=5), suffix=st.sampled_from([".jsonl", ".json"]))
def test_arbitrary_json_records_are_read_or_refused_in_one_sentence(records, suffix):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"data{suffix}"
        if suffix == ".json":
            text = json.dumps(records, ensure_ascii=False)
        else:
            text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        path.write_text(text, encoding="utf-8")
        _check(path, _conversations)
        _check(path, read_prompts)
