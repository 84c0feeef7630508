"""Crash safety, proven on real processes: training is SIGKILLed at chosen and random moments (during a step,
during a checkpoint save, during the final save), resumed, and must end exactly where an uninterrupted run does:
a bit-equal adapter (fp32 parity mode), each step logged once, status "finished" only after a complete save."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA_RECORDS

HOOK = Path(__file__).parent / "kill_hook"
MAX_STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bloom_dir):
    root = tmp_path_factory.mktemp("crash")
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA_RECORDS * 4), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFT_CACHE_DIR": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    env.pop("KILL_ON", None)

    def config(run_dir: Path) -> Path:
        path = run_dir.with_suffix(".yaml")
        path.write_text("\n".join([
            f"output_dir: {run_dir}", "model:", f"  name_or_path: {tiny_bloom_dir}", "data:", f"  path: {data}",
            "train:", f"  max_steps: {MAX_STEPS}", "  save_steps: 2", "  save_total_limit: null",
            "  logging_steps: 1", "  per_device_train_batch_size: 2", "  gradient_accumulation_steps: 2",
            "  learning_rate: 0.01", "  precision: fp32", "  sampling: random", ""]), encoding="utf-8")
        return path

    def start(run_dir: Path, resume: bool = False, kill_on: str = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "loraft.cli", "train", str(config(run_dir))] + (["--resume"] if resume else [])
        run_env = {**env, "KILL_ON": kill_on} if kill_on else env
        return subprocess.Popen(command, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    reference = root / "reference"
    process = start(reference)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return start, root, load_file(reference / "adapter_model.safetensors")


def _status(run_dir):
    try:
        return json.loads((run_dir / "loraft_run.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def _logged_steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def _kill_when_logged(process, run_dir, step, rng):
    """SIGKILL at a random moment (0-30 ms, about one tiny-model step) after step `step` is logged."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and f'"step": {step},' in metrics.read_text(encoding="utf-8"):
            time.sleep(rng.uniform(0.0, 0.03))
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return process.wait(timeout=300)


TRIALS = [
    ("random moment after step 1", ("after", 1)),
    ("random moment after step 3", ("after", 3)),
    ("random moment after step 5", ("after", 5)),
    ("first checkpoint, mid-save", ("hook", "open|.staging|1")),
    ("second checkpoint, before it is moved into place", ("hook", "os.rename|.staging|2")),
    ("final save, before the adapter is moved into the run", ("hook", "os.rename|.adapter-staging|1")),
    ("final save, before status finished is written", ("hook", "os.rename|loraft_run.json|3")),
]


@pytest.mark.parametrize("name, kill", TRIALS, ids=[t[0] for t in TRIALS])
def test_killed_training_resumes_to_the_uninterrupted_result(setup, name, kill):
    start, root, reference = setup
    run_dir = root / name.replace(" ", "-").replace(",", "")
    rng = random.Random(name)
    if kill[0] == "after":
        code = _kill_when_logged(start(run_dir), run_dir, kill[1], rng)
    else:
        code = start(run_dir, kill_on=kill[1]).wait(timeout=300)
    assert code == -signal.SIGKILL, f"{name}: the run was not killed (exit {code})"
    assert _status(run_dir) != "finished"
    has_checkpoint = any((p / "trainer_state.json").is_file() for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    process = start(run_dir, resume=has_checkpoint)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    assert _status(run_dir) == "finished"
    assert _logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    final = load_file(run_dir / "adapter_model.safetensors")
    assert final.keys() == reference.keys()
    different = [key for key in final if not torch.equal(final[key], reference[key])]
    assert not different, f"{name}: adapter tensors differ from the uninterrupted run: {different}"
