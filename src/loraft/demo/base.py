"""The demo's base model: a byte-level BPE tokenizer that covers Chinese and a tiny BLOOM pretrained from scratch
on the tasks' raw-text corpus, built once and cached under loraft.files.cache_dir("demo") ($LORAFT_HOME/demo)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from loraft.demo.tasks import TASK_FAMILIES, make_records, pretraining_documents
from loraft.files import cache_dir, cache_home, staged_directory

# Bump when anything that shapes the base changes (corpus, tokenizer, model shape, pretraining recipe):
# a cached base with another version is rebuilt.
DEMO_BASE_VERSION = "2"
STAMP_FILE = "loraft_demo_base.json"


# ------------------------------------------------------------------------------------------- tokenizer
def common_chinese_characters() -> str:
    """The 3755 level-1 characters of GB2312 (the common hanzi), decoded with Python's own codec."""
    characters = []
    for high in range(0xB0, 0xD8):
        for low in range(0xA1, 0xFF):
            try:
                characters.append(bytes([high, low]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return "".join(characters)


def build_tokenizer(texts: Sequence[str], vocab_size: int = 4096, split_characters: bool = True,
                    add_bos: bool = False):
    """Train a byte-level BPE (deterministic) and wrap it as a transformers fast tokenizer.

    With split_characters (the demo's), letters, digits and CJK characters are split into single characters
    before BPE, so "abc" -> "ABC" and "123" -> "一二三" are one-token-to-one-token mappings the tiny model can
    learn; byte-level BPE still covers any text. Special tokens: `<unk>` `<s>` `</s>` `<pad>`. Like BLOOM, no
    BOS is added unless add_bos (Llama-style).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[A-Za-z0-9\u3400-\u4dbf\u4e00-\u9fff]"), behavior="isolated"), byte_level,
    ]) if split_characters else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )


# ------------------------------------------------------------------------------------------ base model
@dataclass(frozen=True)
class BaseRecipe:
    """Shape and pretraining schedule of the demo base (part of the cache stamp)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    n_layer: int = 4
    n_head: int = 8
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500  # sized for fp32 on an AVX2-only CPU (README: times per hardware class)
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    precision: str = "auto"  # resolved by loraft.precision: bf16 only where this machine runs it fast


def default_home() -> Path:
    """loraft's cache root (loraft.files.cache_home: $LORAFT_HOME, else ~/.cache/loraft)."""
    return cache_home()


class Progress:
    """Progress lines for long work: `label N/TOTAL detail, Ns elapsed, ~Ns left`.

    A line is printed after `first` seconds, then at least every `interval` seconds, and at the end, so a
    slow machine shows it is working (and for how much longer) whatever its speed.
    """

    def __init__(self, label: str, total: int, log: Callable[[str], None], interval: float = 20.0,
                 first: float = 5.0):
        self.label, self.total, self.log = label, total, log
        self.interval, self.first = interval, first
        self.started = self.last = time.time()
        self.printed = 0

    def update(self, done: int, detail: str = "") -> None:
        now = time.time()
        wait = self.first if not self.printed else self.interval
        if done < self.total and now - self.last < wait:
            return
        elapsed = now - self.started
        remaining = elapsed / max(done, 1) * (self.total - done)
        detail = f"  {detail}" if detail else ""
        self.log(f"  {self.label} {done}/{self.total}{detail}  {elapsed:.0f}s elapsed, ~{remaining:.0f}s left")
        self.last, self.printed = now, self.printed + 1


def _stamp(recipe: BaseRecipe) -> dict:
    return {"version": DEMO_BASE_VERSION, "recipe": asdict(recipe)}


def _packed_batches(tokenizer, recipe: BaseRecipe, device=None) -> Iterator:
    """Batches of `seq_len` tokens cut from the document stream, documents separated by EOS."""
    import torch

    documents = pretraining_documents(recipe.seed + 1)
    buffer: list[int] = []
    needed = recipe.batch_size * recipe.seq_len
    while True:
        while len(buffer) < needed:
            buffer.extend(tokenizer(next(documents))["input_ids"] + [tokenizer.eos_token_id])
        chunk, buffer = buffer[:needed], buffer[needed:]
        yield torch.tensor(chunk, device=device).view(recipe.batch_size, recipe.seq_len)


def _pretrain(model, tokenizer, recipe: BaseRecipe, log: Callable[[str], None]) -> list[float]:
    """Full training of the base on the raw-text corpus: AdamW, warmup + cosine decay, and bf16 autocast
    where loraft.precision finds bf16 fast on this machine (fp32 elsewhere).

    A plain loop rather than Trainer: an endless packed stream and nothing to checkpoint.
    Returns the loss at every step.
    """
    import torch

    from loraft.precision import resolve_device, resolve_precision

    device = resolve_device("auto")
    # fp16 would need loss scaling; the tiny base trains in fp32 wherever bf16 is not the fast choice
    bf16 = resolve_precision(recipe.precision, str(device)) == "bf16"
    log(f"  pretraining on {device.type}, {'bf16 autocast' if bf16 else 'fp32'}")
    model.to(device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return recipe.learning_rate * (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses: list[float] = []
    progress = Progress("pretrain step", recipe.steps, log)
    batches = _packed_batches(tokenizer, recipe, device)
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        input_ids = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        recent = losses[-50:]
        progress.update(step + 1, f"loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return losses


def raw_form_accuracy(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 32) -> dict:
    """Exact match when the skill is asked in its pretraining form ("小写：abc\\n大写：", answer = the next line).

    A check of the base alone: it shows the skills are in the base, so a low chat-format score before the
    fine-tune measures the missing instruction following, not a missing skill.

    Returns:
        {task: accuracy} over `records`.
    """
    import torch

    correct: dict[str, list[int]] = {}
    for family in TASK_FAMILIES:
        chosen = [r for r in records if r["task"] == family.name]
        if not chosen:
            continue
        prompts = [family.raw_forms[0].split("{y}")[0].format(x=r["input"]) for r in chosen]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        with torch.inference_mode():
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        correct[family.name] = [int(a.split("\n")[0].strip() == r["output"]) for a, r in zip(answers, chosen)]
    return {task: sum(hits) / len(hits) for task, hits in correct.items()}


def build_demo_base(
    home: Optional[Path] = None,
    force: bool = False,
    recipe: BaseRecipe = BaseRecipe(),
    log: Callable[[str], None] = print,
) -> Path:
    """Build (or reuse) the demo base: tokenizer + pretrained tiny BLOOM, saved with save_pretrained.

    The base lives in `<home>/demo/base` and is reused when its stamp matches this version and recipe.
    It is built in a staged directory (loraft.files.staged_directory) and renamed into place, so an interrupted
    build never leaves a half-written base behind.

    Args:
        home: loraft's cache root (default: loraft.files.cache_home(), $LORAFT_HOME or ~/.cache/loraft).
        force: rebuild even when a matching base exists.
        recipe: model shape and pretraining schedule.
        log: where progress lines go.
    Returns:
        the base directory, loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained.
    """
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    demo_dir = Path(home) / "demo" if home is not None else cache_dir("demo")
    base_dir = demo_dir / "base"
    stamp = _stamp(recipe)
    stamp_path = base_dir / STAMP_FILE
    if not force and stamp_path.is_file():
        try:
            existing = json.loads(stamp_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing and {k: existing.get(k) for k in stamp} == stamp:
            log(f"demo base: reusing {base_dir}")
            return base_dir

    log(f"demo base: building {base_dir} (one time, a few minutes)")
    started = time.time()
    # Only a stale or forced base of our own cache is replaced; an interrupted build leaves the old one.
    with staged_directory(base_dir) as staging:
        documents = pretraining_documents(recipe.seed)
        corpus = [next(documents) for _ in range(5000)]
        instruction_text = [text for family in TASK_FAMILIES for text in family.instructions]
        tokenizer = build_tokenizer(corpus + instruction_text + [common_chinese_characters()], recipe.vocab_size)
        log(f"  tokenizer: {len(tokenizer)} tokens ({time.time() - started:.0f}s)")

        torch.manual_seed(recipe.seed)
        config = BloomConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, n_layer=recipe.n_layer, n_head=recipe.n_head,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = BloomForCausalLM(config)
        parameters = sum(p.numel() for p in model.parameters())
        log(f"  model: BLOOM {recipe.n_layer} layers x {recipe.hidden_size} wide, {parameters / 1e6:.1f}M parameters")
        losses = _pretrain(model, tokenizer, recipe, log)
        log("  checking the base's skills in their pretraining form")
        _, heldout = make_records(seed=0)
        skills = raw_form_accuracy(model, tokenizer, heldout)

        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        seconds = time.time() - started
        payload = {**stamp, "parameters": parameters, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                   "raw_form_accuracy": skills, "build_seconds": round(seconds, 1)}
        (staging / STAMP_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    log(f"demo base: built in {time.time() - started:.0f}s")
    return base_dir
