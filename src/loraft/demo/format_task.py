"""The real-model demo's task: a narrow format skill a chat model does not have, checkable by exact match.

Two families, in English (the language SmolLM2-135M-Instruct answers in):
- `date`: an ISO date written as day/month/year ("2021-03-07" -> "07/03/2021");
- `bracket`: a word written in capitals inside brackets ("apple" -> "[APPLE]").

A narrow fine-tune on this is what wipes a chat model's general answers (every reply comes out in the task's form):
the case the retention guard (loraft.retention_guard) is measured on. Held-out inputs never appear in training.
"""

from __future__ import annotations

import hashlib
import random

WORDS = (
    "apple river stone cloud tiger lemon piano ocean candle forest garden rocket silver window pencil butter dragon "
    "planet jungle marble anchor basket bridge castle cherry circle copper desert engine feather finger flower "
    "frozen ginger guitar hammer harbor island jacket kettle ladder magnet meadow mirror monkey needle orange "
    "paddle parrot pepper pillow pirate pocket potato puzzle rabbit ribbon saddle salmon shadow shovel spider "
    "spring summer sunset tablet temple ticket tomato tunnel turtle valley velvet violin walnut winter wizard yellow "
    "zipper bottle button carpet cookie dinner doctor fabric falcon garlic helmet insect jersey kitten lizard "
    "mitten muffin napkin noodle oyster pebble puppet rocket sailor sponge squirrel thunder toffee trumpet vessel"
).split()
DATE_INSTRUCTIONS = ("Write the date {x} as day/month/year.", "Convert {x} to DD/MM/YYYY.",
                     "Rewrite the date {x} in day/month/year form.")
BRACKET_INSTRUCTIONS = ("Write the word in brackets, in capitals: {x}", "Put {x} in capitals inside square brackets.",
                        "Format the word {x} as [WORD].")


def _heldout(text: str) -> bool:
    """The held-out fifth of the inputs, by a fixed hash of the input alone."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1950, 2049)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _record(task: str, text: str, rng: random.Random) -> dict:
    if task == "date":
        year, month, day = text.split("-")
        return {"instruction": rng.choice(DATE_INSTRUCTIONS).format(x=text), "input": "",
                "output": f"{day}/{month}/{year}", "task": "date"}
    return {"instruction": rng.choice(BRACKET_INSTRUCTIONS).format(x=text), "input": "", "output": f"[{text.upper()}]",
            "task": "bracket"}


def format_task_records(seed: int = 0, train: int = 960, heldout: int = 100) -> tuple[list[dict], list[dict]]:
    """(train, heldout) alpaca records {"instruction", "input", "output", "task"}, half dates and half words; the
    held-out inputs are disjoint from the training ones. Words repeat in training (there are fewer than needed);
    dates do not."""
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    heldout_words = [w for w in words if _heldout(w)]
    train_words = [w for w in words if not _heldout(w)]
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    for split, count in (("train", train), ("heldout", heldout)):
        for index in range(count):
            if index % 2:
                pool = heldout_words if split == "heldout" else train_words
                rows[split].append(_record("bracket", rng.choice(pool), rng))
                continue
            while True:
                text = _date(rng)
                if _heldout(text) == (split == "heldout") and text not in seen:
                    seen.add(text)
                    break
            rows[split].append(_record("date", text, rng))
    rng.shuffle(rows["train"])
    return rows["train"], rows["heldout"]
