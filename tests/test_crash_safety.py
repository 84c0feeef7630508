"""Crash safety, proven on real processes: training is SIGKILLed at chosen and random moments (during a step,
during a checkpoint save, during the final save), resumed, and must end exactly where an uninterrupted run does:
a bit-equal adapter (fp32 parity mode), each step logged once, status "finished" only after a complete save.

A chosen moment is named by what is being written (tests/kill_hook), and each such trial asserts the run
directory as the kill left it, so a change in what training writes cannot silently move the kill point."""

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

from conftest import REFERENCE_SAVE_STEPS, REFERENCE_STEPS, one_thread, reference_yaml, write_alpaca
from loraft.cli import main

HOOK = Path(__file__).parent / "kill_hook"
MAX_STEPS, SAVE_STEPS = REFERENCE_STEPS, REFERENCE_SAVE_STEPS


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bloom_dir, reference_run):
    """start(run_dir, kill_on) -> `loraft train` of conftest's reference config in its own process (tests/kill_hook
    loaded), the folder the runs go in, and the adapter of the session's uninterrupted reference run."""
    root = tmp_path_factory.mktemp("crash")
    data = write_alpaca(root / "alpaca.jsonl", repeat=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    env.pop("KILL_ON", None)

    def start(run_dir: Path, kill_on: str = None) -> subprocess.Popen:
        config = run_dir.with_suffix(".yaml")
        config.write_text(reference_yaml(tiny_bloom_dir, data, run_dir), encoding="utf-8")
        command = [sys.executable, "-m", "loraft.cli", "train", str(config)]
        run_env = {**env, "KILL_ON": kill_on} if kill_on else env
        return subprocess.Popen(command, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    return start, root, load_file(reference_run / "adapter_model.safetensors")


def _status(run_dir):
    try:
        return json.loads((run_dir / "loraft_run.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def _state(run_dir):
    """What a kill left: the record's status, the complete checkpoints, the checkpoints being staged (True once
    their trainer_state.json, the last file of a checkpoint, is written) and whether the adapter is in the run."""
    checkpoints = run_dir / "checkpoints"
    staging = checkpoints / ".staging"
    return {
        "status": _status(run_dir),
        "checkpoints": sorted(p.name for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        "staged": {p.name: (p / "trainer_state.json").is_file() for p in staging.glob("checkpoint-*")},
        "adapter": (run_dir / "adapter_model.safetensors").is_file(),
    }


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


ALL_CHECKPOINTS = sorted(f"checkpoint-{step}" for step in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))  # as _state
FIRST, SECOND = (f"checkpoint-{SAVE_STEPS * n}" for n in (1, 2))
SLOW = pytest.mark.slow  # each trial is a killed training process and a resume: the default run keeps one
# (name, kill, the run directory's state at the kill: None for a random moment)
TRIALS = [
    pytest.param("random moment after step 1", ("after", 1), None, marks=SLOW),
    pytest.param("random moment after step 3", ("after", 3), None, marks=SLOW),
    pytest.param("random moment after step 5", ("after", 5), None, marks=SLOW),
    # the adapter weights are staged, its config (and the optimizer, trainer state) not yet
    pytest.param("first checkpoint, mid-save", ("hook", f"open|checkpoints/.staging/{FIRST}/adapter_config.json"),
                 {"status": "running", "checkpoints": [], "staged": {FIRST: False}, "adapter": False}, marks=SLOW),
    pytest.param("second checkpoint, before it is moved into place", ("hook", f"os.rename|checkpoints/{SECOND}"),
                 {"status": "running", "checkpoints": [FIRST], "staged": {SECOND: True}, "adapter": False},
                 marks=SLOW),
    pytest.param("final save, before the adapter is moved into the run",
                 ("hook", "os.rename|/adapter_model.safetensors"),
                 {"status": "running", "checkpoints": ALL_CHECKPOINTS, "staged": {}, "adapter": False}, marks=SLOW),
    pytest.param("final save, before status finished is written",
                 ("hook", "os.rename|/loraft_run.json|status=finished"),
                 {"status": "running", "checkpoints": ALL_CHECKPOINTS, "staged": {}, "adapter": True}),
]


@pytest.mark.parametrize("name, kill, at_kill", TRIALS, ids=[t.values[0] for t in TRIALS])
def test_killed_training_resumes_to_the_uninterrupted_result(setup, name, kill, at_kill):
    start, root, reference = setup
    run_dir = root / name.replace(" ", "-").replace(",", "")
    rng = random.Random(name)
    if kill[0] == "after":
        code = _kill_when_logged(start(run_dir), run_dir, kill[1], rng)
    else:
        code = start(run_dir, kill_on=kill[1]).wait(timeout=300)
    assert code == -signal.SIGKILL, f"{name}: the run was not killed (exit {code})"
    state = _state(run_dir)
    if at_kill is None:
        assert state["status"] == "running", state
    else:
        assert state == at_kill, f"{name}: the kill did not happen where it says"
    with one_thread():  # the same command again, in this process: the kill was the process's part
        assert main(["train", str(run_dir.with_suffix(".yaml"))] + (["--resume"] if state["checkpoints"] else [])) == 0
    assert _status(run_dir) == "finished"
    assert _logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    final = load_file(run_dir / "adapter_model.safetensors")
    assert final.keys() == reference.keys()
    different = [key for key in final if not torch.equal(final[key], reference[key])]
    assert not different, f"{name}: adapter tensors differ from the uninterrupted run: {different}"
