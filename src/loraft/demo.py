"""The offline demo: build a tiny Chinese BLOOM, fine-tune it with LoRA, and show what it learned.

Nothing is downloaded. The demo makes everything it needs:

1. A base model (built once, cached under $LORAFT_HOME/demo or ~/.cache/loraft/demo): a byte-level BPE
   tokenizer that covers Chinese, and a 4-layer BLOOM pretrained from scratch on a generated raw-text
   corpus. The corpus shows five skills (uppercase letters, digits to Chinese numerals, digits read in English,
   antonyms, word-by-word translation) in plain-text forms such as "小写：abc\\n大写：ABC", never in a chat format.
2. An instruction set in alpaca format (Chinese instructions, several phrasings per task) with a held-out
   split whose inputs appear neither in the training split nor in the pretraining corpus.
3. A LoRA fine-tune with `configs/demo.yaml` and the human_assistant template: the adapter has to teach the
   base to read a Chinese instruction in the "Human: ...\\n\\nAssistant: " format, apply the right skill to
   the input and stop with EOS.
4. Held-out exact match before (the base, same prompt, greedy) and after (base + adapter), and a short chat.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

# Bump when anything that shapes the base changes (corpus, tokenizer, model shape, pretraining recipe):
# a cached base with another version is rebuilt.
DEMO_BASE_VERSION = "2"
STAMP_FILE = "loraft_demo_base.json"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"  # package data: wheels ship it


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
    from loraft.rundir import write_text_atomically

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
    """loraft's cache root: $LORAFT_HOME, else ~/.cache/loraft."""
    from loraft.precision import cache_home

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
    It is built in a temporary directory and moved into place with os.replace, so an interrupted build
    never leaves a half-written base behind.

    Args:
        home: loraft's cache root (default: $LORAFT_HOME or ~/.cache/loraft).
        force: rebuild even when a matching base exists.
        recipe: model shape and pretraining schedule.
        log: where progress lines go.
    Returns:
        the base directory, loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained.
    """
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    home = Path(home) if home is not None else default_home()
    demo_dir = home / "demo"
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
    demo_dir.mkdir(parents=True, exist_ok=True)
    staging = demo_dir / f".base-building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
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
        if base_dir.exists():
            # Only a stale or forced base of our own cache is replaced here.
            shutil.rmtree(base_dir)
        os.replace(staging, base_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"demo base: built in {time.time() - started:.0f}s")
    return base_dir


# ---------------------------------------------------------------------------------------- evaluation
def _conversation(record: dict) -> list[dict]:
    """The user turn of an alpaca record, joined as the reference does: instruction + "\\n" + input."""
    return [{"role": "user", "content": "\n".join([record["instruction"], record.get("input") or ""])}]


def exact_match(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 100) -> dict:
    """Held-out exact match: greedy answers with the human_assistant prompt vs the reference outputs.

    Prompts are encoded and left-padded by loraft.generate.generate_batch, exactly as `loraft generate` does.

    Returns:
        {"overall": accuracy, "per_task": {task: {"correct", "total", "accuracy"}}, "predictions": [str]}.
    """
    from loraft.config import GenerationConfig
    from loraft.generate import generate_batch
    from loraft.templates import get_template

    settings = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    template = get_template("human_assistant")
    predictions = generate_batch(model, tokenizer, template, [_conversation(r) for r in records], settings, batch_size)
    per_task: dict[str, dict] = {}
    for record, prediction in zip(records, predictions):
        counts = per_task.setdefault(record.get("task", "all"), {"correct": 0, "total": 0})
        counts["total"] += 1
        counts["correct"] += int(prediction.strip() == record["output"].strip())
    for counts in per_task.values():
        counts["accuracy"] = counts["correct"] / counts["total"]
    correct = sum(c["correct"] for c in per_task.values())
    return {"overall": correct / max(1, len(records)), "per_task": per_task, "predictions": predictions}


# ------------------------------------------------------------------------------------------- the demo
def _answer_tokens(tokenizer, records: Sequence[dict]) -> int:
    return max(len(tokenizer(r["output"])["input_ids"]) for r in records)


def _results_table(before: dict, after: dict, heldout_count: int) -> list[str]:
    lines = [
        f"held-out exact match: {heldout_count} prompts whose inputs never appear in training; greedy decoding",
        f"  {'task':<22}{'before':>8}{'after':>8}",
    ]
    for family in TASK_FAMILIES:
        b, a = before["per_task"][family.name], after["per_task"][family.name]
        label = f"{family.name} {family.title}"
        # CJK characters take two columns in a terminal.
        pad = 22 - len(label) - sum(1 for c in family.title if ord(c) > 0x2E80)
        lines.append(f"  {label}{' ' * pad}{b['accuracy']:>8.0%}{a['accuracy']:>8.0%}   ({a['correct']}/{a['total']})")
    lines.append(f"  {'overall':<22}{before['overall']:>8.0%}{after['overall']:>8.0%}")
    return lines


def _sample_chat(heldout: Sequence[dict], before: dict, after: dict, count: int = 3) -> list[str]:
    """The first held-out prompt of `count` different task families, with both models' answers."""
    lines = ["sample chat (held-out prompts, greedy):"]
    shown: set[str] = set()
    for index, record in enumerate(heldout):
        if record["task"] in shown or len(shown) == count:
            continue
        shown.add(record["task"])
        lines.append(f"  Human: {record['instruction']}")
        lines.append(f"         {record['input']}")
        lines.append(f"  Assistant (base):        {before['predictions'][index].strip()!r}")
        lines.append(f"  Assistant (base + LoRA): {after['predictions'][index].strip()!r}")
        lines.append("")
    return lines


def _progress_callback(total_steps: int, log: Callable[[str], None]):
    """A TrainerCallback that prints the fine-tune's Progress lines (step, latest logged loss, ETA)."""
    from transformers import TrainerCallback

    class FineTuneProgress(TrainerCallback):
        def __init__(self):
            self.progress = Progress("fine-tune step", total_steps, log)
            self.loss = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update(state.global_step, f"loss {self.loss:.3f}" if self.loss is not None else "")

    return FineTuneProgress()


def run_demo(
    workdir: str | Path = "loraft-demo",
    overwrite: bool = False,
    home: Optional[Path] = None,
    config_path: Optional[Path] = None,
    seed: int = 0,
    force_base: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole demo: base, data, before, LoRA fine-tune, after, table and a short chat.

    Args:
        workdir: where the demo writes its data (`data/`), run directory (`run/`) and `demo_results.json`.
        overwrite: replace a previous demo run in workdir.
        home: cache root for the base (default: $LORAFT_HOME or ~/.cache/loraft).
        config_path: the run config (default: configs/demo.yaml); model, data and output paths are filled in.
        seed: seed for the generated instruction set.
        force_base: rebuild the base even when cached.
    Returns:
        {"before", "after", "run_dir", "timings"}; before/after as returned by exact_match.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraft.config import load_config
    from loraft.errors import RunError
    from loraft.precision import resolve_device, resolve_precision
    from loraft.train import train, write_json_atomically

    workdir = Path(workdir)
    run_dir = workdir / "run"
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunError(f"{run_dir}: holds a previous demo run; pass --overwrite to replace it")
    timings: dict[str, float] = {}
    started = time.time()
    log("[1/5] base model")
    base_dir = build_demo_base(home, force=force_base, log=log)
    timings["base"] = time.time() - started
    skills = json.loads((base_dir / STAMP_FILE).read_text(encoding="utf-8")).get("raw_form_accuracy") or {}
    log("  the base's skills asked in their pretraining form (e.g. \"小写：abc\\n大写：\"), held-out inputs: "
        + ", ".join(f"{task} {accuracy:.0%}" for task, accuracy in skills.items()))

    demo_started = time.time()
    train_path, heldout_path = write_demo_data(workdir / "data", seed=seed)
    heldout = read_jsonl(heldout_path)
    config = load_config(config_path or DEFAULT_CONFIG, [
        f"model.name_or_path={base_dir}", f"data.path={train_path}", f"output_dir={run_dir}", "overwrite=true",
    ])
    log(f"[2/5] data: {len(read_jsonl(train_path))} training and {len(heldout)} held-out records, "
        f"{len(TASK_FAMILIES)} task families ({', '.join(TASKS)}) -> {train_path.parent}")

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    max_new_tokens = _answer_tokens(tokenizer, heldout) + 4
    device = resolve_device(config.model.device)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
    step_started = time.time()
    before = exact_match(base, tokenizer, heldout, max_new_tokens)
    timings["eval_before"] = time.time() - step_started
    log(f"[3/5] before: the base model, same prompts: exact match {before['overall']:.1%} "
        f"({timings['eval_before']:.0f}s)")

    precision = resolve_precision(config.train.precision, config.model.device)
    log(f"[4/5] LoRA fine-tune: r={config.adapter.r} on {config.adapter.target_modules}, "
        f"{config.train.max_steps} steps x {config.train.per_device_train_batch_size} samples, {precision} on "
        f"{device.type}")
    step_started = time.time()
    # loraft's training stage, exactly as `loraft train` runs it
    run_dir = train(config, callbacks=[_progress_callback(config.train.max_steps, log)], progress_bar=False)
    timings["finetune"] = time.time() - step_started

    tuned = PeftModel.from_pretrained(base, run_dir).eval()
    step_started = time.time()
    after = exact_match(tuned, tokenizer, heldout, max_new_tokens)
    timings["eval_after"] = time.time() - step_started
    timings["demo"] = time.time() - demo_started
    log(f"[5/5] after: base + LoRA adapter: exact match {after['overall']:.1%} ({timings['eval_after']:.0f}s)")

    lines = [""] + _results_table(before, after, len(heldout)) + [""] + _sample_chat(heldout, before, after)
    lines.append(
        f"times: base {timings['base']:.0f}s, demo {timings['demo']:.0f}s (fine-tune {timings['finetune']:.0f}s, "
        f"evaluation {timings['eval_before'] + timings['eval_after']:.0f}s)"
    )
    lines.append(f"run directory: {run_dir}  (try: loraft chat {run_dir})")
    for line in lines:
        log(line)
    results = {"before": before, "after": after, "run_dir": str(run_dir), "timings": timings, "base_dir": str(base_dir)}
    write_json_atomically(workdir / "demo_results.json", results)
    return {**results, "run_dir": run_dir}
