"""Text metrics of an answer against its reference: exact match, ROUGE-1/2/L F1 and BLEU-4, over jieba words and
over characters (what Chinese fine-tuning papers and LLaMA-Factory report); `loraft eval` averages them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

# Written here rather than pulling in rouge-chinese and nltk: each is a few lines. They reproduce those
# libraries' numbers (checked against rouge-chinese 1.0.3 and nltk 3.10 on thousands of random pairs), and
# the unit tests pin them to hand-computed values.


def word_tokens(text: str) -> list[str]:
    """jieba words of `text`, whitespace dropped (as LLaMA-Factory's `" ".join(jieba.cut(t)).split()`)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [word for word in jieba.cut(text) if word.strip()]


def char_tokens(text: str) -> list[str]:
    """Characters of `text`, whitespace dropped."""
    return [char for char in text if not char.isspace()]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: float, hypothesis_total: int, reference_total: int) -> float:
    if overlap == 0 or hypothesis_total == 0 or reference_total == 0:
        return 0.0
    precision, recall = overlap / hypothesis_total, overlap / reference_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F1 over distinct n-grams, as rouge-chinese (LLaMA-Factory's scorer) counts them.

    rouge-chinese compares the *sets* of n-grams, so a repeated n-gram counts once on each side; keeping
    that makes our numbers comparable with the ones LLaMA-Factory and the papers using it report.
    """
    hyp, ref = set(_ngrams(hypothesis, n)), set(_ngrams(reference, n))
    return _f1(len(hyp & ref), len(hyp), len(ref))


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table kept)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 over the whole answer: LCS / hypothesis length and LCS / reference length."""
    return _f1(longest_common_subsequence(hypothesis, reference), len(hypothesis), len(reference))


def bleu4(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Sentence BLEU-4 with one reference, uniform weights, and NLTK's smoothing method 3.

    Same formula as `nltk.translate.bleu_score.sentence_bleu(..., smoothing_function=method3)`, which
    LLaMA-Factory uses: clipped precisions p_n = matches_n / max(1, hypothesis n-grams); the k-th
    precision with no match becomes 1 / (2^k * its denominator); the score is 0 when no unigram
    matches; brevity penalty exp(1 - r/c) when the hypothesis is shorter than the reference.
    """
    if not hypothesis:
        return 0.0
    log_sum = 0.0
    zero_matches = 0
    for n in range(1, 5):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum((hyp & ref).values())
        denominator = max(1, sum(hyp.values()))
        if n == 1 and matches == 0:
            return 0.0
        if matches == 0:
            zero_matches += 1
            precision = 1.0 / (2**zero_matches * denominator)
        else:
            precision = matches / denominator
        log_sum += 0.25 * math.log(precision)
    hyp_len, ref_len = len(hypothesis), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_sum)


def text_scores(prediction: str, reference: str) -> dict:
    """Per-record scores in percent: exact match, and ROUGE-1/2/L + BLEU-4 over words and characters."""
    scores = {"exact_match": 100.0 * (prediction.strip() == reference.strip())}
    for unit, tokenize in (("words", word_tokens), ("chars", char_tokens)):
        hyp, ref = tokenize(prediction), tokenize(reference)
        scores[unit] = {
            "rouge-1": 100.0 * rouge_n(hyp, ref, 1),
            "rouge-2": 100.0 * rouge_n(hyp, ref, 2),
            "rouge-l": 100.0 * rouge_l(hyp, ref),
            "bleu-4": 100.0 * bleu4(hyp, ref),
        }
    return scores


def average_scores(per_record: Sequence[dict]) -> dict:
    """Mean of each per-record score (the corpus figure papers report is this macro average)."""
    if not per_record:
        return {}
    result: dict = {"exact_match": sum(s["exact_match"] for s in per_record) / len(per_record)}
    for unit in ("words", "chars"):
        result[unit] = {
            name: sum(s[unit][name] for s in per_record) / len(per_record) for name in per_record[0][unit]
        }
    return result
