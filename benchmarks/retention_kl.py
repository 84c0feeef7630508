"""The retention KL's cost: loraft.retention.kl_per_token against the way it was computed before (2026-12-06).

    python benchmarks/retention_kl.py RUN [OTHER_RUN] [--prompts 120] [--batch 16] [--repeats 2]

RUN and OTHER_RUN are two runs of one base (`loraft demo --real` leaves real/run and real/run-unguarded). The base's
greedy answers to the first --prompts general prompts come from loraft's cache (generated once if missing, not
timed). Timed, each --repeats times, in this order per repeat:
  before        the former computation, kept here as the baseline: rows in prompt order, every position's logits,
                the base's forward once per adapter (so twice for two runs);
  one           kl_per_token for RUN alone: rows batched by length, logits of the answer positions only;
  two           (with OTHER_RUN) kl_per_token for both adapters at once: one base forward a batch for both.
Reports each one's median seconds, the KLs (they must agree to about 1e-5 relative), and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


@torch.inference_mode()
def kl_before(model, tokenizer, template, prompts, answers, batch_size: int) -> float:
    """The computation kl_per_token replaced: prompt order, full logits, the adapter active (one adapter a call)."""
    from loraft.encode import right_pad_scored
    from loraft.generate import encode_prompt

    rows = []
    for prompt, answer in zip(prompts, answers):
        prefix = encode_prompt(tokenizer, template, [{"role": "user", "content": prompt["prompt"]}])
        if answer["ids"]:
            rows.append((prefix + answer["ids"], len(prefix) - 1))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        input_ids, mask, scored = right_pad_scored(rows[start:start + batch_size], tokenizer.pad_token_id)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        run = torch.log_softmax(model(**inputs).logits.float(), dim=-1)[scored]
        with model.disable_adapter():
            base = torch.log_softmax(model(**inputs).logits.float(), dim=-1)[scored]
        total += float((base.exp() * (base - run)).sum())
        count += int(scored.sum())
    return total / count if count else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("other_run", nargs="?")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()

    from loraft import retention
    from loraft.generate import cli_flag, load_run, resolve_generation

    model, tokenizer, template, info = load_run(args.run)  # fp32, as loraft eval measures
    settings = resolve_generation(info["config"].generation,
                                  {"temperature": 0.0, "max_new_tokens": retention.RETENTION_TOKENS}, label=cli_flag)
    prompts = retention.load_prompts()[:args.prompts]
    cache = retention._cache_file(info["config"], template, prompts, settings.max_new_tokens, info["dtype"])
    answers = retention.base_answers(model, tokenizer, template, prompts, settings, args.batch, cache)
    adapters = ["default"]
    if args.other_run:
        model.load_adapter(args.other_run, adapter_name="other")
        adapters.append("other")
    times: dict[str, list[float]] = {}
    kls: dict[str, object] = {}

    def timed(name, compute):
        started = time.perf_counter()
        kls[name] = compute()
        times.setdefault(name, []).append(time.perf_counter() - started)

    for _ in range(args.repeats):
        def before():
            values = {}
            for adapter in adapters:
                model.set_adapter(adapter)
                values[adapter] = kl_before(model, tokenizer, template, prompts, answers, args.batch)
            model.set_adapter("default")
            return values

        timed("before", before)
        timed("one", lambda: retention.kl_per_token(model, tokenizer, template, prompts, answers, args.batch))
        if args.other_run:
            timed("two", lambda: retention.kl_per_token(model, tokenizer, template, prompts, answers, args.batch,
                                                        adapters=adapters))
    report = {"machine": common.machine(), "command": common.command_line(__file__), "run": args.run,
              "other_run": args.other_run, "prompts": len(prompts), "batch": args.batch,
              "answer_tokens": sum(len(a["ids"]) for a in answers), "threads": torch.get_num_threads(),
              "seconds": times, "median_seconds": {k: round(statistics.median(v), 2) for k, v in times.items()},
              "kl": kls}
    print(f"{len(prompts)} general prompts, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (median seconds):")
    for name, value in report["median_seconds"].items():
        print(f"  {name:7} {value:7.2f} s   KL {kls[name]}")
    if args.json:
        common.write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
