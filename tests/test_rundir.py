"""The run directory after crashes and reruns: one run's records, each step logged once, atomic config."""

import json

import pytest
import torch
from transformers import TrainerCallback

from loraft.config import RunConfig, load_config, save_config
from loraft.errors import ConfigError
from loraft.rundir import RUN_FILE, read_metrics
from loraft.train import train
from loraft.plots import plot_loss
from conftest import ALPACA_RECORDS, write_alpaca


def _config(model_dir, data, run_dir, *overrides):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"data.path={data}", f"output_dir={run_dir}", "train.logging_steps=1",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.precision=fp32",
        *overrides,
    ])


def _steps(run_dir):
    return [record["step"] for record in read_metrics(run_dir / "metrics.jsonl") if "loss" in record]


def test_plot_loss_skips_a_line_cut_off_by_a_crash(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', encoding="utf-8")
    assert plot_loss(metrics, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_clean(tiny_bloom_dir, alpaca_jsonl, tmp_path):
    """The dead run's metrics, adapter and checkpoints are gone before the new run writes anything."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_FILE).write_text(json.dumps({"status": "running"}), encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n', encoding="utf-8")
    (run_dir / "adapter_config.json").write_text("{}", encoding="utf-8")

    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["adapter"] = (run_dir / "adapter_config.json").exists()
            seen["metrics"] = read_metrics(run_dir / "metrics.jsonl")

    train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=2"), callbacks=[AtStart()])
    assert seen == {"adapter": False, "metrics": []}
    assert _steps(run_dir) == [1, 2]
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "finished"


def test_overwrite_removes_the_old_adapter_before_training(tiny_bloom_dir, alpaca_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=1"))
    (run_dir / "eval").mkdir()
    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["left"] = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("adapter", "eval")))
            seen["status"] = json.loads((run_dir / RUN_FILE).read_text())["status"]

    train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=2", "overwrite=true"), callbacks=[AtStart()])
    assert seen == {"left": [], "status": "running"}
    assert _steps(run_dir) == [1, 2]


def test_resume_logs_each_step_once(tiny_bloom_dir, alpaca_jsonl, tmp_path):
    """A crash after checkpoint 2 that had logged steps 3-4 (the last line cut off) resumes to one record a step."""
    run_dir = tmp_path / "run"
    config = _config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=4", "train.save_steps=2",
                     "train.save_total_limit=null")
    train(config)
    # make it look killed during step 4's checkpoint: status running, checkpoint-4 missing, a half-written line
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    (run_dir / RUN_FILE).write_text(json.dumps({"status": "running"}), encoding="utf-8")
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "lo')
    train(config, resume=True)
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "finished"


def test_empty_config_file_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# nothing but a comment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.yaml: config file is empty"):
        load_config(path)


def test_config_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(RunConfig(), path)
    before = path.read_text(encoding="utf-8")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    import yaml

    monkeypatch.setattr(yaml, "safe_dump", lambda *a, **k: "output_dir: half-writ")
    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        save_config(RunConfig(output_dir="other"), path)
    assert path.read_text(encoding="utf-8") == before
    assert load_config(path).output_dir == RunConfig().output_dir


def test_resume_from_a_checkpoint_at_max_steps_trains_no_extra_step(tiny_bloom_dir, alpaca_jsonl, tmp_path):
    """Killed after the last checkpoint but before the final save: the resume only finishes the run."""
    run_dir = tmp_path / "run"
    config = _config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=4", "train.save_steps=2")
    train(config)
    (run_dir / RUN_FILE).write_text(json.dumps({"status": "running"}), encoding="utf-8")
    (run_dir / "adapter_model.safetensors").unlink()
    from safetensors.torch import load_file

    checkpoint = load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    train(config, resume=True)
    status = json.loads((run_dir / RUN_FILE).read_text())
    assert status["status"] == "finished" and status["global_step"] == 4
    assert _steps(run_dir) == [1, 2, 3, 4]
    final = load_file(run_dir / "adapter_model.safetensors")
    assert final.keys() == checkpoint.keys()
    assert all(torch.equal(final[name], checkpoint[name]) for name in final)


class PoisonAfter(TrainerCallback):
    """Sets every LoRA B matrix to NaN once step `step` is saved: every later loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.fill_(float("nan"))


@pytest.mark.parametrize("patience, stop_step", [(0, 3), (1, 4)])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
        tiny_bloom_dir, alpaca_jsonl, tmp_path, capsys, patience, stop_step):
    from loraft.trainer import NonFiniteTraining

    run_dir = tmp_path / "run"
    config = _config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=6", "train.save_steps=2",
                     f"train.nonfinite_patience={patience}")
    with pytest.raises(NonFiniteTraining) as raised:
        train(config, callbacks=[PoisonAfter(2)])
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    assert str(raised.value) == (
        f"{run_dir}: training stopped at step {stop_step}: the loss is not finite ({patience + 1} step(s) in a row, "
        f"train.nonfinite_patience={patience}); status failed, the last good checkpoint is {checkpoint}")
    status = json.loads((run_dir / RUN_FILE).read_text())
    assert status["status"] == "failed" and status["last_good_checkpoint"] == str(checkpoint)
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapter_model.safetensors").values())


def test_a_dataset_of_empty_responses_is_refused_before_training(tiny_bloom_dir, tmp_path, capsys):
    from loraft.cli import main

    data = write_alpaca(tmp_path / "empty.jsonl", [{**r, "output": ""} for r in ALPACA_RECORDS])
    run_dir = tmp_path / "run"
    base = [f"model.name_or_path={tiny_bloom_dir}", f"data.path={data}", f"output_dir={run_dir}",
            "train.max_steps=1"]
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  precision: fp32\n", encoding="utf-8")
    assert main(["train", str(config), *base]) == 2
    n = len(ALPACA_RECORDS)
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the tokenized cache's progress bar
        f"error: {data}: every response is empty ({n} of {n}), so training would only teach the model to stop; "
        "set data.allow_empty_responses=true if that is intended")
    assert not (run_dir / "adapter_config.json").exists()
    assert main(["train", str(config), *base, "data.allow_empty_responses=true"]) == 0
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "finished"


def test_resume_refuses_a_changed_function_and_allows_an_extension(tiny_bloom_dir, alpaca_jsonl, tmp_path):
    from loraft.errors import RunError

    run_dir = tmp_path / "run"
    base = ["train.max_steps=4", "train.save_steps=2", "train.save_total_limit=null"]
    train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, *base))
    (run_dir / RUN_FILE).write_text(json.dumps({**json.loads((run_dir / RUN_FILE).read_text()), "status": "running"}),
                                    encoding="utf-8")
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(alpaca_jsonl.read_text(encoding="utf-8").replace("北京", "上海"), encoding="utf-8")
    cases = [
        (["data.max_length=64"], "data.max_length changed (256 -> 64)"),
        (["adapter.r=4"], "adapter.r changed (8 -> 4)"),
        (["train.seed=7"], "train.seed changed (42 -> 7)"),
        (["data.template=alpaca"], "data.template changed ('human_assistant' -> 'alpaca')"),
    ]
    for overrides, change in cases:
        with pytest.raises(RunError) as raised:
            train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, *base, *overrides), resume=True)
        assert str(raised.value) == (
            f"{run_dir}: --resume refused: {change} since the checkpoint was trained; start a new output_dir, "
            "or pass overwrite=true to train again from scratch")
    with pytest.raises(RunError, match=r"--resume refused: the training data \(its content"):
        train(_config(tiny_bloom_dir, other_data, run_dir, *base), resume=True)
    train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=6", "train.save_steps=2"), resume=True)
    status = json.loads((run_dir / RUN_FILE).read_text())
    assert status["status"] == "finished" and status["global_step"] == 6
    assert "resume extends the run: train.max_steps 4 -> 6" in (run_dir / "train.log").read_text(encoding="utf-8")
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_consumers_refuse_unfinished_runs_and_remote_code_unless_asked(tiny_bloom_dir, alpaca_jsonl, tmp_path, capsys):
    import yaml

    from loraft.cli import main

    run_dir = tmp_path / "run"
    train(_config(tiny_bloom_dir, alpaca_jsonl, run_dir, "train.max_steps=2", "train.save_steps=2"))
    generate = ["generate", str(run_dir), "--prompt", "你好", "--max-new-tokens", "2", "--temperature", "0"]
    # a run killed after its checkpoint: the adapter files are gone, status says running
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run_dir / name).unlink()
    (run_dir / RUN_FILE).write_text(json.dumps({"status": "running"}), encoding="utf-8")
    for command in (generate, ["eval", str(run_dir), "--data", str(alpaca_jsonl)],
                    ["merge", str(run_dir), "--out", str(tmp_path / "merged")]):
        assert main(command) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: {run_dir}: the run is running, not finished; pass --allow-unfinished to use its newest "
            "checkpoint anyway")
    assert main([*generate, "--allow-unfinished"]) == 0
    capsys.readouterr()

    # trust_remote_code comes from the command line, never from a run directory someone else wrote
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["trust_remote_code"] = True
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main([*generate, "--allow-unfinished"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {run_dir}: its base model {tiny_bloom_dir} runs its own modelling code (trust_remote_code in "
        "config.yaml); pass --trust-remote-code if you trust it")
    assert main([*generate, "--allow-unfinished", "--trust-remote-code"]) == 0


def test_staged_directory_replaces_whole_or_merges_and_leaves_the_target_on_error(tmp_path):
    from loraft.files import staged_directory

    target = tmp_path / "entry"
    with staged_directory(target) as staging:
        (staging / "a").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # the old entry, untouched
    with staged_directory(target) as staging:  # replace: the old entry's files go
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with staged_directory(target, keep_existing=True) as staging:  # another writer won: its copy stays
        (staging / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with staged_directory(target, merge=True, label="adapter") as staging:  # merge: same names replaced
        (staging / "b").write_text("new")
        (staging / "d").mkdir()
    assert sorted(p.name for p in target.iterdir()) == ["b", "d"] and (target / "b").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no staging directory left anywhere


def test_run_dir_lifecycle_one_check_one_error_type(tmp_path):
    from loraft.config import load_config
    from loraft.errors import RunError
    from loraft.rundir import RunDir
    from loraft.run_access import open_run

    run = RunDir(tmp_path / "run")
    config = load_config(None, [f"output_dir={run.path}"])
    assert run.prepare(config, resume=False) is None and run.status() is None
    run.start(config, None)
    assert run.status() == "running" and run.record()["base_model"] == config.model.name_or_path
    for status in ("running", "failed"):
        run.mark(status, reason="x")
        with pytest.raises(RunError, match=f"the run is {status}, not finished; pass --allow-unfinished"):
            open_run(run.path)
    run.mark("finished")
    with pytest.raises(RunError, match="not a finished loraft run \\(no adapter_config.json\\)"):
        open_run(run.path)
    with pytest.raises(RunError, match="holds a finished run; choose another output_dir"):
        run.prepare(config, resume=False)
    (run.path / "stale.json").write_text("{}")
    (run.path / "metrics.jsonl").write_text('{"step": 1}\n')
    (run.path / ".adapter-staging-x").mkdir()
    run.clear_previous()
    assert sorted(p.name for p in run.path.iterdir()) == ["loraft_run.json", "stale.json"]


def test_allow_unfinished_without_a_complete_checkpoint_is_one_sentence(tmp_path):
    from loraft.errors import RunError
    from loraft.rundir import RunDir
    from loraft.run_access import RunAccess, open_run

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.mark("failed", reason="killed")
    (run.checkpoints / "checkpoint-2").mkdir(parents=True)  # cut off: no trainer_state.json, so not complete
    with pytest.raises(RunError) as error:
        open_run(run.path, RunAccess(allow_unfinished=True))
    assert str(error.value) == f"{run.path}: the run is failed and has no complete checkpoint to use"


def test_a_directory_holding_only_a_detached_starts_console_is_not_a_users_folder(tmp_path):
    """`loraft ui` creates RUN/console.log before `loraft train` prepares RUN: that file (like the lock file) must
    not make train refuse the directory, while any other file still does."""
    from loraft.errors import RunError
    from loraft.rundir import CONSOLE_FILE, LOCK_FILE, RunDir

    config = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / CONSOLE_FILE).write_text("[started] loraft train ...\n")
    (run.path / LOCK_FILE).touch()
    assert run.prepare(config, resume=False) is None
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="exists and is not empty"):
        run.prepare(config, resume=False)


def test_checkpoint_step_reads_a_checkpoint_name_or_path_and_nothing_else(tmp_path):
    from loraft.rundir import RunDir, checkpoint_step

    run = RunDir(tmp_path / "run")
    assert checkpoint_step("checkpoint-200") == 200 and checkpoint_step(run.checkpoint(7)) == 7
    assert run.checkpoint(7) == run.path / "checkpoints" / "checkpoint-7"
    for name in ("checkpoint-", "checkpoint-x", "checkpoint-2.5", "Checkpoint-2", "../checkpoint-3", "checkpoint-²"):
        with pytest.raises(ValueError, match="is not a checkpoint name"):
            checkpoint_step(name)


def test_the_record_is_begun_and_finished_by_the_run_directory(tmp_path):
    """begin and finish write the keys `loraft runs`, the UI and the tests read, with the run's values."""
    from types import SimpleNamespace

    from loraft.rundir import RunDir

    run = RunDir(tmp_path / "run")
    config = load_config(None, [f"output_dir={run.path}", "train.max_steps=5"])
    plan = SimpleNamespace(to_dict=lambda: {"precision": "fp32"})
    report = {"template": "human_assistant", "fingerprint": "abc"}
    process = {"pid": 1, "host": "here", "started_at": "2025-01-01T00:00:00+00:00"}
    run.start(config, None, total_steps=5)
    run.begin(config, plan, "human_assistant", report, process, 100.0, {"loraft": "x"})
    begun = run.record()
    assert list(begun) == ["status", "base_model", "template", "objective", "adapter_from", "started", "pid", "host",
                           "started_at", "total_steps", "versions", "plan", "identity", "length"]
    assert (begun["status"], begun["total_steps"], begun["started"], begun["plan"]) == (
        "running", 5, 100.0, {"precision": "fp32"})
    assert begun["identity"]["the training data (its content, tokenizer or field mapping)"] == "abc"
    result = SimpleNamespace(global_step=5, training_loss=0.5, metrics={"train_loss": 0.5})
    run.finish(config, plan, "human_assistant", report, process, 100.0, {"loraft": "x"},
               model_info={"tied_embeddings": None, "target_matches": ["a"]}, trainable_params=3, total_params=9,
               result=result, resumed_from=run.checkpoint(3))
    finished = run.record()
    assert list(finished) == [
        "status", "base_model", "template", "objective", "adapter_from", "adapter_method", "tied_embeddings",
        "target_matches", "trainable_params", "total_params", "plan", "global_step", "total_steps", "train_loss",
        "train_metrics", "resumed_from", "identity", "length", "started", "pid", "host", "started_at", "finished",
        "versions"]
    assert (finished["status"], finished["global_step"], finished["total_steps"], finished["resumed_from"]) == (
        "finished", 5, 5, str(run.checkpoint(3)))
    assert {key: finished[key] for key in begun if key != "status"} == {
        key: value for key, value in begun.items() if key != "status"}


def test_no_run_directory_file_is_named_outside_rundir():
    """Every module names a run directory's files through loraft.rundir (its constants and RunDir's properties): a
    string equal to one of loraft's own file names anywhere else in src/loraft spells the contract a second time.
    (peft's and transformers' own file names may stay where those libraries are used.)"""
    import ast
    from pathlib import Path

    from loraft import rundir

    names = {rundir.RUN_FILE, rundir.LOCK_FILE, rundir.CONSOLE_FILE, rundir.CONFIG_FILE, rundir.DATA_REPORT_FILE,
             rundir.METRICS_FILE, rundir.LOSS_PLOT, rundir.LOG_FILE, rundir.EVAL_METRICS, rundir.EVAL_PREDICTIONS}
    allowed = {("ui/jobs.py", rundir.CONSOLE_FILE)}  # a UI job's own folder (.loraft-ui/jobs/ID), not a run's
    package = Path(rundir.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        if module == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names and (module, node.value) not in allowed:
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    assert not found, "run-directory file names spelled outside rundir.py:\n" + "\n".join(found)
