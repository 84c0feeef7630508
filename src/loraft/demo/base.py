"""The demo's base model: a byte-level BPE tokenizer with BLOOM's pre-tokenizer that covers Chinese, and a tiny
BLOOM pretrained from scratch on the tasks' raw-text corpus.

The base built by this code ships with loraft as package data (PREBUILT_DIR, demo/prebuilt/: fp16 safetensors,
tokenizer, and the stamp: version, recipe, measured skills, build seconds), so `loraft demo` needs no pretraining.
`loraft demo --rebuild-base` (build_demo_base with force) pretrains it anew into loraft.files.cache_dir("demo")
($LORAFT_HOME/demo). After a change to anything that shapes the base (tokenizer, corpus, model shape, recipe):
bump DEMO_BASE_VERSION and refresh the shipped copy from a source checkout with

    python -c "from loraft.demo import ship_demo_base; ship_demo_base()"

(1000 pretraining steps: about 20 minutes on a quiet 2-core AVX2-only EPYC at the ~1.2 s per step measured there); tests/test_demo.py fails while the shipped stamp and the code disagree.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from loraft.demo.tasks import TASK_FAMILIES, make_records, pretraining_documents
from loraft.files import cache_dir, cache_home, staged_directory

# Bump when anything that shapes the base changes (corpus, tokenizer, model shape, pretraining recipe):
# a cached base with another version is rebuilt.
DEMO_BASE_VERSION = "4"
STAMP_FILE = "loraft_demo_base.json"
# The base built by this code, shipped as package data (refresh it with ship_demo_base()).
PREBUILT_DIR = Path(__file__).resolve().parent / "prebuilt"


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


# BLOOM's own normalizer (none) and pre-tokenizer, as in bigscience/bloom's tokenizer.json. llama.cpp implements
# exactly this one (its "bloom" pre-tokenizer type), so a base tokenized this way can be exported to GGUF.
BLOOM_SPLIT_PATTERN = " ?[^(\\s|[.,!?…。，、।۔،])]+"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3


def demo_characters() -> str:
    """The non-ASCII characters the demo tokenizer keeps as single tokens: CJK punctuation (U+3000-303F), the
    full-width forms of ASCII (U+FF01-FF5E), the general punctuation Chinese text uses, and the common hanzi."""
    cjk_punctuation = "".join(chr(code) for code in range(0x3000, 0x3040))
    full_width = "".join(chr(code) for code in range(0xFF01, 0xFF5F))
    return cjk_punctuation + full_width + "“”‘’…—–·" + common_chinese_characters()


def bloom_pre_tokenizer():
    """BLOOM's pre-tokenizer: words (with at most one leading space) split off at whitespace and punctuation,
    then bytes mapped to the byte-level alphabet."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _wrap(tokenizer, add_bos: bool):
    """A tokenizers.Tokenizer as a transformers fast tokenizer with `<unk>` `<s>` `</s>` `<pad>`; like BLOOM, no
    BOS is added unless add_bos (Llama-style)."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer.decoder = decoders.ByteLevel()
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


def build_demo_tokenizer(characters: Optional[str] = None):
    """The demo's tokenizer: a byte-level BPE written down by hand (deterministic, nothing trained) behind
    BLOOM's pre-tokenizer and normalizer, as a transformers fast tokenizer.

    Vocabulary: `<unk>` `<s>` `</s>` `<pad>` (ids 0..3), the 256 byte-level symbols, and each of `characters`
    (default: demo_characters()) as one token, made by merging its first two bytes, then the third. No merge
    joins two ASCII bytes, so every letter, digit, space and punctuation mark stays one token ("abc" -> "ABC",
    "305" -> "三零五" are one-token-to-one-token mappings a tiny model can learn), and since no merge crosses a
    character, the tokens do not depend on where the pre-tokenizer splits. Other text still encodes, byte by byte.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    to_symbols = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens = list(SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    first_pairs: dict[tuple[str, str], None] = {}  # ordered sets: the merge ranks
    third_bytes: dict[tuple[str, str], None] = {}
    for character in characters if characters is not None else demo_characters():
        symbols = to_symbols.pre_tokenize_str(character)[0][0]
        if len(symbols) not in (2, 3):
            raise ValueError(f"{character!r}: only 2- and 3-byte UTF-8 characters can be single tokens")
        first_pairs[(symbols[0], symbols[1])] = None
        if len(symbols) == 3:
            third_bytes[(symbols[:2], symbols[2])] = None
    merges = list(first_pairs) + list(third_bytes)
    tokens += ["".join(merge) for merge in merges]  # ids in merge order, as a trained BPE numbers them
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = bloom_pre_tokenizer()
    return _wrap(tokenizer, add_bos=False)


def build_tokenizer(texts: Sequence[str], vocab_size: int = 4096, add_bos: bool = False):
    """Train a byte-level BPE (deterministic, GPT-2's pre-tokenizer) on `texts` and wrap it as a transformers fast
    tokenizer: the tokenizer of the tests' tiny random models. Special tokens and BOS as in build_demo_tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer, add_bos)


# ------------------------------------------------------------------------------------------ base model
@dataclass(frozen=True)
class BaseRecipe:
    """Shape and pretraining schedule of the demo base (part of the stamp the shipped and cached bases are checked
    against). The vocabulary is not a setting: build_demo_tokenizer fixes it."""

    hidden_size: int = 256
    n_layer: int = 4
    n_head: int = 8
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000  # the base ships prebuilt, so only `loraft demo --rebuild-base` pays for these (README)
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


def _matching_stamp(base_dir: Path, stamp: dict) -> bool:
    """Whether `base_dir` holds a base whose stamp has this version and recipe."""
    try:
        existing = json.loads((base_dir / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return {key: existing.get(key) for key in stamp} == stamp


def build_demo_base(
    home: Optional[Path] = None,
    force: bool = False,
    recipe: BaseRecipe = BaseRecipe(),
    log: Callable[[str], None] = print,
) -> Path:
    """The demo base: the copy shipped with loraft (PREBUILT_DIR) when its stamp matches this version and recipe,
    else the cached build in `<home>/demo/base` when its stamp matches, else a new build there.

    A build makes the tokenizer (build_demo_tokenizer), pretrains a tiny BLOOM and saves both with
    save_pretrained, the weights in fp16 (the skills are measured on exactly those weights). It runs in a staged
    directory (loraft.files.staged_directory) renamed into place, so an interrupted build never leaves a
    half-written base behind.

    Args:
        home: loraft's cache root (default: loraft.files.cache_home(), $LORAFT_HOME or ~/.cache/loraft).
        force: build anew into the cache, ignoring the shipped and cached bases.
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
    if not force and _matching_stamp(PREBUILT_DIR, stamp):
        log(f"demo base: shipped with loraft ({PREBUILT_DIR})")
        return PREBUILT_DIR
    if not force and _matching_stamp(base_dir, stamp):
        log(f"demo base: reusing {base_dir}")
        return base_dir

    log(f"demo base: building {base_dir} (one time, a few minutes)")
    started = time.time()
    # Only a stale or forced base of our own cache is replaced; an interrupted build leaves the old one.
    with staged_directory(base_dir) as staging:
        tokenizer = build_demo_tokenizer()
        log(f"  tokenizer: {len(tokenizer)} tokens, BLOOM's pre-tokenizer ({time.time() - started:.0f}s)")

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
        # fp16 halves what ships; the skills below are measured on the fp16 weights, read back as fp32
        model.to(device="cpu", dtype=torch.float16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        model.float()
        log("  checking the base's skills in their pretraining form")
        _, heldout = make_records(seed=0)
        skills = raw_form_accuracy(model, tokenizer, heldout)

        seconds = time.time() - started
        payload = {**stamp, "parameters": parameters, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                   "raw_form_accuracy": skills, "build_seconds": round(seconds, 1)}
        (staging / STAMP_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    log(f"demo base: built in {time.time() - started:.0f}s")
    return base_dir


def ship_demo_base(home: Optional[Path] = None, log: Callable[[str], None] = print) -> Path:
    """Rebuild the demo base (build_demo_base with force) and copy it over the shipped one, PREBUILT_DIR.

    For a source checkout, after anything that shapes the base changed (and DEMO_BASE_VERSION was bumped);
    tests/test_demo.py fails until the shipped stamp matches the code again.

    Returns:
        PREBUILT_DIR.
    """
    built = build_demo_base(home, force=True, log=log)
    with staged_directory(PREBUILT_DIR) as staging:
        staging.chmod(0o755)  # package data: readable by everyone (the staging directory starts private)
        for item in sorted(built.iterdir()):
            if item.is_file():
                shutil.copyfile(item, staging / item.name)
                (staging / item.name).chmod(0o644)
    size = sum(item.stat().st_size for item in PREBUILT_DIR.iterdir())
    log(f"demo base: shipped copy refreshed in {PREBUILT_DIR} ({size / 1e6:.1f} MB)")
    return PREBUILT_DIR
