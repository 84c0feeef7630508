"""Preference tuning (train.objective dpo, kto, orpo) on tiny random models: TRL's losses on loraft's data, with the
run directory's guarantees.

Invariants, not stored numbers: the first DPO loss is ln 2 (policy = reference); loraft's DPO loss and gradients
equal TRL's DPOTrainer run directly on the same conversations; the reference keeps one copy of the base weights;
KTO and ORPO lower their loss; a SIGKILLed DPO run resumes to a bit-equal adapter; two processes log one
process's losses.
"""

from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import one_thread, write_alpaca
from loraft.config import load_config, save_config
from loraft.errors import ConfigError, DataError, RunError
from loraft.train import train

PAIRS = [
    {"instruction": "请计算 12 加 30 等于多少", "input": "", "chosen": "答案是 42。", "rejected": "今天天气很好"},
    {"instruction": "北京是哪个国家的首都", "input": "", "chosen": "北京是中国的首都。", "rejected": "ABC"},
    {"instruction": "把字母变成大写：abc", "input": "", "chosen": "ABC", "rejected": "abc"},
    {"instruction": "写一首关于春天的诗", "input": "", "chosen": "春眠不觉晓，处处闻啼鸟。", "rejected": "1 2 3"},
]
HOOK = Path(__file__).parent / "kill_hook"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_bloom_dir):
    root = tmp_path_factory.mktemp("preference")
    _write_jsonl(root / "pairs.jsonl", PAIRS * 4)
    return root


def _overrides(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.path={data}", f"output_dir={out}", "train.max_steps=4",
            "train.logging_steps=1", "train.save_steps=2", "train.precision=fp32", "train.learning_rate=0.01",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
            "train.sampling=sequential", "adapter.target_modules=[query_key_value]", *extra]


@pytest.fixture(scope="module")
def sft_run(workdir, tiny_bloom_dir) -> Path:
    data = write_alpaca(workdir / "alpaca.jsonl", repeat=2)
    return train(load_config(None, _overrides(tiny_bloom_dir, data, workdir / "sft")), progress_bar=False)


class Capture(TrainerCallback):
    """The model training sees, and the gradients of the first optimizer step (before the update)."""

    def __init__(self):
        self.model, self.trainer_model, self.gradients = None, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        model = model or self.model
        if self.gradients is None:
            self.gradients = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
                              if parameter.requires_grad and parameter.grad is not None}


def test_first_dpo_loss_is_ln2_from_scratch_and_from_sft(workdir, tiny_bloom_dir, sft_run):
    for name, extra in (("dpo-scratch", ()), ("dpo-from-sft", (f"model.adapter_from={sft_run}",))):
        run = train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / name,
                                                 "train.objective=dpo", *extra)), progress_bar=False)
        logged = _metrics(run)
        # sigmoid loss with policy = reference: -log sigmoid(0) = ln 2, exactly up to float rounding
        assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), name
        assert logged[-1]["loss"] < logged[0]["loss"], name
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(logged[-1])
        record = json.loads((run / "loraft_run.json").read_text())
        assert record["status"] == "finished" and record["objective"] == "dpo"
        assert record["identity"]["train.objective"] == "dpo"
        from PIL import Image

        with Image.open(run / "loss.png") as image:  # the loss panel and the rewards panel below it
            assert image.size[1] > 600


def test_dpo_from_sft_continues_its_adapter_and_saves_only_that(workdir, tiny_bloom_dir, sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = workdir / "dpo-from-sft"  # trained by the ln 2 test
    if not (run / "adapter_model.safetensors").is_file():
        pytest.skip("needs test_first_dpo_loss_is_ln2_from_scratch_and_from_sft")
    sft, dpo = load_file(sft_run / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert set(sft) == set(dpo)  # the same adapter (no "ref" copy saved), trained further
    assert any(not torch.equal(sft[name], dpo[name]) for name in sft)
    for checkpoint in (run / "checkpoints").glob("checkpoint-*"):
        assert set(load_file(checkpoint / "adapter_model.safetensors")) == set(sft)
        assert not (checkpoint / "ref").exists()
    config = load_config(run / "config.yaml")
    assert config.model.adapter_from == str(sft_run)
    assert config.adapter == load_config(sft_run / "config.yaml").adapter
    record = json.loads((run / "loraft_run.json").read_text())
    assert record["identity"]["model.adapter_from"]["path"] == str(sft_run.resolve())
    # plain peft loads it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir), str(run))
    assert model(torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size


def _base_storage(model) -> tuple[int, int]:
    """(numel of the distinct storages of frozen base parameters, numel of the base model's parameters)."""
    seen, frozen = set(), 0
    for name, parameter in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        pointer = parameter.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            frozen += parameter.numel()
    base = model.get_base_model()
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    return frozen, total


@pytest.mark.parametrize("from_sft", [False, True], ids=["scratch", "from-sft"])
def test_the_reference_keeps_one_copy_of_the_base_weights(workdir, tiny_bloom_dir, sft_run, from_sft):
    capture = Capture()
    extra = (f"model.adapter_from={sft_run}",) if from_sft else ()
    train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / f"storage-{from_sft}",
                                       "train.objective=dpo", "train.max_steps=1", *extra)),
          callbacks=[capture], progress_bar=False)
    model = capture.model
    frozen, total = _base_storage(model)
    assert frozen == total  # every base weight once, shared by the policy and the reference
    # the reference: with adapter_from the SFT adapter's frozen copy beside the trained one, else the adapter off
    assert ("ref" in model.peft_config) is from_sft
    if from_sft:
        reference = {n: p for n, p in model.named_parameters() if ".ref." in n}
        assert reference and not any(p.requires_grad for p in reference.values())
        sft = load_file(sft_run / "adapter_model.safetensors")
        lora_a = next(n for n in reference if "lora_A" in n)
        saved = next(v for k, v in sft.items() if k.endswith(lora_a.split("transformer.", 1)[1].replace(".ref", "")))
        assert torch.equal(reference[lora_a].detach(), saved)


def _trl_dpo_direct(model_dir: Path, rows: list[dict], out: Path, capture: Capture, template_jinja: str):
    """TRL's DPOTrainer as its documentation shows, on the conversations in TRL's conversational format, with the
    run's template as the tokenizer's chat_template: returns its train dataset (token ids) and log history."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from loraft.config import AdapterConfig
    from loraft.model import build_peft_config

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template_jinja
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["instruction"]}],
                                  "chosen": [{"role": "assistant", "content": row["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows])
    args = DPOConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, learning_rate=0.01,
                     bf16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none",
                     train_sampling_strategy="sequential", seed=42, max_length=256)
    adapter = AdapterConfig(target_modules=["query_key_value"])
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=build_peft_config(adapter), callbacks=[capture])
    trainer.train()
    return trainer.train_dataset, trainer.state.log_history


def test_dpo_loss_and_gradients_equal_trls_dpotrainer(workdir, tiny_bloom_dir):
    from loraft.model import load_tokenizer
    from loraft.objectives import dpo
    from loraft.templates import get_template

    config = load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / "parity",
                                          "train.objective=dpo", "train.max_steps=1",
                                          "train.per_device_train_batch_size=4"))
    ours = Capture()
    run = train(config, callbacks=[ours], progress_bar=False)
    theirs = Capture()
    tokenizer = load_tokenizer(str(tiny_bloom_dir))
    template = get_template(config.data.template, tokenizer)
    trl_data, history = _trl_dpo_direct(tiny_bloom_dir, PAIRS * 4, workdir / "trl-direct", theirs, template.jinja)
    # the same token ids: loraft's encoding of the pairs is what TRL makes of the same conversations
    prepared = dpo.prepare(config, tokenizer)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert prepared.train[column] == trl_data[column], column
    trl_loss = next(entry["loss"] for entry in history if "loss" in entry)
    assert _metrics(run)[0]["loss"] == pytest.approx(trl_loss, abs=1e-5)
    assert set(ours.gradients) == set(theirs.gradients) and ours.gradients
    for name, gradient in ours.gradients.items():
        torch.testing.assert_close(gradient, theirs.gradients[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("objective", ["kto", "orpo"])
def test_kto_and_orpo_train_and_lower_their_loss(workdir, tiny_bloom_dir, objective):
    data = workdir / "pairs.jsonl"
    if objective == "kto":  # KTO from unpaired records: desirable and undesirable completions
        rows = [{"prompt": pair["instruction"], "completion": pair[side], "label": side == "chosen"}
                for pair in PAIRS * 2 for side in ("chosen", "rejected")]
        data = _write_jsonl(workdir / "unpaired.jsonl", rows)
    run = train(load_config(None, _overrides(tiny_bloom_dir, data, workdir / objective, f"train.objective={objective}",
                                             "train.max_steps=6")), progress_bar=False)
    logged = _metrics(run)
    assert len(logged) == 6 and logged[-1]["loss"] < logged[0]["loss"]
    assert any(key.startswith("rewards/") or key == "kl" for key in logged[-1])
    assert json.loads((run / "loraft_run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_an_over_long_record_is_dropped_and_counted_and_the_run_trains(workdir, tiny_bloom_dir, objective):
    """The rule SFT follows (loraft.data): a record with no room for its completion is dropped and counted in the
    run's data report; it never stops the run (it did for pairs: one 234-token prompt at the demo's max_length)."""
    from loraft.rundir import DATA_REPORT_FILE, RUN_FILE

    long = dict(PAIRS[0], instruction="请回答这个很长的问题。" * 20)
    data = _write_jsonl(workdir / f"long-{objective}.jsonl", PAIRS * 4 + [long])
    run = train(load_config(None, _overrides(tiny_bloom_dir, data, workdir / f"long-{objective}",
                                             f"train.objective={objective}", "data.max_length=80",
                                             "train.max_steps=1")), progress_bar=False)
    report = json.loads((run / DATA_REPORT_FILE).read_text(encoding="utf-8"))
    assert report["dropped"] == {"no_response_token_after_truncation": 1}
    assert (report["samples_tokenized"], report["samples_kept"]) == (17, 16)
    assert json.loads((run / RUN_FILE).read_text(encoding="utf-8"))["status"] == "finished"


@pytest.mark.parametrize("fmt", ["preference_messages", "preference_sharegpt", "unpaired_sharegpt"])
def test_each_preference_format_trains(workdir, tiny_bloom_dir, fmt):
    if fmt == "preference_messages":
        rows = [{"prompt": [{"role": "user", "content": p["instruction"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]
    elif fmt == "preference_sharegpt":
        rows = [{"conversations": [{"from": "human", "value": p["instruction"]}],
                 "chosen": {"from": "gpt", "value": p["chosen"]}, "rejected": {"from": "gpt", "value": p["rejected"]}}
                for p in PAIRS]
    else:
        rows = [{"conversations": [{"from": "human", "value": p["instruction"]}],
                 "completion": {"from": "gpt", "value": p[side]}, "label": side == "chosen"}
                for p in PAIRS for side in ("chosen", "rejected")]
    data = _write_jsonl(workdir / f"{fmt}.jsonl", rows)
    objective = "kto" if fmt.startswith("unpaired") else "dpo"
    run = train(load_config(None, _overrides(tiny_bloom_dir, data, workdir / fmt, f"train.objective={objective}",
                                             "train.max_steps=2")), progress_bar=False)
    assert json.loads((run / "data_report.json").read_text())["format"] == fmt
    assert (run / "adapter_model.safetensors").is_file()


def test_refusals_are_one_sentence(workdir, tiny_bloom_dir, sft_run, tiny_llama_dir):
    unpaired = _write_jsonl(workdir / "refuse-unpaired.jsonl",
                            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d",
                                                                                  "label": False}])
    with pytest.raises(DataError, match="train.objective=dpo needs chosen/rejected pairs"):
        train(load_config(None, _overrides(tiny_bloom_dir, unpaired, workdir / "r1", "train.objective=dpo")))
    with pytest.raises(ConfigError, match="KTO estimates its KL term"):
        train(load_config(None, _overrides(tiny_bloom_dir, unpaired, workdir / "r2", "train.objective=kto",
                                           "train.per_device_train_batch_size=1")))
    with pytest.raises(ConfigError, match="its adapter was trained on"):
        train(load_config(None, _overrides(tiny_llama_dir, workdir / "pairs.jsonl", workdir / "r3",
                                           "train.objective=dpo", f"model.adapter_from={sft_run}")))
    with pytest.raises(DataError, match="train on them with train.objective=dpo, kto or orpo"):
        train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / "r4")))


def test_resume_with_another_sft_run_is_refused(workdir, tiny_bloom_dir, sft_run):
    import shutil

    other = workdir / "sft-copy"
    shutil.copytree(sft_run, other)
    record = json.loads((other / "loraft_run.json").read_text())
    record["finished"] = record["finished"] + 1  # another training of the same directory
    (other / "loraft_run.json").write_text(json.dumps(record))
    out = workdir / "identity"
    config = load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", out, "train.objective=dpo",
                                          "train.max_steps=2", f"model.adapter_from={other}"))
    train(config, progress_bar=False)
    run_record = json.loads((out / "loraft_run.json").read_text())
    run_record["status"] = "interrupted"  # as if killed after its checkpoint-2
    (out / "loraft_run.json").write_text(json.dumps(run_record))
    record["finished"] += 1
    (other / "loraft_run.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"--resume refused: model.adapter_from.finished changed"):
        train(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 4})}), resume=True)


@pytest.fixture(scope="module")
def dpo_process(workdir, tiny_bloom_dir, sft_run):
    """A 6-step DPO run from the SFT run: run(name, KILL_ON=... or SIGNAL_ON=...) is `loraft train` in its own process
    (one thread) with tests/kill_hook or tests/signal_hook loaded, resume(name) its `--resume` in this process (one
    thread: the interruption is the process's part); and the adapter of the uninterrupted run, trained here on one
    thread, as every run it is compared with."""
    from loraft.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("KILL_ON", "SIGNAL_ON"):
        env.pop(name, None)
    # one sitecustomize is imported: the hook the run asks for
    hooks = {"KILL_ON": HOOK, "SIGNAL_ON": Path(__file__).parent / "signal_hook"}

    def config(name: str) -> Path:
        path = workdir / f"{name}.yaml"
        save_config(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / name,
                                                 "train.objective=dpo", "train.max_steps=6",
                                                 f"model.adapter_from={sft_run}")), path)
        return path

    def run(name: str, **hook) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "loraft.cli", "train", str(config(name))]
        paths = [str(hooks[name]) for name in hook] + [os.environ.get("PYTHONPATH", "")]
        run_env = {**env, **hook, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        return subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=600)

    def resume(name: str) -> None:
        with one_thread():
            assert main(["train", str(workdir / f"{name}.yaml"), "--resume"]) == 0

    with one_thread():
        reference = train(load_config(config("resume-reference")), progress_bar=False)
    return run, resume, load_file(reference / "adapter_model.safetensors")


@pytest.mark.parametrize("interruption", ["sigkill", "graceful-stop"])
def test_an_interrupted_dpo_run_resumes_to_a_bit_equal_adapter(workdir, dpo_process, interruption):
    run, resume, expected = dpo_process
    name = f"resume-{interruption}"
    if interruption == "sigkill":  # killed inside the second checkpoint's move into place
        interrupted = run(name, KILL_ON="os.rename|checkpoints/checkpoint-4")
        assert interrupted.returncode == -signal.SIGKILL
        kept = ["checkpoint-2"]
    else:  # `loraft stop`'s SIGTERM as checkpoint-2 lands: the next step ends with a checkpoint
        from loraft.cli import STOPPED_EXIT_CODE

        interrupted = run(name, SIGNAL_ON="SIGTERM@os.rename|checkpoints/checkpoint-2")
        assert interrupted.returncode == STOPPED_EXIT_CODE, interrupted.stderr[-3000:]
        assert json.loads((workdir / name / "loraft_run.json").read_text())["status"] == "stopped"
        kept = ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (workdir / name / "checkpoints").glob("checkpoint-*")) == kept
    resume(name)
    got = load_file(workdir / name / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    steps = [record["step"] for record in _metrics(workdir / name)]
    assert sorted(set(steps)) == list(range(1, 7))


def test_two_process_dpo_logs_the_losses_of_one_process(workdir, tiny_bloom_dir, sft_run):
    """torchrun: 2 ranks x 1 pair against 1 process x 2 pairs, in order (each step sees the same pairs)."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    common = ("train.objective=dpo", "train.max_steps=3", "train.learning_rate=0.05", f"model.adapter_from={sft_run}")
    single = train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / "dpo-1",
                                                *common)), progress_bar=False)
    out = workdir / "dpo-2"
    config_path = workdir / "dpo-2.yaml"
    save_config(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", out, *common,
                                             "train.per_device_train_batch_size=1")), config_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    audit = workdir / "dpo-2-writes"
    audit.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "LORAFT_HOME": str(workdir / "home-2"),
           # tests/write_audit logs each rank's writes under the run directory
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "write_audit"),
                                                       os.environ.get("PYTHONPATH")])),
           "WRITE_AUDIT_DIR": str(out.resolve()), "WRITE_AUDIT_LOG_DIR": str(audit)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "loraft.cli", "train", str(config_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    expected, logged = _metrics(single), _metrics(out)
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == [1, 2, 3]
    for one, many in zip(expected, logged):
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-4), many["step"]
        assert many["rewards/margins"] == pytest.approx(one["rewards/margins"], rel=1e-3, abs=1e-6), many["step"]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert json.loads((out / "loraft_run.json").read_text())["status"] == "finished"
    # only rank 0 writes the run directory: rank 1 makes the staged checkpoint folders for its RNG state (torch.save,
    # unseen by the audit), nothing else
    writes = [set((audit / f"rank{rank}.txt").read_text().splitlines()) for rank in range(2)]
    assert {"open metrics.jsonl", "open train.log"} <= writes[0]
    assert all(write.startswith("os.mkdir checkpoints") for write in writes[1]), writes[1]


def test_non_finite_dpo_loss_stops_and_keeps_the_last_good_checkpoint(workdir, tiny_bloom_dir):
    from loraft.trainer import NonFiniteTraining
    from test_rundir import PoisonAfter

    run_dir = workdir / "nonfinite"
    config = load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", run_dir, "train.objective=dpo",
                                          "train.max_steps=6"))
    with pytest.raises(NonFiniteTraining, match="training stopped at step 3: the loss is not finite"):
        train(config, callbacks=[PoisonAfter(2)], progress_bar=False)
    record = json.loads((run_dir / "loraft_run.json").read_text())
    assert record["status"] == "failed" and record["last_good_checkpoint"].endswith("checkpoint-2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_a_dpo_run_merges_and_generates_like_any_run(workdir, tiny_bloom_dir, sft_run, tmp_path):
    """Downstream takes a preference run as it takes an SFT run: merged logits equal the adapter's, and
    `loraft generate` answers with the saved template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraft.cli import main
    from loraft.export.merge import merge_run

    run = train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / "downstream",
                                             "train.objective=dpo", "train.max_steps=2",
                                             f"model.adapter_from={sft_run}")), progress_bar=False)
    merged = merge_run(run, tmp_path / "merged")
    probe = torch.tensor([[5, 6, 7, 8, 9]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir), str(run)).eval()
    with torch.no_grad():
        expected = adapted(probe).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(probe).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "请计算 12 加 30 等于多少", "input": ""}])
    assert main(["generate", str(run), "--input", str(prompts), "--output", str(tmp_path / "answers.jsonl"),
                 "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "answers.jsonl").read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=orpo", "preference.loss_type=ipo"], "preference.loss_type 'ipo' does not apply to "
                                                           "train.objective=orpo (it has one loss); leave it null"),
    (["train.objective=kto", "preference.loss_type=ipo"], "preference.loss_type 'ipo' is not one of "
                                                          "train.objective=kto's: kto, apo_zero_unpaired"),
    (["train.objective=kto", "preference.loss_type=[kto]"], "a list of losses is DPO's"),
    (["train.objective=dpo", "preference.loss_type=[sigmoid,sft]", "preference.loss_weights=[1.0]"],
     "preference.loss_weights has 1 weights for 2 loss types"),
    (["train.objective=dpo", "preference.loss_weights=[1.0]"], "preference.loss_weights weighs a list"),
    (["preference.beta=0"], "preference.beta input should be greater than 0"),
])
def test_preference_settings_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_a_list_of_dpo_losses_reaches_trl_with_its_weights(tmp_path):
    from loraft.objectives import dpo
    from loraft.plan import Plan

    config = load_config(None, ["train.objective=dpo", "preference.loss_type=[sigmoid,sft]",
                                "preference.loss_weights=[1.0,0.5]", "train.precision=fp32"])
    plan = Plan(device="cpu", precision="fp32", weights="fp32", micro_batch_tokens=0, samples_per_batch=1,
                accumulation=8, sampler="random", fused_loss=False, packing=False, model_type="bloom",
                speed_path="", attention=None, attention_patch=False, optimizer="adamw_torch",
                gradient_checkpointing=False, world_size=1, generation_dtype="fp32")
    args = dpo.arguments(config, plan, tmp_path, has_eval=False)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert args.gradient_checkpointing is False and args.bf16 is False  # the plan's, not TRL's defaults


def test_dpo_under_bf16_stores_frozen_weights_in_bf16_and_trains(workdir, tiny_bloom_dir):
    """The branch fp32 machines do not take: train.precision=bf16 (the plan's pick on AMX/Zen 4 and CUDA)."""
    capture = Capture()
    run = train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / "dpo-bf16",
                                             "train.objective=dpo", "train.precision=bf16", "train.max_steps=3")),
                callbacks=[capture], progress_bar=False)
    frozen = [p for n, p in capture.model.named_parameters() if "query_key_value.base_layer" in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    trained = [p for p in capture.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    logged = _metrics(run)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)  # bf16 autocast rounds the log-probs
    assert json.loads((run / "loraft_run.json").read_text())["plan"]["precision"] == "bf16"


@pytest.mark.parametrize("objective", ["kto", "orpo"])
def test_kto_and_orpo_continue_an_sft_run(workdir, tiny_bloom_dir, sft_run, objective):
    run = train(load_config(None, _overrides(tiny_bloom_dir, workdir / "pairs.jsonl", workdir / f"{objective}-from-sft",
                                             f"train.objective={objective}", "train.max_steps=2",
                                             f"model.adapter_from={sft_run}")), progress_bar=False)
    assert set(load_file(run / "adapter_model.safetensors")) == set(load_file(sft_run / "adapter_model.safetensors"))
    assert json.loads((run / "loraft_run.json").read_text())["adapter_from"] == str(sft_run.resolve())
