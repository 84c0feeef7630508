import json
import math

import pytest
import torch

from loraft.cli import main
from loraft.evaluate import format_table, reference_loss, tokenize_references
from loraft.text_metrics import (
    average_scores,
    bleu4,
    char_tokens,
    longest_common_subsequence,
    rouge_l,
    rouge_n,
    text_scores,
    word_tokens,
)
from conftest import write_alpaca
from run_helpers import trained_run

# --- metrics against hand-computed values --------------------------------------------------------------


def test_rouge_n_counts_distinct_ngrams_like_rouge_chinese():
    hyp, ref = "a b c d".split(), "a b e".split()
    # unigrams: 2 shared of 4 and 3 -> p 1/2, r 2/3 -> F1 4/7; bigrams: 1 shared (a b) of 3 and 2 -> F1 0.4
    assert rouge_n(hyp, ref, 1) == pytest.approx(4 / 7)
    assert rouge_n(hyp, ref, 2) == pytest.approx(0.4)
    # rouge-chinese compares n-gram sets: repeats count once on each side
    assert rouge_n("a a a b".split(), "a b b".split(), 1) == pytest.approx(1.0)
    assert rouge_n("x y".split(), "a b".split(), 1) == 0.0
    assert rouge_n([], ["a"], 1) == 0.0 and rouge_n(["a"], [], 1) == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    assert longest_common_subsequence("a b c d".split(), "a c e d".split()) == 3
    assert longest_common_subsequence(list("ABCBDAB"), list("BDCABA")) == 4
    assert rouge_l("a b c d".split(), "a c e d".split()) == pytest.approx(0.75)
    # LCS 2 (a b) of 2 and 4 tokens: p 1, r 1/2 -> F1 2/3
    assert rouge_l("a b".split(), "a x b y".split()) == pytest.approx(2 / 3)


def test_bleu4_matches_nltk_method3_by_hand():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; equal lengths -> no brevity penalty
    assert bleu4("a b c d e".split(), "a b c d f".split()) == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    # p1 3/4, p2 1/3; no 3-gram (of 2) or 4-gram (of 1) matches: 1/(2*2) and 1/(4*1) (method 3)
    assert bleu4("a b x c".split(), "a b c d".split()) == pytest.approx((0.75 * (1 / 3) * 0.25 * 0.25) ** 0.25)
    # 2-token hypothesis: p3 = 1/(2*1), p4 = 1/(4*1), brevity penalty exp(1 - 4/2)
    assert bleu4("a b".split(), "a b c d".split()) == pytest.approx(math.exp(-1) * (0.5 * 0.25) ** 0.25)
    assert bleu4("a b c d".split(), "a b c d".split()) == pytest.approx(1.0)
    assert bleu4("x y".split(), "a b".split()) == 0.0  # no unigram match
    assert bleu4([], "a b".split()) == 0.0


def test_chinese_scores_over_words_and_characters():
    assert word_tokens("北京是中国的首都。") == ["北京", "是", "中国", "的", "首都", "。"]
    assert word_tokens(" 北京 是中国的首都 ") == ["北京", "是", "中国", "的", "首都"]
    assert char_tokens("北京 是\n") == ["北", "京", "是"]
    scores = text_scores("北京是中国的首都", "北京是中国的首都。")
    assert scores["exact_match"] == 0.0
    # words: 5 of 6 shared, every n-gram of the prediction matches; brevity penalty exp(1 - 6/5)
    assert scores["words"]["rouge-1"] == pytest.approx(100 * 10 / 11)
    assert scores["words"]["rouge-2"] == pytest.approx(100 * 8 / 9)
    assert scores["words"]["rouge-l"] == pytest.approx(100 * 10 / 11)
    assert scores["words"]["bleu-4"] == pytest.approx(100 * math.exp(-0.2))
    # characters: 8 of 9
    assert scores["chars"]["rouge-1"] == pytest.approx(100 * 16 / 17)
    assert scores["chars"]["rouge-2"] == pytest.approx(100 * 14 / 15)
    assert scores["chars"]["bleu-4"] == pytest.approx(100 * math.exp(1 - 9 / 8))
    assert text_scores(" 答案是 42。\n", "答案是 42。")["exact_match"] == 100.0


def test_scores_are_macro_averaged():
    perfect, empty = text_scores("答案是 42。", "答案是 42。"), text_scores("", "答案是 42。")
    assert perfect["chars"]["rouge-1"] == pytest.approx(100.0) and empty["chars"]["rouge-1"] == 0.0
    mean = average_scores([perfect, empty])
    assert mean["exact_match"] == 50.0
    assert mean["chars"]["rouge-1"] == pytest.approx(50.0)
    assert mean["words"]["bleu-4"] == pytest.approx(50.0)


# --- the stage on a trained tiny BLOOM -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bloom_run(tmp_path_factory, tiny_bloom_dir):
    return trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)


@pytest.fixture(scope="module")
def evaluated(bloom_run, tmp_path_factory):
    data = write_alpaca(tmp_path_factory.mktemp("eval-data") / "alpaca.jsonl")
    # retention (on by default: the 296 general prompts, 30 s here) is test_retention.py's
    code = main(["eval", str(bloom_run), "--data", str(data), "--limit", "4", "--base", "--batch-size", "4",
                 "--max-new-tokens", "5", "--no-retention"])
    assert code == 0
    return bloom_run, data


def test_eval_writes_predictions_metrics_and_prints_before_after(evaluated, capsys):
    run_dir, data = evaluated
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["records"] == 4 and metrics["template"] == "human_assistant"
    assert metrics["generation"] == {"decoding": "greedy", "max_new_tokens": 5}
    for side in ("base", "adapter"):
        scores = metrics[side]
        assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
        assert set(scores["words"]) == set(scores["chars"]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    # 4 steps at lr 1e-2 on these very records: the adapter fits them better than the base
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    assert rows[0]["reference"] == "人工智能是计算机科学的一个分支。"
    assert rows[0]["prompt"] == [{"role": "user", "content": "人工智能是什么"}]
    assert {"prediction", "base_prediction", "source"} <= set(rows[0])
    table = format_table(metrics)
    assert table.splitlines()[1].split() == ["metric", "base", "adapter"]
    assert any(line.startswith("ROUGE-L chars") for line in table.splitlines())


def test_eval_predictions_are_the_runs_greedy_answers(evaluated):
    from loraft.generate import generate_batch, load_run

    run_dir, _ = evaluated
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    model, tokenizer, template, info = load_run(run_dir)
    settings = info["config"].generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 5})
    answers = generate_batch(model, tokenizer, template, [r["prompt"] for r in rows], settings, batch_size=2)
    assert answers == [r["prediction"] for r in rows]


def test_base_loss_is_the_plain_base_models_loss(evaluated, tiny_bloom_dir):
    """--base must switch off LoRA layers *and* the trained word_embeddings copy."""
    from transformers import AutoModelForCausalLM

    from loraft.generate import load_run

    run_dir, _ = evaluated
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    _, tokenizer, template, info = load_run(run_dir)
    conversations = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["reference"]}]} for r in rows]
    samples, _ = tokenize_references(tokenizer, template, conversations, info["config"].data.max_length)
    base = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, dtype=torch.float32).eval()
    assert reference_loss(base, tokenizer, samples, batch_size=2)["loss"] == pytest.approx(metrics["base"]["loss"], abs=1e-5)
    assert abs(metrics["adapter"]["loss"] - metrics["base"]["loss"]) > 1e-3


def test_eval_missing_run_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--data", str(tmp_path / "d.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: run directory not found\n"


def test_eval_bad_numbers(bloom_run, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    assert main(["eval", str(bloom_run), "--data", str(data), "--limit", "0"]) == 2
    assert capsys.readouterr().err == "error: --limit must be > 0 (got 0)\n"
    assert main(["eval", str(bloom_run), "--data", str(data), "--batch-size", "-1"]) == 2
    assert capsys.readouterr().err == "error: --batch-size must be > 0 (got -1)\n"


def test_eval_dir_without_adapter(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: not a finished loraft run (no adapter_config.json)\n"


def test_eval_missing_data_file(bloom_run, tmp_path, capsys):
    assert main(["eval", str(bloom_run), "--data", str(tmp_path / "held_out.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'held_out.jsonl'}: no such file or directory\n"


def test_eval_record_must_end_with_the_reference_answer(bloom_run, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                           {"role": "user", "content": "再见"}]}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["eval", str(bloom_run), "--data", str(data)]) == 2
    assert capsys.readouterr().err == (
        f"error: {data}, line 1, field 'messages': the last message must be the assistant's reference answer\n"
    )
