"""Preference accuracy (`loraft eval RUN --data prefs.jsonl`) on tiny BLOOM runs, checked against plain peft.

Preference training is its own stage; these tests only need runs whose config *says* dpo/kto/orpo. So an SFT run B
(trained here) is copied and its config.yaml edited: `train.objective` set, and `model.adapter_from` pointing at an
SFT run A (the shared `bloom-default` run), at B itself, or unset (the reference is then the base, adapter off).
Every reward is recomputed independently: each model loaded on its own with `PeftModel.from_pretrained`, one
unpadded sequence at a time, log_softmax over the completion's tokens.
"""

import json
import shutil

import pytest
import torch

from loraft.cli import main
from loraft.config import DataConfig, load_config, save_config
from loraft.errors import DataError
from loraft.evaluate import format_table
from conftest import ALPACA_RECORDS
from run_helpers import trained_run

BETA = 0.1  # preference.beta's default, which the derived runs keep


def write_pairs(path, count: int = 8):
    """Alpaca-style pairs: chosen = a record's own answer, rejected = the next record's."""
    rows = [{"instruction": record["instruction"], "input": record["input"], "chosen": record["output"],
             "rejected": ALPACA_RECORDS[(index + 1) % len(ALPACA_RECORDS)]["output"]}
            for index, record in enumerate(ALPACA_RECORDS[:count])]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_unpaired(path):
    """KTO-style records: each answer once as desirable (its own) and once as undesirable (another's)."""
    rows = []
    for index, record in enumerate(ALPACA_RECORDS[:4]):
        other = ALPACA_RECORDS[(index + 1) % len(ALPACA_RECORDS)]["output"]
        rows += [{"instruction": record["instruction"], "completion": record["output"], "label": True},
                 {"instruction": record["instruction"], "completion": other, "label": False}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def derived_run(source, destination, objective: str, adapter_from=None):
    """A copy of a finished run whose config.yaml says `train.objective: objective` and `model.adapter_from`."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    config = load_config(destination / "config.yaml")
    config = config.model_copy(update={
        "train": config.train.model_copy(update={"objective": objective}),
        "model": config.model.model_copy(update={"adapter_from": None if adapter_from is None else str(adapter_from)}),
    })
    save_config(config, destination / "config.yaml")
    return destination


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bloom_dir):
    start = trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)
    # same adapter settings as the start, another seed and length: its adapter clearly differs
    tuned = trained_run(tmp_path_factory, "preference-tuned", tiny_bloom_dir, ["train.seed=7", "train.max_steps=6"])
    root = tmp_path_factory.mktemp("preference-runs")
    return {
        "start": start, "tuned": tuned,
        "dpo_on_start": derived_run(tuned, root / "dpo-on-start", "dpo", start),
        "dpo_on_base": derived_run(tuned, root / "dpo-on-base", "dpo"),
        "dpo_on_itself": derived_run(tuned, root / "dpo-on-itself", "dpo", tuned),
        "kto_on_start": derived_run(tuned, root / "kto-on-start", "kto", start),
        "orpo": derived_run(tuned, root / "orpo", "orpo"),
        "sft": derived_run(start, root / "sft", "sft"),
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("preference-data") / "prefs.jsonl")


def run_eval(run_dir, data, *flags):
    """`loraft eval RUN --data FILE` (retention is tested on its own: test_retention_is_reported_beside_the_preferences)"""
    flags = flags if any(flag.startswith("--retention") for flag in flags) else (*flags, "--no-retention")
    assert main(["eval", str(run_dir), "--data", str(data), "--batch-size", "3", *flags]) == 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    predictions = (run_dir / "eval" / "predictions.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in predictions.splitlines()]
    return metrics, rows


# --- the independent computation ---------------------------------------------------------------------------------


def plain_model(base_dir, adapter_dir=None):
    """The base (and adapter) as anyone would load them: fp32, plain peft, eager transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, str(adapter_dir)) if adapter_dir else model).eval()


def tokenized(run_dir, data):
    """The records' prompt and completion ids, as training tokenizes them with the run's tokenizer and template."""
    from transformers import AutoTokenizer

    from loraft.preference import prepare_preferences
    from loraft.rundir import read_record

    config = load_config(run_dir / "config.yaml")
    settings = config.data.model_copy(update={"path": str(data), "template": read_record(run_dir)["template"]})
    return prepare_preferences(str(data), settings, AutoTokenizer.from_pretrained(run_dir), config.preference)[0]


@torch.no_grad()
def logprobs(model, dataset, side: str) -> list[tuple[float, int]]:
    """(summed log p, tokens) of each record's `side` completion, one unpadded sequence at a time."""
    found = []
    for prompt, completion in zip(dataset["prompt_ids"], dataset[f"{side}_ids"]):
        ids = torch.tensor([prompt + completion])
        token_logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        found.append((float(token_logprobs[len(prompt) - 1:].sum()), len(completion)))
    return found


def share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


# --- rewards -----------------------------------------------------------------------------------------------------


def test_a_run_that_is_its_own_reference_has_zero_rewards(runs, pairs):
    metrics, rows = run_eval(runs["dpo_on_itself"], pairs)
    assert metrics["objective"] == "dpo" and metrics["format"] == "preference_alpaca"
    assert all(row["reward_chosen"] == 0.0 and row["reward_rejected"] == 0.0 for row in rows)
    assert not any(row["prefers_chosen"] for row in rows)  # a tie is no preference
    adapter = metrics["preference"]["adapter"]
    assert adapter["measure"] == "implicit reward" and adapter["pairs"] == len(rows) == 8
    assert adapter["accuracy"] == 0.0 and adapter["margin"] == 0.0
    # the log-probabilities themselves are not zero: the pairs do differ
    assert all(row["logprob_chosen"] != row["logprob_rejected"] for row in rows)


@pytest.mark.parametrize("name", ["dpo_on_start", "dpo_on_base"])
def test_rewards_are_beta_times_the_log_ratio_to_the_reference(runs, pairs, tiny_bloom_dir, name):
    run_dir = runs[name]
    metrics, rows = run_eval(run_dir, pairs, "--base")
    dataset = tokenized(run_dir, pairs)
    own = plain_model(tiny_bloom_dir, runs["tuned"])
    reference = plain_model(tiny_bloom_dir, runs["start"] if name == "dpo_on_start" else None)
    expected = {}
    for side in ("chosen", "rejected"):
        own_logprobs, reference_logprobs = logprobs(own, dataset, side), logprobs(reference, dataset, side)
        expected[side] = [BETA * (lp - ref) for (lp, _), (ref, _) in zip(own_logprobs, reference_logprobs)]
        assert [row[f"reward_{side}"] for row in rows] == pytest.approx(expected[side], abs=1e-5)
        # sums of ~100 in fp32 carry ~1e-5 of rounding: the log-probabilities themselves agree to 1e-6 relative
        assert [row[f"logprob_{side}"] for row in rows] == pytest.approx([lp for lp, _ in own_logprobs], rel=1e-6)
        assert [row[f"reference_logprob_{side}"] for row in rows] == pytest.approx(
            [ref for ref, _ in reference_logprobs], rel=1e-6)
    adapter = metrics["preference"]["adapter"]
    assert adapter["accuracy"] == share(c > r for c, r in zip(expected["chosen"], expected["rejected"]))
    assert adapter["margin"] == pytest.approx(share(c - r for c, r in zip(expected["chosen"], expected["rejected"])),
                                              abs=1e-5)
    assert adapter["reward_chosen"] == pytest.approx(share(expected["chosen"]), abs=1e-5)
    assert adapter["margin"] != 0.0  # the run differs from its reference
    assert metrics["reference"] == (f"{runs['start']} (model.adapter_from)" if name == "dpo_on_start"
                                    else "the base model, adapter disabled")


@pytest.mark.parametrize("name", ["dpo_on_start", "dpo_on_base"])
def test_base_scores_the_starting_point_by_log_probability(runs, pairs, tiny_bloom_dir, name):
    run_dir = runs[name]
    metrics, rows = run_eval(run_dir, pairs, "--base")
    dataset = tokenized(run_dir, pairs)
    start = plain_model(tiny_bloom_dir, runs["start"] if name == "dpo_on_start" else None)
    chosen, rejected = ([lp for lp, _ in logprobs(start, dataset, side)] for side in ("chosen", "rejected"))
    reference = metrics["preference"]["reference"]
    assert reference["measure"] == "log-probability"
    assert reference["accuracy"] == reference["logprob_accuracy"] == share(c > r for c, r in zip(chosen, rejected))
    assert reference["reward_chosen"] == pytest.approx(share(chosen), rel=1e-6)
    assert reference["reward_rejected"] == pytest.approx(share(rejected), rel=1e-6)
    assert [row["reference_prefers_chosen"] for row in rows] == [c > r for c, r in zip(chosen, rejected)]


def test_orpo_and_sft_runs_are_scored_by_their_own_log_probability(runs, pairs, tiny_bloom_dir):
    dataset = tokenized(runs["orpo"], pairs)
    for name, adapter_dir, measure in (("orpo", runs["tuned"], "mean log-probability"),
                                       ("sft", runs["start"], "log-probability")):
        metrics, rows = run_eval(runs[name], pairs)
        model = plain_model(tiny_bloom_dir, adapter_dir)
        adapter = metrics["preference"]["adapter"]
        assert adapter["measure"] == measure and "reference" not in metrics["preference"]
        for side in ("chosen", "rejected"):
            found = logprobs(model, dataset, side)
            expected = [BETA * lp / tokens for lp, tokens in found] if name == "orpo" else [lp for lp, _ in found]
            assert [row[f"reward_{side}"] for row in rows] == pytest.approx(expected, rel=1e-6, abs=1e-5)
        assert adapter["logprob_accuracy"] == share(row["logprob_chosen"] > row["logprob_rejected"] for row in rows)
        if name == "sft":
            assert metrics["beta"] is None and adapter["accuracy"] == adapter["logprob_accuracy"]


def test_unpaired_records_count_rewards_with_the_labels_sign(runs, tmp_path, tiny_bloom_dir):
    data = write_unpaired(tmp_path / "unpaired.jsonl")
    metrics, rows = run_eval(runs["kto_on_start"], data)
    dataset = tokenized(runs["kto_on_start"], data)
    own, start = plain_model(tiny_bloom_dir, runs["tuned"]), plain_model(tiny_bloom_dir, runs["start"])
    expected = [BETA * (lp - ref) for (lp, _), (ref, _) in
                zip(logprobs(own, dataset, "completion"), logprobs(start, dataset, "completion"))]
    assert [row["reward"] for row in rows] == pytest.approx(expected, abs=1e-5)
    labels = [row["label"] for row in rows]
    assert labels == [True, False] * 4
    adapter = metrics["preference"]["adapter"]
    assert adapter["accuracy"] is None and adapter["accuracy_note"] == "no pairs"
    agrees = [r > 0 if label else r < 0 for r, label in zip(expected, labels)]
    assert adapter["label_accuracy"] == share(agrees)
    assert [row["agrees_with_label"] for row in rows] == agrees
    table = format_table(metrics).splitlines()
    assert table[0].startswith("8 unpaired completions from ")
    assert table[3].split() == ["preference", "accuracy", "no", "pairs"]


# --- memory ------------------------------------------------------------------------------------------------------


def test_the_reference_adapter_shares_the_runs_base_weights(runs, tiny_bloom_dir):
    from loraft.evaluate_preference import load_preference_model
    from loraft.run_access import open_run

    model, _, _, reference, _ = load_preference_model(open_run(runs["dpo_on_start"]))
    assert reference.adapter == "reference" and set(model.peft_config) == {"default", "reference"}

    def base_storages(module) -> set[int]:
        return {parameter.untyped_storage().data_ptr() for name, parameter in module.named_parameters()
                if "lora_" not in name and ".modules_to_save." not in name}

    base = plain_model(tiny_bloom_dir)
    assert len(base_storages(model)) == len(base_storages(base))
    base_elements = sum(parameter.numel() for name, parameter in model.named_parameters()
                        if "lora_" not in name and ".modules_to_save." not in name)
    assert base_elements == sum(parameter.numel() for parameter in base.parameters())
    # both adapters are there, each with its own LoRA weights
    assert any(".lora_A.reference." in name for name, _ in model.named_parameters())
    assert any(".lora_A.default." in name for name, _ in model.named_parameters())


# --- the command line --------------------------------------------------------------------------------------------


def test_cli_eval_prints_the_preference_table(runs, pairs, capsys):
    capsys.readouterr()
    metrics, _ = run_eval(runs["dpo_on_start"], pairs, "--base", "--limit", "5")
    out = capsys.readouterr().out.splitlines()
    assert metrics["records"] == 5 and metrics["preference"]["adapter"]["pairs"] == 5
    assert out[0].startswith(f"5 preference pairs from {pairs} (human_assistant template; dpo run, beta 0.1; ")
    assert out[1].split() == ["metric", "reference", "adapter"]
    assert out[2].split() == ["measure", "log-probability", "implicit", "reward"]
    accuracy = metrics["preference"]["adapter"]["accuracy"]
    assert out[3].split()[-1] == f"{accuracy:.4f}" and out[3].startswith("preference accuracy")


def test_cli_eval_malformed_preference_record(runs, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    rows = [{"instruction": "人工智能是什么", "chosen": "一个分支。", "rejected": "不知道。"},
            {"instruction": "今天天气很好", "chosen": "是的。"}]
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert main(["eval", str(runs["dpo_on_start"]), "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        f"error: {data}, line 2, field 'rejected': missing (the record has instruction, chosen)\n")


def test_cli_eval_missing_reference_run(runs, pairs, tmp_path, capsys):
    run_dir = derived_run(runs["tuned"], tmp_path / "dpo", "dpo", tmp_path / "gone")
    assert main(["eval", str(run_dir), "--data", str(pairs)]) == 2
    assert capsys.readouterr().err == (f"error: {run_dir}: its reference (model.adapter_from in config.yaml) cannot "
                                       f"be used: {tmp_path / 'gone'}: run directory not found\n")
    # reference-free: an orpo run needs its reference only for --base
    orpo = derived_run(runs["tuned"], tmp_path / "orpo", "orpo", tmp_path / "gone")
    assert main(["eval", str(orpo), "--data", str(pairs), "--no-retention"]) == 0
    assert main(["eval", str(orpo), "--data", str(pairs), "--base"]) == 2


def test_retention_is_reported_beside_the_preferences(runs, pairs, capsys):
    """A preference run's eval measures what it kept of its base (the adapters off) as an SFT run's does."""
    capsys.readouterr()
    metrics, _ = run_eval(runs["dpo_on_start"], pairs, "--limit", "2", "--retention-limit", "4")
    out = capsys.readouterr().out
    retention = metrics["retention"]
    assert retention["prompts"] == 4 and retention["kl_per_token"] >= 0 and "accuracy" in retention
    assert out.splitlines()[-1].startswith("retention on 4 general prompts (") and "KL from the base" in out
    assert metrics["preference"]["adapter"]["pairs"] == 2


def test_held_out_format_follows_the_kind_of_records(tmp_path):
    from loraft.evaluate import held_out_format

    pairs_file = write_pairs(tmp_path / "prefs.jsonl", count=2)
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text(json.dumps(ALPACA_RECORDS[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert held_out_format(pairs_file, DataConfig()) == "preference_alpaca"
    assert held_out_format(pairs_file, DataConfig(format="alpaca")) == "preference_alpaca"  # an SFT run's format
    assert held_out_format(sft_file, DataConfig(format="preference_alpaca")) == "alpaca"  # a DPO run's format
    assert held_out_format(pairs_file, DataConfig(format="preference_alpaca")) == "preference_alpaca"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        held_out_format(empty, DataConfig())
