"""Tokenization speed: loraft's data stage vs the reference recipe's per-record `Dataset.map`.

    python benchmarks/tokenize_speed.py            # 51,000 records, the size of alpaca_data_zh
    python benchmarks/tokenize_speed.py --quick    # 5,000 records

Records are alpaca-zh-like (instruction, 30% with an input, output; Chinese text whose token counts spread
like the real set: prompts 10-150 tokens, responses 5-250), saved with Dataset.save_to_disk like the
reference's alpaca_data_zh. The tokenizer is a byte-level BPE trained on them here (no hub access); both
sides use the same one.

  reference  dataset.map(preprocess_function, remove_columns=...) exactly as the recipe, one record per call
             (datasets' own cache is bypassed, as on a first run)
  loraft     loraft.data.prepare_datasets(config, tokenizer) with an empty cache, then again (cache hit)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHARACTERS = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)] + list("，。！？：；、")


def make_records(count: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def text(length: int) -> str:
        return "".join(CHARACTERS[i] for i in rng.integers(0, len(CHARACTERS), length))

    records = []
    for _ in range(count):
        prompt = int(np.clip(round(rng.lognormal(math.log(24), 0.7)), 6, 140))
        response = int(np.clip(round(rng.lognormal(math.log(60), 0.9)), 4, 250))
        with_input = rng.random() < 0.3
        instruction = text(prompt // 2 if with_input else prompt)
        records.append({"instruction": instruction, "input": text(prompt - prompt // 2) if with_input else "",
                        "output": text(response)})
    return records


def train_tokenizer(records: list[dict], path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=12000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((r["instruction"] + r["input"] + r["output"] for r in records[:5000]), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def reference_map(dataset, tokenizer):
    """The recipe's preprocessing, verbatim apart from taking the tokenizer as an argument."""

    def preprocess_function(examples):
        max_length = 256
        instruction = tokenizer("\n".join(["Human: " + examples["instruction"], examples["input"]]).strip()
                                + "\n\nAssistant: ")
        response = tokenizer(examples["output"] + tokenizer.eos_token)
        input_ids = instruction["input_ids"] + response["input_ids"]
        attention_mask = instruction["attention_mask"] + response["attention_mask"]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
        if len(input_ids) > max_length:
            input_ids, attention_mask, labels = input_ids[:max_length], attention_mask[:max_length], labels[:max_length]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return dataset.map(preprocess_function, remove_columns=dataset.column_names, load_from_cache_file=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 records")
    parser.add_argument("--records", type=int, default=51_000)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.records = 5000
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset, load_from_disk

    from loraft.config import load_config
    from loraft.data import prepare_datasets

    with tempfile.TemporaryDirectory(prefix="loraft-tokenize-") as scratch:
        root = Path(scratch)
        records = make_records(args.records)
        tokenizer = train_tokenizer(records, root / "tokenizer")
        Dataset.from_list(records).save_to_disk(str(root / "alpaca_data_zh"))

        dataset = load_from_disk(str(root / "alpaca_data_zh"))
        started = time.perf_counter()
        reference = reference_map(dataset, tokenizer)
        reference_s = time.perf_counter() - started

        config = load_config(None, [f"data.path={root / 'alpaca_data_zh'}", f"model.name_or_path={root / 'tokenizer'}",
                                    f"data.cache_dir={root / 'cache'}"])
        started = time.perf_counter()
        prepared = prepare_datasets(config, tokenizer)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = prepare_datasets(config, tokenizer)
        cached_s = time.perf_counter() - started

        # the same samples as the reference's map (the data stage's own tests check this record by record)
        same = (len(prepared.train) == len(reference)
                and prepared.train[:50]["input_ids"] == reference[:50]["input_ids"]
                and prepared.train[:50]["labels"] == reference[:50]["labels"]
                and len(cached.train) == len(prepared.train))
        tokens = sum(prepared.train["length"]) if "length" in prepared.train.column_names else None

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": common.machine(),
        "records": args.records, "tokens": tokens, "reference_map_s": reference_s, "loraft_first_s": first_s,
        "loraft_cached_s": cached_s, "speedup": reference_s / first_s, "same_samples_as_reference": same,
        "load_average": common.load_average(),
    }
    print(f"{args.records} records: reference map {reference_s:.1f} s; loraft {first_s:.1f} s "
          f"({report['speedup']:.1f}x), cached {cached_s:.2f} s; same samples: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
