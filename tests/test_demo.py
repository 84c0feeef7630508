"""The offline demo's pieces: generated data, held-out split, checkable answers, tokenizer, config, the shipped base and
the base cache.

The full pretraining and fine-tune are too slow for tests; the base build is exercised with a 2-step recipe.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from loraft import demo

REPO = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic_for_a_seed(tmp_path):
    first = demo.write_demo_data(tmp_path / "a", seed=0)
    second = demo.write_demo_data(tmp_path / "b", seed=0)
    other = demo.write_demo_data(tmp_path / "c", seed=1)
    for path_a, path_b, path_c in zip(first, second, other):
        assert path_a.read_bytes() == path_b.read_bytes()
        assert path_a.read_bytes() != path_c.read_bytes()
    documents_a, documents_b = demo.pretraining_documents(3), demo.pretraining_documents(3)
    assert [next(documents_a) for _ in range(50)] == [next(documents_b) for _ in range(50)]


def test_every_family_is_in_both_splits_as_alpaca_records(tmp_path):
    train_path, heldout_path = demo.write_demo_data(tmp_path, seed=0)
    train, heldout = demo.read_jsonl(train_path), demo.read_jsonl(heldout_path)
    for records in (train, heldout):
        assert {r["task"] for r in records} == set(demo.TASKS)
        assert all(set(r) == {"instruction", "input", "output", "task"} for r in records)
        assert all(r["instruction"] in demo.TASKS[r["task"]].instructions for r in records)


def test_heldout_inputs_never_appear_in_training_or_pretraining():
    train, heldout = demo.make_records(seed=0)
    heldout_inputs = {r["input"] for r in heldout}
    assert heldout_inputs.isdisjoint(r["input"] for r in train)
    assert all(demo.is_heldout_input(text) for text in heldout_inputs)
    assert not any(demo.is_heldout_input(r["input"]) for r in train)
    examples = demo.pretraining_examples(0)
    pretraining_inputs = {next(examples)[1] for _ in range(5000)}
    assert pretraining_inputs.isdisjoint(heldout_inputs)
    assert not any(demo.is_heldout_input(text) for text in pretraining_inputs)
    # Held-out items are distinct within a task, so the score is not one answer counted many times.
    assert len({(r["task"], r["input"]) for r in heldout}) == len(heldout)


def _rederive(task: str, text: str) -> str:
    """Each family's answer, computed independently of demo.py's answer functions."""
    if task == "upper":
        return "".join(chr(ord(c) - 32) for c in text)
    if task == "numerals":
        return "".join("零一二三四五六七八九"[ord(c) - ord("0")] for c in text)
    if task == "antonym":
        pairs = dict(demo.ANTONYM_PAIRS)
        return "".join(pairs.get(c) or next(a for a, b in pairs.items() if b == c) for c in text)
    if task == "spell":
        words = "zero one two three four five six seven eight nine".split()
        return " ".join(words[int(c)] for c in text)
    if task == "translate":
        return " ".join(demo.ENGLISH_WORDS[c] for c in text)
    raise AssertionError(task)


def test_answers_are_checkable_from_the_input():
    train, heldout = demo.make_records(seed=0)
    for record in train + heldout:
        assert record["output"] == _rederive(record["task"], record["input"]), record
    assert demo.TASKS["upper"].answer("abc") == "ABC"
    assert demo.TASKS["numerals"].answer("305") == "三零五"
    assert demo.TASKS["antonym"].answer("大高") == "小低"
    assert demo.TASKS["spell"].answer("305") == "three zero five"
    assert demo.TASKS["translate"].answer("猫红") == "cat red"
    # Antonyms are a one-to-one mapping: applying it twice gives the input back.
    assert all(demo.ANTONYMS[demo.ANTONYMS[c]] == c for c in demo.ANTONYMS)


def test_pretraining_corpus_never_shows_the_chat_format_or_the_instructions():
    documents = demo.pretraining_documents(0)
    corpus = "\n".join(next(documents) for _ in range(300))
    assert "Human" not in corpus and "Assistant" not in corpus
    for family in demo.TASK_FAMILIES:
        assert all(instruction not in corpus for instruction in family.instructions)


# BLOOM's normalizer and pre-tokenizer exactly as bigscience/bloom's tokenizer.json has them (llama.cpp's "bloom").
BLOOM_NORMALIZER = None
BLOOM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": " ?[^(\\s|[.,!?…。，、।۔،])]+"}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
ROUND_TRIP_TEXTS = (
    "Human: 把下面的阿拉伯数字逐位写成中文数字。\n305\n\nAssistant: 三零五",
    "春眠不觉晓，处处闻啼鸟。“你好！”他说：（《书》【注】）……——～",
    "The quick brown fox jumps over the lazy dog. ABC xyz 0123456789",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x != y: print([1, 2, {'k': 3}])\r\n",
    "  two leading,   three inner,\t\ttabs and trailing   \n\n\n",
    "rare and outside: 丂 𠀋 😀 é ß ½ ×÷ ©",
)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return demo.build_demo_tokenizer()


def _saved_tokenizer_json(tokenizer, directory: Path) -> dict:
    tokenizer.save_pretrained(directory)
    return json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))


def test_demo_tokenizer_has_blooms_pre_tokenizer_and_normalizer(demo_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    saved = _saved_tokenizer_json(demo_tokenizer, tmp_path)
    assert saved["normalizer"] == BLOOM_NORMALIZER
    assert saved["pre_tokenizer"] == BLOOM_PRE_TOKENIZER
    assert saved["decoder"]["type"] == "ByteLevel"
    assert (saved["post_processor"]["type"], saved["post_processor"]["trim_offsets"]) == ("ByteLevel", False)
    assert [(t["id"], t["content"]) for t in saved["added_tokens"]] == list(enumerate(["<unk>", "<s>", "</s>", "<pad>"]))
    # transformers keeps the pipeline as saved when it loads the tokenizer back
    reloaded = json.loads(AutoTokenizer.from_pretrained(tmp_path).backend_tokenizer.to_str())
    assert (reloaded["normalizer"], reloaded["pre_tokenizer"]) == (BLOOM_NORMALIZER, BLOOM_PRE_TOKENIZER)


def test_every_character_the_demo_uses_is_one_token(demo_tokenizer):
    documents = demo.pretraining_documents(0)
    corpus = "".join(next(documents) for _ in range(300))
    train, heldout = demo.make_records(seed=0)
    records = "".join(r["instruction"] + r["input"] + r["output"] for r in train + heldout)
    characters = set(corpus + records + demo.demo_characters() + "Human: Assistant: \n\t")
    characters |= {chr(code) for code in range(0x20, 0x7F)}
    assert len(demo.common_chinese_characters()) == 3755
    assert {c for c in characters if len(demo_tokenizer(c)["input_ids"]) != 1} == set()
    assert demo_tokenizer.convert_ids_to_tokens(demo_tokenizer("abc305")["input_ids"]) == ["a", "b", "c", "3", "0", "5"]
    assert len(demo_tokenizer("三零五")["input_ids"]) == 3
    assert len(demo_tokenizer("three zero five")["input_ids"]) == len("three zero five")


def test_every_demo_token_is_a_byte_or_lies_inside_one_character(demo_tokenizer):
    """No merge joins two characters (or two ASCII bytes): a token is a special token, one byte, a whole
    non-ASCII character, or the first two bytes of one."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = demo_tokenizer.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert all(vocab[symbol] < 4 + 256 for symbol in alphabet)
    for token, index in vocab.items():
        if index < 4 + 256:
            continue
        text = demo_tokenizer.decode([index])
        # an incomplete UTF-8 sequence (the first two bytes of a character) decodes to one U+FFFD
        assert (len(text) == 1 and ord(text) > 0x7F) or (text == "\ufffd" and len(token) == 2), (token, text)


def test_demo_tokens_do_not_depend_on_where_the_pre_tokenizer_splits(demo_tokenizer):
    """Every merge stays inside one character, so BLOOM's split (or llama.cpp's rendering of its regex) changes
    nothing: the same ids as with no split at all."""
    from tokenizers import Tokenizer, pre_tokenizers

    unsplit = Tokenizer.from_str(demo_tokenizer.backend_tokenizer.to_str())
    unsplit.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ROUND_TRIP_TEXTS:
        assert demo_tokenizer(text)["input_ids"] == unsplit.encode(text).ids, text


def test_demo_tokenizer_round_trips_any_text(demo_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    demo_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ROUND_TRIP_TEXTS:
        ids = demo_tokenizer(text)["input_ids"]
        assert demo_tokenizer.decode(ids) == text
        assert reloaded(text)["input_ids"] == ids
    # Like BLOOM: no BOS is added; EOS and pad are their own tokens.
    ids = reloaded(ROUND_TRIP_TEXTS[0])["input_ids"]
    assert ids[0] != reloaded.bos_token_id and ids[-1] != reloaded.eos_token_id
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.bos_token, reloaded.unk_token) == ("</s>", "<pad>", "<s>", "<unk>")
    assert reloaded.eos_token_id != reloaded.pad_token_id


def test_demo_tokenizer_is_deterministic(demo_tokenizer, tmp_path):
    first = _saved_tokenizer_json(demo_tokenizer, tmp_path / "a")
    assert _saved_tokenizer_json(demo.build_demo_tokenizer(), tmp_path / "b") == first


def test_demo_config_parses_and_targets_bloom_modules(tiny_bloom_dir):
    from transformers import AutoModelForCausalLM

    from loraft.config import load_config
    from loraft.model import target_matches

    path = REPO / "configs" / "demo.yaml"
    assert path.read_text(encoding="utf-8").splitlines()[0] == "# loraft demo"
    config = load_config(path)
    assert config.data.template == "human_assistant"
    assert config.adapter.method == "lora"
    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    matched = target_matches(model, config.adapter)
    layers = model.config.n_layer
    assert len(matched) == 4 * layers  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h in every block


def test_exact_match_counts_per_task(tiny_bloom_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    _, heldout = demo.make_records(seed=0, train_per_task=1, heldout_per_task=2)
    result = demo.exact_match(model, tokenizer, heldout, max_new_tokens=3)
    assert set(result["per_task"]) == set(demo.TASKS)
    assert sum(c["total"] for c in result["per_task"].values()) == len(heldout) == len(result["predictions"])
    assert 0.0 <= result["overall"] <= 1.0


def test_base_build_is_cached_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = demo.BaseRecipe(hidden_size=32, n_layer=1, n_head=2, seq_len=32, batch_size=2, steps=2, warmup_steps=1)
    lines: list[str] = []
    base = demo.build_demo_base(tmp_path, recipe=recipe, log=lines.append)
    assert base == tmp_path / "demo" / "base"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["base"]  # no staging dir left behind
    stamp = json.loads((base / demo.STAMP_FILE).read_text())
    assert stamp["version"] == demo.DEMO_BASE_VERSION and stamp["recipe"]["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert type(model).__name__ == "BloomForCausalLM" and model.config.vocab_size == len(tokenizer)

    lines.clear()
    assert demo.build_demo_base(tmp_path, recipe=recipe, log=lines.append) == base
    assert lines == [f"demo base: reusing {base}"]

    class BuildStarted(Exception):
        pass

    def stop_at_build(line: str) -> None:
        if "building" in line:
            raise BuildStarted(line)

    # A different recipe (or force) does not reuse the cached base.
    with pytest.raises(BuildStarted):
        demo.build_demo_base(tmp_path, recipe=demo.BaseRecipe(**{**stamp["recipe"], "seed": 1}), log=stop_at_build)
    with pytest.raises(BuildStarted):
        demo.build_demo_base(tmp_path, force=True, recipe=recipe, log=stop_at_build)
    # force builds even where the shipped base matches (the default recipe)
    with pytest.raises(BuildStarted):
        demo.build_demo_base(tmp_path, force=True, log=stop_at_build)


def test_the_shipped_base_loads_and_its_stamp_matches_the_code(demo_tokenizer, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shipped, recipe = demo.PREBUILT_DIR, demo.BaseRecipe()
    stamp = json.loads((shipped / demo.STAMP_FILE).read_text(encoding="utf-8"))
    refresh = "the shipped demo base is stale: refresh it with ship_demo_base() (see loraft.demo.base)"
    assert stamp["version"] == demo.DEMO_BASE_VERSION, refresh
    assert stamp["recipe"] == asdict(recipe), refresh
    assert set(stamp["raw_form_accuracy"]) == set(demo.TASKS) and stamp["build_seconds"] > 0
    # the shipped tokenizer is the one this code builds
    assert json.loads((shipped / "tokenizer.json").read_text(encoding="utf-8")) == _saved_tokenizer_json(
        demo_tokenizer, tmp_path / "tokenizer"), refresh

    model = AutoModelForCausalLM.from_pretrained(shipped, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    assert type(model).__name__ == "BloomForCausalLM"
    assert (model.config.n_layer, model.config.hidden_size, model.config.n_head) == (
        recipe.n_layer, recipe.hidden_size, recipe.n_head)
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == stamp["parameters"]
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    with safe_open(shipped / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}
    files = list(shipped.iterdir())
    assert sum(f.stat().st_size for f in files) < 20e6
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in files)  # package data every user can read

    lines: list[str] = []
    assert demo.build_demo_base(tmp_path / "home", log=lines.append) == shipped
    assert lines == [f"demo base: shipped with loraft ({shipped})"]
    assert not (tmp_path / "home").exists()


def test_run_demo_rebuilds_the_base_only_when_asked(monkeypatch, tmp_path):
    from loraft.demo import run as demo_run

    class BaseRequested(Exception):
        pass

    forced: list[bool] = []

    def build_demo_base(home, force, log):
        forced.append(force)
        raise BaseRequested

    monkeypatch.setattr(demo_run, "build_demo_base", build_demo_base)
    for rebuild_base in (False, True):
        with pytest.raises(BaseRequested):
            demo.run_demo(tmp_path / str(rebuild_base), rebuild_base=rebuild_base, log=lambda line: None)
    assert forced == [False, True]


def test_progress_lines_come_on_time_with_an_eta(monkeypatch):
    """A line after `first` seconds, then at least every `interval`, and the last step always; each with an ETA."""
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    lines: list[str] = []
    progress = demo.Progress("step", 100, lines.append, interval=20.0, first=5.0)
    for done in range(1, 101):
        clock[0] += 1.0  # one second a step
        progress.update(done, "loss 1.0")
    printed = [int(line.split()[1].split("/")[0]) for line in lines]
    assert printed == [5, 25, 45, 65, 85, 100]
    assert lines[0] == "  step 5/100  loss 1.0  5s elapsed, ~95s left"
    assert lines[-1].endswith("100s elapsed, ~0s left")


def test_a_demo_fine_tune_prints_its_progress_and_keeps_the_plan_in_train_log(tiny_bloom_dir, tmp_path, caplog):
    """The demo's console gets its own progress lines; the trainer's INFO lines (the plan, the target list) go to the
    run's train.log only; a warning would still reach the console."""
    import logging

    from conftest import write_alpaca
    from loraft.config import load_config
    from loraft.demo.run import demo_train

    config = load_config(None, [f"model.name_or_path={tiny_bloom_dir}", f"data.path={write_alpaca(tmp_path / 'a.jsonl')}",
                                f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_steps=1000"])
    printed: list[str] = []
    with caplog.at_level(logging.INFO, logger="loraft"):
        run_dir = demo_train(config, printed.append)
        logging.getLogger("loraft").warning("after the fine-tune")
    assert printed and printed[-1].startswith("  fine-tune step 2/2")
    assert not [r for r in caplog.records if r.name.startswith("loraft") and r.levelno < logging.WARNING]
    assert "after the fine-tune" in [r.getMessage() for r in caplog.records]
    assert "plan:" in (run_dir / "train.log").read_text() and "adapter targets" in (run_dir / "train.log").read_text()
