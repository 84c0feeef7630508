"""The demo's tasks: five skills with checkable answers, their Chinese instructions and raw-text forms, the
instruction set (train and held-out splits whose inputs never meet) and the pretraining corpus."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from loraft.files import write_text_atomically


# ----------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskFamily:
    """One skill with a checkable answer.

    Attributes:
        name: short id stored in each record's `task` field.
        title: Chinese name for the results table.
        instructions: Chinese instruction phrasings used in the alpaca records.
        raw_forms: plain-text forms ("{x}" input, "{y}" answer) used only in the pretraining corpus.
        make_input: draws a random input.
        answer: the reference answer for an input (also the checker).
    """

    name: str
    title: str
    instructions: tuple[str, ...]
    raw_forms: tuple[str, ...]
    make_input: Callable[[random.Random], str]
    answer: Callable[[str], str]


LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHINESE_DIGITS = "零一二三四五六七八九"
ANTONYM_PAIRS = (
    "大小", "多少", "高低", "长短", "快慢", "冷热", "新旧", "黑白", "前后", "开关", "来去", "进出",
    "买卖", "早晚", "远近", "轻重", "深浅", "胖瘦", "真假", "男女", "东西", "南北", "上下", "左右",
)
ANTONYMS = {**{a: b for a, b in ANTONYM_PAIRS}, **{b: a for a, b in ANTONYM_PAIRS}}
ENGLISH_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ENGLISH_WORDS = {
    "猫": "cat", "狗": "dog", "鱼": "fish", "鸟": "bird", "牛": "cow", "马": "horse", "羊": "sheep", "猪": "pig",
    "红": "red", "蓝": "blue", "绿": "green", "书": "book", "门": "door", "车": "car", "水": "water", "火": "fire",
}


def _random_string(alphabet: Sequence[str], low: int, high: int) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))

    return make


TASK_FAMILIES: tuple[TaskFamily, ...] = (
    TaskFamily(
        name="upper",
        title="字母大写",
        instructions=("把下面的英文字母全部改成大写。", "请将以下字母转换为大写形式。", "把这串小写字母写成大写。"),
        raw_forms=("小写：{x}\n大写：{y}", "{x}的大写形式是{y}。"),
        make_input=_random_string(LETTERS, 3, 7),
        answer=str.upper,
    ),
    TaskFamily(
        name="numerals",
        title="中文数字",
        instructions=("把下面的阿拉伯数字逐位写成中文数字。", "请用中文数字逐位写出下面的数字。", "将这串数字的每一位换成汉字。"),
        raw_forms=("数字：{x}\n读法：{y}", "{x}用汉字写作{y}。"),
        make_input=_random_string("0123456789", 3, 7),
        answer=lambda text: "".join(CHINESE_DIGITS[int(d)] for d in text),
    ),
    TaskFamily(
        name="antonym",
        title="反义词",
        instructions=("写出下面每个字的反义词。", "请把每个字换成它的反义字。", "逐字给出下列汉字的反义词。"),
        raw_forms=("原字：{x}\n反义：{y}", "{x}的反义是{y}。"),
        make_input=_random_string(sorted(ANTONYMS), 2, 5),
        answer=lambda text: "".join(ANTONYMS[c] for c in text),
    ),
    TaskFamily(
        name="spell",
        title="英文读数",
        instructions=("把下面的数字逐位读成英文，用空格隔开。", "请用英文单词逐位读出这串数字。", "将每一位数字换成英文单词。"),
        raw_forms=("号码：{x}\n英文读法：{y}", "{x}用英文读作{y}。"),
        make_input=_random_string("0123456789", 2, 4),
        answer=lambda text: " ".join(ENGLISH_DIGITS[int(d)] for d in text),
    ),
    TaskFamily(
        name="translate",
        title="逐字翻译",
        instructions=("把下面的中文词逐个翻译成英文，用空格隔开。", "请将下列汉字逐一译成英文单词。", "逐字翻译成英文。"),
        raw_forms=("中文：{x}\n英文：{y}", "{x}的英文是{y}。"),
        make_input=_random_string(sorted(ENGLISH_WORDS), 2, 4),
        answer=lambda text: " ".join(ENGLISH_WORDS[c] for c in text),
    ),
)
TASKS = {family.name: family for family in TASK_FAMILIES}


def is_heldout_input(text: str) -> bool:
    """Whether an input string belongs to the held-out fifth of the input space.

    The split is a fixed hash of the input text alone (not of the task or a seed), so a held-out input
    never appears in any training record or in the pretraining corpus, whatever seeds built them.
    """
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def _draw_inputs(family: TaskFamily, rng: random.Random, count: int, heldout: bool, exclude: set) -> list[str]:
    """`count` distinct inputs from one side of the held-out split."""
    drawn: list[str] = []
    for _ in range(count * 1000):
        if len(drawn) == count:
            break
        text = family.make_input(rng)
        if is_heldout_input(text) == heldout and text not in exclude:
            exclude.add(text)
            drawn.append(text)
    return drawn


def make_records(seed: int = 0, train_per_task: int = 400, heldout_per_task: int = 40) -> tuple[list[dict], list[dict]]:
    """Alpaca records {"instruction", "input", "output", "task"} for every task family.

    Returns:
        (train, heldout); the held-out inputs are disjoint from the training inputs (see is_heldout_input).
    """
    rng = random.Random(seed)
    train: list[dict] = []
    heldout: list[dict] = []
    for family in TASK_FAMILIES:
        for split, count, is_heldout in ((train, train_per_task, False), (heldout, heldout_per_task, True)):
            for text in _draw_inputs(family, rng, count, is_heldout, set()):
                split.append({
                    "instruction": rng.choice(family.instructions),
                    "input": text,
                    "output": family.answer(text),
                    "task": family.name,
                })
    rng.shuffle(train)
    return train, heldout


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped), read as training data is."""
    from loraft.records import read_json_records

    return [record for _, record in read_json_records(str(path))]


def write_demo_data(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the demo instruction set as `train.jsonl` and `heldout.jsonl` under out_dir.

    Returns:
        (train_path, heldout_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = make_records(seed)
    train_path, heldout_path = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(heldout_path, heldout)
    return train_path, heldout_path


def pretraining_examples(seed: int) -> Iterator[tuple[TaskFamily, str]]:
    """An endless stream of (task family, input) for the pretraining corpus, never a held-out input."""
    rng = random.Random(seed)
    while True:
        family = rng.choice(TASK_FAMILIES)
        text = family.make_input(rng)
        if not is_heldout_input(text):
            yield family, text


def pretraining_documents(seed: int) -> Iterator[str]:
    """An endless stream of raw-text documents: 3-6 skill examples, each in one of its plain-text forms.

    Neither the instruction phrasings nor the chat template appear; held-out inputs never do.
    """
    rng = random.Random(f"forms-{seed}")  # its own stream, independent of the examples'
    examples = pretraining_examples(seed)
    while True:
        lines = []
        for _ in range(rng.randint(3, 6)):
            family, text = next(examples)
            lines.append(rng.choice(family.raw_forms).format(x=text, y=family.answer(text)))
        yield "\n".join(lines)
