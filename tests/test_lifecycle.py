"""A run's liveness and its graceful stop, on real processes and in-process.

The record alone cannot tell a live run from a killed one, so the trainer holds a flock on loraft_run.lock for its
whole life and `run_state` reads the lock: `running` while it is held, `interrupted` once the process is gone.
SIGTERM/SIGINT (or `loraft stop`) ends the current step, saves a checkpoint and records `stopped`; the resumed run
must end exactly where an uninterrupted one does (a bit-equal fp32 adapter, each step logged once). A second
signal aborts at once and leaves the previous checkpoint intact (tests/signal_hook sends both mid-save).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_SAVE_STEPS, REFERENCE_STEPS, one_thread, reference_yaml, write_alpaca
from loraft.cli import STOPPED_EXIT_CODE, main
from loraft.errors import RunError
from loraft.liveness import RunLock, lock_is_held, run_state
from loraft.rundir import LOCK_FILE, RunDir

HOOK = Path(__file__).parent / "signal_hook"
MAX_STEPS = REFERENCE_STEPS  # 8 steps an epoch: a stop lands in the first one, and the resume crosses epoch boundaries
SAVE_STEPS = REFERENCE_SAVE_STEPS


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bloom_dir, reference_run):
    """start(run_dir, ...) -> `loraft train` of conftest's reference config in its own process (tests/signal_hook
    loaded), the folder the runs go in, and the session's uninterrupted reference run (conftest.reference_run)."""
    root = tmp_path_factory.mktemp("lifecycle")
    data = write_alpaca(root / "alpaca.jsonl", repeat=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")])}
    env.pop("SIGNAL_ON", None)

    def config(run_dir: Path, max_steps: int = MAX_STEPS, save_steps: int = SAVE_STEPS) -> Path:
        path = run_dir.with_suffix(".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reference_yaml(tiny_bloom_dir, data, run_dir, max_steps, save_steps), encoding="utf-8")
        return path

    def start(run_dir: Path, signal_on: str = None, launcher: tuple = (), **settings) -> subprocess.Popen:
        command = [sys.executable, *launcher, "-m", "loraft.cli", "train", str(config(run_dir, **settings))]
        run_env = {**env, "SIGNAL_ON": signal_on} if signal_on else env
        if launcher:  # several CPU processes (gloo), even on a machine with one GPU
            run_env = {**run_env, "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.Popen(command, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    return start, root, reference_run


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "loraft_run.json").read_text(encoding="utf-8"))


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line and line.endswith("}")]


def _wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while not any(logged >= step for logged in _logged_steps(run_dir)):
        assert process.poll() is None, f"training ended before step {step}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no step {step} logged in 300 s"
        time.sleep(0.005)


def _assert_same_adapter(adapter_dir: Path, reference_dir: Path) -> None:
    final, reference = (load_file(path / "adapter_model.safetensors") for path in (adapter_dir, reference_dir))
    assert final.keys() == reference.keys()
    different = [key for key in final if not torch.equal(final[key], reference[key])]
    assert not different, f"{adapter_dir}: adapter tensors differ from the uninterrupted run's: {different}"


def test_stopped_run_resumes_to_the_uninterrupted_result(setup, capsys):
    start, root, reference = setup
    run_dir = root / "stopped"
    process = start(run_dir)
    _wait_for_step(process, run_dir, 2)
    live = run_state(run_dir)
    assert (live["status"], live["pid"], live["host"]) == ("running", process.pid, socket.gethostname())
    assert live["total_steps"] == MAX_STEPS and live["step"] >= 2 and isinstance(live["loss"], float)

    assert main(["stop", str(run_dir)]) == 0  # SIGTERM to the recorded pid, then waits for the lock
    assert process.wait(timeout=60) == STOPPED_EXIT_CODE
    record = _record(run_dir)
    step = record["step"]
    assert record["status"] == "stopped" and record["stop_signal"] == "SIGTERM" and 2 <= step < MAX_STEPS
    assert record["checkpoint"] == str(run_dir / "checkpoints" / f"checkpoint-{step}")
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert max(_logged_steps(run_dir)) == step  # the stopping step is logged, nothing after it
    assert capsys.readouterr().out == (f"{run_dir}: stopped at step {step}; resume with: loraft train "
                                       f"{run_dir / 'config.yaml'} --resume\n")
    assert process.stderr.read().splitlines()[-1] == (
        f"stopped at step {step}; resume with: loraft train {run_dir.with_suffix('.yaml')} --resume")
    assert run_state(run_dir)["status"] == "stopped" and not lock_is_held(run_dir)

    with one_thread():  # the resume in this process: the stop was the process's part
        assert main(["train", str(run_dir.with_suffix(".yaml")), "--resume"]) == 0
    assert _record(run_dir)["status"] == "finished" and run_state(run_dir)["status"] == "finished"
    assert _logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    _assert_same_adapter(run_dir, reference)


def test_a_killed_run_reads_interrupted_and_a_live_one_running(setup, capsys):
    start, root, _ = setup
    run_dir = root / "runs" / "killed"
    process = start(run_dir, max_steps=100000, save_steps=100000)
    _wait_for_step(process, run_dir, 2)
    assert run_state(run_dir)["status"] == "running" and _record(run_dir)["pid"] == process.pid
    # a second trainer in the same directory is refused before it writes anything
    assert main(["train", str(run_dir.with_suffix(".yaml"))]) == 2
    assert capsys.readouterr().err == (
        f"error: {run_dir}: a training run is live in it (pid {process.pid} on {socket.gethostname()} holds "
        f"{LOCK_FILE}); stop it first with `loraft stop {run_dir}`, or choose another output_dir\n")
    assert main(["runs", str(root), "--json"]) == 0
    listed = {state["name"]: state for state in json.loads(capsys.readouterr().out)}
    assert listed["runs/killed"]["status"] == "running" and listed["runs/killed"]["total_steps"] == 100000

    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert _record(run_dir)["status"] == "running"  # what the record says; the lock says otherwise
    state = run_state(run_dir)
    assert state["status"] == "interrupted" and state["recorded_status"] == "running" and state["step"] >= 2
    assert main(["stop", str(run_dir)]) == 2
    assert capsys.readouterr().err == f"error: {run_dir}: the run is not running (status interrupted); nothing to stop\n"
    assert main(["runs", str(root / "runs")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "STEP", "LOSS", "STARTED"]
    assert table[1].split()[:3] == ["killed", "interrupted", f"{state['step']}/100000"]


def test_a_second_signal_aborts_at_once_and_the_previous_checkpoint_survives(setup):
    start, root, reference = setup
    run_dir = root / "aborted"
    # the first signal as checkpoint-4 lands (the run then stops after step 5), the second while checkpoint-5 is
    # being staged: the process must die there, neither finishing that save nor recording "stopped"
    process = start(run_dir, signal_on=f"SIGTERM@os.rename|checkpoints/checkpoint-{SAVE_STEPS};"
                                       f"SIGINT@open|checkpoints/.staging/checkpoint-{SAVE_STEPS + 1}/adapter_config.json")
    assert process.wait(timeout=300) == -signal.SIGINT
    assert "loraft: SIGTERM: stopping after the current step" in process.stderr.read()
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}"]
    assert sorted(p.name for p in (checkpoints / ".staging").iterdir()) == [f"checkpoint-{SAVE_STEPS + 1}"]
    assert not (checkpoints / ".staging" / f"checkpoint-{SAVE_STEPS + 1}" / "trainer_state.json").exists()
    assert _record(run_dir)["status"] == "running" and run_state(run_dir)["status"] == "interrupted"
    # the previous checkpoint is whole and equals the uninterrupted run's (resuming from it is test_crash_safety's)
    previous = checkpoints / f"checkpoint-{SAVE_STEPS}"
    assert json.loads((previous / "trainer_state.json").read_text())["global_step"] == SAVE_STEPS
    _assert_same_adapter(previous, reference / "checkpoints" / f"checkpoint-{SAVE_STEPS}")


# ------------------------------------------------------------------------------------------------ in-process
def test_run_state_follows_the_lock_not_the_record(tmp_path):
    from loraft.config import load_config
    from loraft.train import train

    run = RunDir(tmp_path / "run")
    config = load_config(None, [f"output_dir={run.path}"])
    run.prepare(config, resume=False)
    lock = RunLock(run.path).acquire()
    try:
        process = run.start(config, None, total_steps=7)
        assert process["pid"] == os.getpid() and run.record()["total_steps"] == 7
        assert run_state(run.path)["status"] == "running" and lock_is_held(run.path)
        with pytest.raises(RunError) as busy:
            RunLock(run.path).acquire(attempts=2)
        assert str(busy.value) == (
            f"{run.path}: a training run is live in it (pid {os.getpid()} on {socket.gethostname()} holds "
            f"{LOCK_FILE}); stop it first with `loraft stop {run.path}`, or choose another output_dir")
        with pytest.raises(RunError, match="a training run is live in it"):  # before anything loads
            train(config)
        run.update(host="another-host")  # a run recorded elsewhere: its lock is not trusted from here
        assert run_state(run.path)["status"] == "running?"
        run.update(host=socket.gethostname())
    finally:
        lock.release()
    assert not lock_is_held(run.path) and run_state(run.path)["status"] == "interrupted"
    run.mark("stopped", step=3)
    assert run_state(run.path)["status"] == "stopped"
    # the step and loss come from the tail of metrics.jsonl, however long it is
    lines = [{"step": step, "loss": 1.0 / step} for step in range(1, 3)] + [{"step": 3, "eval_loss": 0.1}] * 2000
    run.metrics_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    state = run_state(run.path)
    assert (state["step"], state["loss"], state["total_steps"]) == (3, 0.5, 7)


def test_stop_request_turns_signals_into_a_request_and_restores_the_handlers():
    from loraft.trainer import StopRequest, StopRequested

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(StopRequested):  # before training: at once
        with StopRequest(announce=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopRequest(announce=False) as stop:  # while training: noted, and the next signal would kill
        stop.training = True
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    def elsewhere():  # Python takes signal handlers in the main thread only: a run in a thread installs none
        with StopRequest(announce=False) as stop:
            seen.append(signal.getsignal(signal.SIGTERM))
            stop.request("ui")
            seen.append(stop.signal_name)

    seen = []
    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [before[0], "ui"]


def test_graceful_stop_ends_the_step_with_a_checkpoint_unless_it_is_the_last():
    from transformers import TrainerControl, TrainerState

    from loraft.trainer import GracefulStop, StopRequest

    class Args:
        world_size, device = 1, "cpu"

    request = StopRequest()
    callback = GracefulStop(request)
    state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
    callback.on_step_end(Args(), state, control)
    assert not (control.should_save or control.should_training_stop) and callback.stopped_at is None
    request.request()
    callback.on_step_end(Args(), state, control)
    assert control.should_save and control.should_log and control.should_training_stop and callback.stopped_at == 3
    last, control = GracefulStop(request), TrainerControl()
    last.on_step_end(Args(), TrainerState(global_step=10, max_steps=10), control)
    assert last.stopped_at is None and not control.should_training_stop  # the last step: the run finishes


def test_a_finished_run_records_its_process_and_total_steps_and_frees_the_lock(tiny_bloom_dir, alpaca_jsonl,
                                                                                tmp_path):
    from loraft.config import load_config
    from loraft.train import train

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run_dir = train(load_config(None, [
        f"model.name_or_path={tiny_bloom_dir}", f"data.path={alpaca_jsonl}", f"output_dir={tmp_path / 'run'}",
        "train.max_steps=-1", "train.num_train_epochs=1", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.save_steps=1000", "train.precision=fp32"]))
    record = _record(run_dir)
    # total_steps computed by Trainer from the epochs: 8 records, 2 a step
    assert (record["status"], record["global_step"], record["total_steps"]) == ("finished", 4, 4)
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    assert record["started_at"] and (run_dir / LOCK_FILE).is_file() and not lock_is_held(run_dir)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert run_state(run_dir)["status"] == "finished"


def test_a_signal_before_training_stops_at_once_and_the_same_command_starts_again(tiny_bloom_dir, alpaca_jsonl,
                                                                                  tmp_path, monkeypatch, capsys):
    from transformers import TrainerCallback

    from loraft.config import load_config
    from loraft.train import TrainingStopped, train

    class SignalWhileLoading(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):  # in Trainer's constructor: no step has run
            os.kill(os.getpid(), signal.SIGTERM)

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    config = load_config(None, [
        f"model.name_or_path={tiny_bloom_dir}", f"data.path={alpaca_jsonl}", f"output_dir={tmp_path / 'run'}",
        "train.max_steps=2", "train.precision=fp32"])
    with pytest.raises(TrainingStopped) as stopped:
        train(config, callbacks=[SignalWhileLoading()])
    assert (stopped.value.step, stopped.value.checkpoint) == (0, None)
    assert str(stopped.value) == f"{tmp_path / 'run'}: stopped before its first checkpoint"
    record = _record(tmp_path / "run")
    assert (record["status"], record["step"], record["checkpoint"], record["stop_signal"]) == (
        "stopped", 0, None, "SIGTERM")
    assert not lock_is_held(tmp_path / "run")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert _record(train(config))["status"] == "finished"  # a stopped run without a checkpoint starts again

    # what `loraft train` prints for such a stop: the command to start again, with the overrides given
    import loraft.train

    def stop_at_once(config, resume):
        raise TrainingStopped(Path(config.output_dir), 0, None)

    monkeypatch.setattr(loraft.train, "train", stop_at_once)
    capsys.readouterr()
    assert main(["train", "demo", f"output_dir={tmp_path / 'other'}"]) == STOPPED_EXIT_CODE
    assert capsys.readouterr().err == (f"stopped before the first checkpoint; start again with: loraft train "
                                       f"demo output_dir={tmp_path / 'other'}\n")


# ---------------------------------------------------------------------------------------------------- CLI
def _fake_run(path: Path, **record) -> Path:
    path.mkdir(parents=True)
    (path / "loraft_run.json").write_text(json.dumps(record))
    return path


def test_runs_lists_runs_one_or_two_levels_down(tmp_path, capsys):
    _fake_run(tmp_path / "a", status="finished", global_step=4, total_steps=4, started_at="2025-05-01T10:00:00+02:00")
    _fake_run(tmp_path / "group" / "b", status="failed", started=0.0)
    _fake_run(tmp_path / "group" / "deeper" / "c", status="finished")  # three levels down: not listed
    (tmp_path / "a" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 4, "loss": 1.5}\n')
    assert main(["runs", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["status"], s["step"], s["loss"], s["checkpoint"]) for s in listed] == [
        ("a", "finished", 4, 1.5, "checkpoint-2"), ("group/b", "failed", None, None, None)]
    assert listed[1]["started_at"].startswith("1970-01-01")  # an older record's `started` seconds
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[:2]] == [["NAME", "STATUS", "STEP", "LOSS", "STARTED"],
                                                   ["a", "finished", "4/4", "1.5000", "2025-05-01", "10:00:00"]]
    assert main(["runs", str(tmp_path / "a")]) == 0  # a run directory itself
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "a"
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: directory not found\n"


@pytest.mark.parametrize("case", ["missing", "not a run", "finished", "stopped", "other host", "no pid"])
def test_stop_refuses_with_one_sentence(tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    if case == "not a run":
        run_dir.mkdir()
    elif case in ("finished", "stopped"):
        _fake_run(run_dir, status=case)
    elif case == "other host":
        _fake_run(run_dir, status="running", pid=1, host="elsewhere")
    elif case == "no pid":
        _fake_run(run_dir, status="running")
    lock = RunLock(run_dir).acquire() if case == "no pid" else None
    try:
        assert main(["stop", str(run_dir), "--timeout", "1"]) == 2
    finally:
        if lock:
            lock.release()
    expected = {
        "missing": f"{run_dir}: run directory not found",
        "not a run": f"{run_dir}: not a loraft run (no loraft_run.json)",
        "finished": f"{run_dir}: the run is not running (status finished); nothing to stop",
        "stopped": f"{run_dir}: the run is not running (status stopped); nothing to stop",
        "other host": f"{run_dir}: loraft_run.json says running on host 'elsewhere', not this host "
                      f"({socket.gethostname()!r}); run loraft stop there",
        "no pid": f"{run_dir}: loraft_run.json has no pid (written by an older loraft); stop its process where it runs",
    }[case]
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_demo_rebuild_base_reaches_run_demo(monkeypatch, tmp_path):
    import loraft.demo

    calls = []
    monkeypatch.setattr(loraft.demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--workdir", str(tmp_path), "--rebuild-base"]) == 0
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    assert [call["rebuild_base"] for call in calls] == [True, False]


@pytest.mark.slow  # a torchrun of two processes (~40 s on 2 cores)
def test_under_torchrun_a_stop_sent_to_rank_zero_stops_every_rank_at_the_same_step(setup, capsys):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    start, root, _ = setup
    run_dir = root / "torchrun"
    launcher = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()))
    process = start(run_dir, max_steps=100000, save_steps=100000, launcher=launcher)
    _wait_for_step(process, run_dir, 2)
    assert main(["stop", str(run_dir)]) == 0  # SIGTERM to the recorded pid: rank 0's only
    # the workers exit 75 (rank 1 may be SIGTERMed by torchrun after its part is saved); torchrun calls it a failure
    process.wait(timeout=120)
    record = _record(run_dir)
    step = record["step"]
    assert record["status"] == "stopped" and record["pid"] != process.pid
    # both ranks saved the same step: each wrote its RNG state into it, and the run logged nothing after it
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert max(_logged_steps(run_dir)) == step
    assert capsys.readouterr().out.startswith(f"{run_dir}: stopped at step {step}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
