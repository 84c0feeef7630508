"""Several processes for real: `torchrun --nproc-per-node 2 -m loraft.cli train` on CPU (gloo, loopback only).

Each distributed run is compared with a single-process run of the same global batch in the parity mode: fp32,
and samples in order, so both runs put the same samples in each optimizer step (rank r of step k takes the r-th
per-device batch of the step's global batch). The alpaca records appear twice, so step 3 sees step 1's samples
again and its loss measures the two updates in between.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import write_alpaca
from loraft.batching import sample_lengths, split_by_tokens
from loraft.config import load_config, save_config
from loraft.data import prepare_datasets
from loraft.model import load_tokenizer
from loraft.train import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)

RANKS = 2
STEPS = 3
CHECKPOINT_STEPS = (2, 3)  # save_steps=2, and Trainer saves the last step
SUB_BATCH_TOKENS = 90
TORCHRUN_TIMEOUT = 180  # a run takes ~10 s; a collective mismatch between ranks hangs until this
WRITE_AUDIT = Path(__file__).parent / "write_audit"  # its sitecustomize.py logs each rank's writes
PROBE = torch.tensor([[10, 20, 30, 40, 50, 60, 70, 80], [5, 15, 25, 35, 45, 55, 65, 75]])


@dataclass
class Runs:
    single: Path  # one process, per-device batch RANKS x B
    ranks: Path  # torchrun, RANKS processes of per-device batch B
    output: str  # torchrun's stdout and stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    write_alpaca(root / "alpaca.jsonl", repeat=2)
    return root


def _overrides(model_dir: Path, root: Path, out: Path, extra) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", f"data.path={root / 'alpaca.jsonl'}", f"output_dir={out}",
        f"train.max_steps={STEPS}", "train.logging_steps=1", "train.save_steps=2", "train.learning_rate=0.01",
        "train.precision=fp32", "train.sampling=sequential", *extra,
    ]


def _single_process_run(model_dir: Path, root: Path, name: str, *extra: str) -> Path:
    out = root / name
    train(load_config(None, _overrides(model_dir, root, out, extra)))
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(model_dir: Path, root: Path, name: str, *extra: str) -> tuple[Path, str]:
    """Train `name` with `torchrun --nproc-per-node RANKS -m loraft.cli train`; returns (run dir, output).

    Each rank's writes under the run directory are logged to root/name-writes/rank{N}.txt (tests/write_audit).
    """
    out = (root / name).resolve()
    config_path = root / f"{name}.yaml"
    save_config(load_config(None, _overrides(model_dir, root, out, extra)), config_path)
    (root / f"{name}-writes").mkdir()
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        # an empty loraft home of its own, so the data cache misses: rank 0 tokenizes while rank 1 waits, then
        # reads it (the single-process run of the same data filled the session's cache)
        "LORAFT_HOME": str(root / f"{name}-home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(WRITE_AUDIT), os.environ.get("PYTHONPATH")])),
        "WRITE_AUDIT_DIR": str(out), "WRITE_AUDIT_LOG_DIR": str(root / f"{name}-writes"),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "loraft.cli", "train", str(config_path),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops its workers (each in a session of its own) on SIGTERM
        output, _ = process.communicate(timeout=120)
        pytest.fail(f"torchrun hung for {TORCHRUN_TIMEOUT} s (ranks waiting in different collectives?):\n"
                    f"{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return out, output


@pytest.fixture(scope="module")
def accumulated(tiny_bloom_dir, workdir) -> Runs:
    """Trainer's own accumulation, no sub-batches: 2 ranks x 1 sample x 2 micro-batches against 1 x 2 x 2."""
    common = ("train.micro_batch_tokens=0", "train.gradient_accumulation_steps=2")
    single = _single_process_run(tiny_bloom_dir, workdir, "accumulated-1", "train.per_device_train_batch_size=2",
                                 *common)
    ranks, output = _torchrun(tiny_bloom_dir, workdir, "accumulated-2", "train.per_device_train_batch_size=1",
                              *common)
    return Runs(single, ranks, output)


@pytest.fixture(scope="module")
def sub_batched(tiny_bloom_dir, workdir) -> Runs:
    """loraft's sub-batches of <= SUB_BATCH_TOKENS padded tokens: 2 ranks x 2 samples against 1 x 4."""
    common = (f"train.micro_batch_tokens={SUB_BATCH_TOKENS}", "train.gradient_accumulation_steps=1")
    single = _single_process_run(tiny_bloom_dir, workdir, "sub-batched-1", "train.per_device_train_batch_size=4",
                                 *common)
    ranks, output = _torchrun(tiny_bloom_dir, workdir, "sub-batched-2", "train.per_device_train_batch_size=2",
                              *common)
    return Runs(single, ranks, output)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _assert_same_logged_losses(runs: Runs) -> None:
    expected = [record for record in _metrics(runs.single) if "loss" in record]
    logged = [record for record in _metrics(runs.ranks) if "loss" in record]
    assert [record["step"] for record in logged] == [record["step"] for record in expected] == [1, 2, 3]
    for one, many in zip(expected, logged):
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-4), many["step"]
        assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), many["step"]
        assert many["num_input_tokens_seen"] == one["num_input_tokens_seen"]
    # step 3 repeats step 1's samples: its lower loss is the two optimizer updates, equal in both runs
    assert logged[2]["loss"] < logged[0]["loss"] - 0.05


def test_logged_losses_equal_a_single_process_run(accumulated):
    _assert_same_logged_losses(accumulated)
    # ddp_find_unused_parameters=False: no search for unused parameters, and DDP found none missing
    assert "find_unused_parameters=True" not in accumulated.output


def test_only_rank_zero_writes_the_run_directory(accumulated):
    runs = accumulated
    writes = [set((runs.ranks.parent / f"{runs.ranks.name}-writes" / f"rank{rank}.txt").read_text().splitlines())
              for rank in range(RANKS)]
    assert {"open metrics.jsonl", "open train.log"} <= writes[0]
    # the run record is written to a temporary name (.loraft_run.json.PID.tmp) and renamed
    assert any(w.startswith("os.rename .loraft_run.json.") and w.endswith(".tmp") for w in writes[0])
    # Rank 1's only writes: its RNG state (for --resume) into each checkpoint being staged. It makes the directory
    # (and, arriving first, its parents); torch.save's file raises no audit event, the listing below shows it.
    staged = {f"os.mkdir checkpoints/.staging/checkpoint-{step}" for step in CHECKPOINT_STEPS}
    assert staged <= writes[1] <= staged | {"os.mkdir checkpoints", "os.mkdir checkpoints/.staging"}

    def listing(run_dir: Path) -> set[str]:
        return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*")}

    assert listing(runs.ranks) - listing(runs.single) == {
        f"checkpoints/checkpoint-{step}/rng_state_{rank}.pth" for step in CHECKPOINT_STEPS for rank in range(RANKS)
    }
    assert listing(runs.single) - listing(runs.ranks) == {
        f"checkpoints/checkpoint-{step}/rng_state.pth" for step in CHECKPOINT_STEPS
    }
    # every step logged once and every train.log message written once, as by one process
    assert [record["step"] for record in _metrics(runs.ranks)] == [record["step"] for record in _metrics(runs.single)]

    def messages(run_dir: Path) -> list[str]:
        """Each log record's first words: after the date, time and level, up to a colon. A record's continuation
        lines (the plan's, which differ by the process count) are not records."""
        lines = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()
        return [line.split(" ", 3)[3].split(":")[0] for line in lines if re.match(r"\d{4}-\d\d-\d\d ", line)]

    assert messages(runs.ranks) == messages(runs.single)
    assert messages(runs.ranks)[-1] == "finished"
    assert json.loads((runs.ranks / "loraft_run.json").read_text())["status"] == "finished"


def test_adapter_loads_in_plain_peft_and_equals_the_single_process_one(accumulated, tiny_bloom_dir):
    logits = {}
    for run_dir in (accumulated.single, accumulated.ranks, None):
        base = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
        model = (PeftModel.from_pretrained(base, run_dir) if run_dir else base).eval()
        with torch.no_grad():
            logits[run_dir] = model(input_ids=PROBE).logits
    torch.testing.assert_close(logits[accumulated.ranks], logits[accumulated.single], rtol=0, atol=1e-5)
    assert (logits[accumulated.ranks] - logits[None]).abs().max() > 1e-2  # the adapter did change the model


@pytest.mark.slow  # two more runs (~20 s on 2 cores)
def test_ranks_splitting_into_different_sub_batch_counts_match_one_process(sub_batched, tiny_bloom_dir, workdir):
    config = load_config(None, _overrides(tiny_bloom_dir, workdir, sub_batched.single, ()))
    lengths = sample_lengths(prepare_datasets(config, load_tokenizer(str(tiny_bloom_dir))).train)
    per_device = 2  # as in the sub_batched fixture
    sub_batches = [
        [len(split_by_tokens(lengths[first + rank * per_device : first + (rank + 1) * per_device], SUB_BATCH_TOKENS))
         for rank in range(RANKS)]
        for first in range(0, STEPS * RANKS * per_device, RANKS * per_device)
    ]
    # the case under test: in some step one rank runs more backward passes than the other
    assert any(len(set(counts)) > 1 for counts in sub_batches), sub_batches
    _assert_same_logged_losses(sub_batched)


@pytest.mark.slow  # a torchrun each (~18 s on 2 cores)
@pytest.mark.parametrize(
    "method",
    [["adapter.method=prompt_tuning"], ["adapter.method=prefix_tuning", "adapter.prefix_projection=true"]],
    ids=["prompt-tuning", "prefix-tuning"],
)
def test_prompt_and_prefix_tuning_need_no_unused_parameter_search(method, tiny_bloom_dir, workdir):
    # With find_unused_parameters=False, DDP fails the second step's forward when a trainable parameter got no
    # gradient in the first: these methods' virtual-token parameters all take part in every forward.
    ranks, _ = _torchrun(tiny_bloom_dir, workdir, method[0].split("=")[1], "train.max_steps=2", *method,
                         "adapter.num_virtual_tokens=4", "adapter.modules_to_save=null")
    assert [record["step"] for record in _metrics(ranks) if "loss" in record] == [1, 2]
    assert json.loads((ranks / "loraft_run.json").read_text())["status"] == "finished"
