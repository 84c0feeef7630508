"""End to end: the real `loraft ui` process on 127.0.0.1, its page in headless Chromium, and the real training
processes it starts. The runs must outlive the browser and the UI; the page must re-attach to them.

A run the test acts on is held between its steps by tests/step_gate (inherited by the runs the UI starts): the test
lets it take N steps, kills the browser or the UI or presses Stop while it waits there, then lets it go, on any
machine, however fast its steps are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from browser import Chromium, find_chromium
from conftest import REFERENCE_STEPS, reference_yaml, write_alpaca
from loraft.cli import main
from run_helpers import ServerProcess, free_port

HOOK = Path(__file__).parent / "step_gate"
GATE = ".step-gate"  # the gate's folder, inside the workspace: the runs the UI starts may write nowhere else
MODEL = "models/tiny-bloom"
CATALOGS = Path(__file__).resolve().parents[1] / "src" / "loraft" / "ui" / "static" / "i18n"
SHOTS = os.environ.get("LORAFT_UI_SCREENSHOTS")  # a folder: docs/ui/'s screenshots are taken from these tests


class UI(ServerProcess):
    """`loraft ui` (the CLI, as a user starts it) on 127.0.0.1, with the step gate for the runs it starts."""

    def __init__(self, workspace: Path, log_path: Path, port: int | None = None, token: str | None = None):
        self.workspace, self.token = workspace, token
        extra = ["--token", token] if token else []
        super().__init__(
            lambda port: [sys.executable, "-m", "loraft.cli", "ui", "--workspace", str(workspace), "--port", str(port),
                          *extra],
            log_path, stop_timeout=30, port=port, ready_path="/api/info", headers=self.headers,
            # one thread, as the reference run a stopped and resumed one is compared with bit for bit
            environment={"LORAFT_TEST_GATE": str(workspace / GATE), "OMP_NUM_THREADS": "1",
                         "PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")])})

    @property
    def headers(self) -> dict:
        return {"X-Loraft-Token": self.token} if self.token else {}

    def get(self, path: str):
        response = httpx.get(self.url + path, headers=self.headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self) -> None:
        """`loraft ui` again on the same port (after kill()), its log appended to the same file."""
        self.log.close()
        UI.__init__(self, self.workspace, self.log_path, port=self.port, token=self.token)


class Gate:
    """tests/step_gate's folder in the workspace: hold(NAME, N) lets run NAME take N steps and wait there, held(NAME,
    N) waits until it does, release(NAME) lets it run to its end."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(exist_ok=True)

    def hold(self, name: str, steps: int) -> None:
        partial = self.folder / f"{name}.partial"
        partial.write_text(str(steps))
        os.replace(partial, self.folder / name)  # the run never reads a half-written number

    def held(self, name: str, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self.folder / f"{name}.held"
            if held.is_file() and held.read_text() == str(step):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{name} was never held after step {step}")

    def release(self, name: str) -> None:
        (self.folder / name).unlink()

    def release_all(self) -> None:
        """Let every run go (a failed test leaves no trainer waiting)."""
        for gate in self.folder.iterdir():
            if "." not in gate.name:  # NAME, not what a run writes beside it
                gate.unlink()


# a short run to chat with: fp32, with a fixed sample order
RUN_CONFIG = """\
model:
  name_or_path: {model}
data:
  path: data/train.jsonl
  max_length: 64
train:
  max_steps: {steps}
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
  learning_rate: 0.01
  logging_steps: 1
  save_steps: 1000
  precision: fp32
  sampling: random
generation:
  dtype: fp32
  max_new_tokens: 8
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bloom_dir) -> Path:
    root = tmp_path_factory.mktemp("ui-workspace")
    write_alpaca(root / "data" / "train.jsonl", repeat=4)
    shutil.copytree(tiny_bloom_dir, root / MODEL)  # paths the UI is given are relative to the workspace
    (root / "short.yaml").write_text(RUN_CONFIG.format(model=MODEL, steps=24), encoding="utf-8")
    # conftest's reference run, from the workspace's copies of its model and data (the same bytes)
    (root / "long.yaml").write_text(reference_yaml(MODEL, "data/train.jsonl"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ui(workspace, tmp_path_factory):
    running = UI(workspace, tmp_path_factory.mktemp("ui-log") / "ui.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def finished_run(ui) -> str:
    """A run started through the API (as a script would) and finished, for the pages that show one."""
    response = httpx.post(ui.url + "/api/runs", json={"name": "api-run", "config": "short.yaml"}, timeout=60)
    assert response.status_code == 202, response.text
    wait_for_status(ui, "api-run", {"finished"})
    return "api-run"


@pytest.fixture()
def browser(tmp_path):
    opened = Chromium(find_chromium(), tmp_path / "profile")
    opened.page("Page.enable")
    yield opened
    opened.close()


def open_page(browser: Chromium, url: str) -> None:
    browser.page("Page.navigate", {"url": url})
    browser.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete' && "
                     "window.loraftUI !== undefined")


def shoot(browser: Chromium, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        time.sleep(0.5)  # let the chart draw
        browser.screenshot(Path(SHOTS) / f"{name}.png")


def start_run_from_page(browser: Chromium, ui: UI, name: str, config_file: str) -> None:
    """The new-run form: a workspace YAML file, a name, Start; the page goes to the run's view."""
    open_page(browser, ui.url + "/#/new")
    browser.wait_for(f"[...document.querySelectorAll('#run-config option')].some(o => o.value === "
                     f"{json.dumps(config_file)})")
    browser.js(f"const s = document.getElementById('run-config'); s.value = {json.dumps(config_file)}; "
               "s.dispatchEvent(new Event('change', {bubbles: true})); "
               f"const n = document.getElementById('run-name'); n.value = {json.dumps(name)}; "
               "n.dispatchEvent(new Event('input', {bubbles: true}))")
    # the page shows the exact command it will run before it runs it
    command = browser.wait_for(f"(() => {{ const c = document.getElementById('plan-command').textContent; "
                               f"return c.startsWith('loraft train ') && c.includes({json.dumps(config_file + ' ')}) "
                               f"&& c.includes({json.dumps(name)}) "
                               "&& c; })()")
    assert f"output_dir={ui.workspace / name}" in command.replace("'", "")
    browser.js("document.getElementById('start-run').click()")
    browser.wait_for(f"document.querySelector('#run-view') && document.querySelector('#run-view').dataset.run === "
                     f"{json.dumps(name)}")


def page_status(browser: Chromium) -> str:
    return browser.js("document.getElementById('run-status') && document.getElementById('run-status').dataset.status")


def wait_for_status(ui: UI, name: str, wanted: set, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = next((run for run in ui.get("/api/runs") if run["name"] == name), None)
        if state and state["status"] in wanted:
            return state
        time.sleep(0.3)
    raise TimeoutError(f"{name} never reached {wanted}: {state}")


def wait_for_step(ui: UI, name: str, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = next((run for run in ui.get("/api/runs") if run["name"] == name), None)
        if state and (state.get("step") or 0) >= step:
            assert state["status"] == "running", state
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} never reached step {step}")


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


def test_a_run_outlives_the_browser_and_the_ui_and_stops_and_resumes_from_the_page(ui, workspace, reference_run,
                                                                                    browser, tmp_path):
    """One run started from the page: the whole browser is SIGKILLed and the run goes on; the UI is SIGKILLed under a
    second page and started again, and the page re-attaches and replays every step, those trained meanwhile too;
    Stop from the page gives `stopped` with a checkpoint, Resume finishes with an adapter bit-equal to an
    uninterrupted run's (conftest's reference run, fp32) and every step logged once. Then a second run's trainer is
    SIGKILLed before its first checkpoint: the page reads `interrupted`, with nothing to resume."""
    gate, name, steps = Gate(workspace / GATE), "closed-tab", list(range(1, REFERENCE_STEPS + 1))
    closed = Chromium(find_chromium(), tmp_path / "closed-profile")  # the browser that is SIGKILLed
    try:
        closed.page("Page.enable")
        gate.hold(name, 2)
        start_run_from_page(closed, ui, name, "long.yaml")
        closed.wait_for("window.loraftUI.points.loss.length >= 2")  # the live curve is drawing
        shoot(closed, "run-live")
        wait_for_step(ui, name, 2)  # asserts the run is still running when the browser dies
        gate.held(name, 2)
        closed.process.send_signal(signal.SIGKILL)  # the whole browser, not a polite tab close
        closed.process.wait()
        gate.hold(name, 4)  # the run goes on without a browser
        gate.held(name, 4)
        wait_for_step(ui, name, 4)

        # a page on the run; the UI is SIGKILLed under it, and the run trains two more steps without a UI
        open_page(browser, ui.url + f"/#/run/{name}")
        browser.wait_for("window.loraftUI.points.loss.length === 4")
        ui.kill()  # SIGKILL: the UI gets no chance to do anything; the run must not notice
        gate.hold(name, 6)
        gate.held(name, 6)
        time.sleep(1.5)  # the page is now without a server: its stream drops and it retries
        ui.restart()  # the module's UI from here on
        assert next(run for run in ui.get("/api/runs") if run["name"] == name)["status"] in ("running", "finished")
        browser.wait_for("window.loraftUI.points.loss.length === 6")  # re-attached: the steps it missed are replayed
        assert browser.js("window.loraftUI.points.loss.map(point => point[0])") == logged_steps(workspace / name)

        # Stop from the page while the run waits after step 6: it ends step 7 with a checkpoint
        browser.wait_for("!document.getElementById('stop-run').disabled")
        browser.js("document.getElementById('stop-run').click()")
        console = workspace / name / "console.log"
        deadline = time.monotonic() + 60
        while "SIGTERM: stopping after the current step" not in console.read_text(encoding="utf-8"):
            assert time.monotonic() < deadline, console.read_text(encoding="utf-8")[-2000:]
            time.sleep(0.05)
        gate.release(name)
        browser.wait_for("document.getElementById('run-status').dataset.status === 'stopped'", timeout=120)
        record = json.loads((workspace / name / "loraft_run.json").read_text())
        assert record["status"] == "stopped" and 3 <= record["step"] < REFERENCE_STEPS and record["step"] == 7
        assert (workspace / name / "checkpoints" / f"checkpoint-{record['step']}" / "trainer_state.json").is_file()
        shoot(browser, "run-stopped")

        browser.wait_for("!document.getElementById('resume-run').disabled")
        browser.js("document.getElementById('resume-run').click()")
        browser.wait_for("document.getElementById('run-status').dataset.status === 'finished'", timeout=240)
        state = wait_for_status(ui, name, {"finished", "failed", "interrupted"})
        assert state["status"] == "finished" and state["step"] == REFERENCE_STEPS
        assert (workspace / name / "adapter_model.safetensors").is_file()
        browser.wait_for(f"window.loraftUI.points.loss.length === {REFERENCE_STEPS}", timeout=30)
        page_steps = browser.js("window.loraftUI.points.loss.map(point => point[0])")
        assert page_steps == logged_steps(workspace / name) == steps
        resumed = load_file(workspace / name / "adapter_model.safetensors")
        reference = load_file(reference_run / "adapter_model.safetensors")
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert resumed[key].equal(reference[key]), key
        shoot(browser, "run-finished")

        # a trainer SIGKILLed before its first checkpoint
        gate.hold("killed-trainer", 2)
        start_run_from_page(browser, ui, "killed-trainer", "long.yaml")
        wait_for_step(ui, "killed-trainer", 2)
        pid = json.loads((workspace / "killed-trainer" / "loraft_run.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        browser.wait_for("document.getElementById('run-status').dataset.status === 'interrupted'", timeout=60)
        assert browser.js("!document.getElementById('resume-run').disabled") is False  # no checkpoint was written
        open_page(browser, ui.url + "/#/runs")
        browser.wait_for("document.querySelector('tr[data-run=\"killed-trainer\"] td.status').dataset.status === "
                         "'interrupted'")
        shoot(browser, "runs")
    finally:
        gate.release_all()
        closed.close()


def test_the_data_page_highlights_exactly_the_supervised_tokens(ui, browser, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)  # `loraft data preview` where the UI is, in this process
    assert main(["data", "preview", "data/train.jsonl", "--model", MODEL, "--max-length", "24", "--limit", "4",
                 "--json"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    open_page(browser, ui.url + "/#/data")
    browser.wait_for("document.getElementById('data-preview-button') !== null")
    browser.js(f"""(() => {{
        const set = (id, value) => {{ const e = document.getElementById(id); e.value = value;
                                      e.dispatchEvent(new Event('input', {{bubbles: true}})); }};
        set('data-path', 'data/train.jsonl'); set('data-model', {json.dumps(MODEL)});
        set('data-max-length', '24'); set('data-limit', '4');
        document.getElementById('data-preview-button').click(); }})()""")
    assert len(expected) >= 2  # the others lose every response token to the cut: training drops them, so does preview
    browser.wait_for(f"document.querySelectorAll('#samples .sample').length === {len(expected)}")
    shown = browser.js("""[...document.querySelectorAll('#samples .sample')].map(sample => ({
        supervised: [...sample.querySelectorAll('span.token')].map(t => t.classList.contains('supervised')),
        special: [...sample.querySelectorAll('span.token')].map(t => t.classList.contains('special')),
        cut: sample.querySelector('.cut') !== null }))""")
    assert [s["supervised"] for s in shown] == [[label != -100 for label in e["labels"]] for e in expected]
    assert [s["special"] for s in shown] == [[t["special"] for t in e["tokens"]] for e in expected]
    assert [s["cut"] for s in shown] == [e["truncated"] for e in expected] and any(s["cut"] for s in shown)
    shoot(browser, "data")

    # a file with a bad record: the one sentence naming the record, in the page
    (workspace / "data" / "bad.jsonl").write_text('{"instruction": "你好", "output": "好"}\n{"instruction": 3}\n',
                                                  encoding="utf-8")
    browser.js("const p = document.getElementById('data-path'); p.value = 'data/bad.jsonl'; "
               "document.getElementById('data-check-button').click()")
    error = browser.wait_for("document.getElementById('data-error').textContent")
    assert "bad.jsonl" in error and "line 2" in error


PAIRS = [  # DPO pairs in LLaMA-Factory's alpaca ranking format; the second one's answers are cut
    {"instruction": "人工智能是什么", "input": "", "chosen": "人工智能是计算机科学的一个分支。", "rejected": "不知道。"},
    {"instruction": "请把下面的句子翻译成英文", "input": "今天天气很好", "chosen": "The weather is nice today.",
     "rejected": "今天天气很好"},
]


def completion_cut(record: dict, side: str) -> bool:
    """Whether the length limits cut this side's completion (a cut prompt is marked in the prompt)."""
    kept = len(record[side]["input_ids"]) - record[side]["labels"].count(-100)
    return record[side]["full_length"] - record["prompt_length"] > kept


def test_the_data_page_shows_preference_records_side_by_side(ui, browser, workspace, monkeypatch, capsys):
    (workspace / "data" / "pairs.jsonl").write_text(
        "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in PAIRS), encoding="utf-8")
    monkeypatch.chdir(workspace)  # `loraft data preview` where the UI is, in this process
    assert main(["data", "preview", "data/pairs.jsonl", "--model", MODEL, "--max-length", "64", "--max-prompt-length",
                 "20", "--max-completion-length", "4", "--limit", "2", "--json"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    open_page(browser, ui.url + "/#/data")
    browser.wait_for("document.getElementById('data-max-completion-length') !== null")
    browser.js(f"""(() => {{
        const set = (id, value) => {{ const e = document.getElementById(id); e.value = value;
                                      e.dispatchEvent(new Event('input', {{bubbles: true}})); }};
        set('data-path', 'data/pairs.jsonl'); set('data-model', {json.dumps(MODEL)});
        set('data-max-length', '64'); set('data-max-prompt-length', '20'); set('data-max-completion-length', '4');
        set('data-limit', '2');
        document.getElementById('data-preview-button').click(); }})()""")
    browser.wait_for("document.querySelectorAll('#samples .sample.preference').length === 2")
    # each side drawn as the prompt's tokens (once, for both) then its own: the highlight is its labels
    shown = browser.js("""[...document.querySelectorAll('#samples .sample')].map(sample => {
        const flags = side => [...sample.querySelectorAll(`[data-side="${side}"] span.token`)].map(
            t => t.classList.contains('supervised'));
        return { chosen: flags('prompt').concat(flags('chosen')), rejected: flags('prompt').concat(flags('rejected')),
                 prompt_cut: sample.querySelector('[data-side="prompt"] .cut') !== null,
                 cut: ['chosen', 'rejected'].map(side =>
                     sample.querySelector(`[data-side="${side}"] .cut`) !== null) }; })""")
    assert [s["chosen"] for s in shown] == [[label != -100 for label in e["chosen"]["labels"]] for e in expected]
    assert [s["rejected"] for s in shown] == [[label != -100 for label in e["rejected"]["labels"]] for e in expected]
    assert [s["cut"] for s in shown] == [[completion_cut(e, side) for side in ("chosen", "rejected")] for e in expected]
    assert any(any(s["cut"]) for s in shown)
    assert [s["prompt_cut"] for s in shown] == [e["prompt_truncated"] for e in expected] == [False, True]
    browser.js("document.getElementById('data-check-button').click()")
    report = browser.wait_for("(() => { const r = document.querySelector('#data-report dl.facts'); "
                              "return r && r.textContent.includes('preference_alpaca') && r.textContent; })()")
    assert "2 chosen/rejected pairs" in report


def test_a_preference_runs_rewards_are_charted_and_an_sft_run_has_none(ui, browser, workspace):
    for name, extra in (("fake-dpo", lambda step: {"rewards/chosen": step / 10, "rewards/rejected": -step / 20,
                                                    "rewards/margins": step / 10 + step / 20,
                                                    "rewards/accuracies": min(1.0, step / 3)}),
                        ("fake-sft", lambda step: {})):
        run_dir = workspace / name
        run_dir.mkdir()
        (run_dir / "loraft_run.json").write_text(json.dumps({"status": "finished", "total_steps": 3}))
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": step, "loss": 0.7 - step / 10, **extra(step)}) + "\n" for step in (1, 2, 3)))
    open_page(browser, ui.url + "/#/run/fake-dpo")
    browser.wait_for("window.loraftUI.points['rewards/margins'].length === 3 && "
                     "!document.getElementById('reward-panel').hidden")
    assert browser.js("['rewards-chart', 'accuracy-chart'].every(id => "
                      "document.querySelector(`#${id} canvas`) !== null)")
    assert browser.js("window.loraftUI.points['rewards/accuracies'].map(point => point[1])") == [1 / 3, 2 / 3, 1.0]
    open_page(browser, ui.url + "/#/run/fake-sft")
    browser.wait_for("window.loraftUI.points.loss.length === 3")
    assert browser.js("document.getElementById('reward-panel').hidden") is True


def test_a_grpo_runs_rewards_are_charted_and_its_completions_shown(ui, browser, workspace):
    """metrics.jsonl's reward and reward_std on the reward chart, and completions.jsonl's newest rows (newest first)
    in the completions panel; a run without completions keeps the panel hidden."""
    run_dir = workspace / "fake-grpo"
    run_dir.mkdir()
    (run_dir / "loraft_run.json").write_text(json.dumps({"status": "finished", "total_steps": 3}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": step, "loss": 0.01, "reward": step / 4, "reward_std": 0.3, "rewards/number/mean": step / 4}) + "\n"
        for step in (1, 2, 3)))
    (run_dir / "completions.jsonl").write_text("".join(json.dumps(
        {"step": step, "prompt": f"Human: 请计算 {step} 加 {step}\n\nAssistant: ", "completion": f"答案 <{2 * step}>",
         "rewards": {"number": 1.0 if step == 3 else 0.0}, "advantage": step - 2.0}, ensure_ascii=False) + "\n"
        for step in (1, 2, 3)), encoding="utf-8")
    open_page(browser, ui.url + "/#/run/fake-grpo")
    browser.wait_for("window.loraftUI.points.reward.length === 3 && !document.getElementById('reward-panel').hidden")
    rows = browser.wait_for("(() => { const rows = [...document.querySelectorAll('#completions-rows tr')]; "
                            "return !document.getElementById('completions-panel').hidden && rows.length === 3 && "
                            "rows.map(r => [...r.cells].map(c => c.textContent)); })()")
    assert rows[0][:3] == ["3", "Human: 请计算 3 加 3\n\nAssistant: ", "答案 <6>"]  # newest first, text as text
    assert rows[0][3] == "number 1.000" and rows[2][4] == "-1.000"
    plain = workspace / "fake-no-completions"
    plain.mkdir()
    (plain / "loraft_run.json").write_text(json.dumps({"status": "finished", "total_steps": 1}))
    (plain / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    open_page(browser, ui.url + "/#/run/fake-no-completions")
    browser.wait_for("window.loraftUI.points.loss.length === 1")
    assert browser.js("document.getElementById('completions-panel').hidden") is True


def test_a_preference_eval_job_shows_its_accuracies(ui, browser, workspace):
    """An eval job on preference records (metrics as `loraft eval` writes them) shows the run beside its starting
    point, each with its measure, not the SFT rows."""
    run_dir = workspace / "fake-dpo-eval"
    run_dir.mkdir()
    (run_dir / "loraft_run.json").write_text(json.dumps({"status": "finished", "total_steps": 1}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    job_dir = workspace / ".loraft-ui" / "jobs" / "20261130-120000-eval-abcd"
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({"id": job_dir.name, "kind": "eval", "run": "fake-dpo-eval",
                                                  "argv": ["eval"],
                                                  "started_at": "2026-11-30 12:00:00"}))
    (job_dir / "result.json").write_text(json.dumps({"exit_code": 0, "ended_at": "2026-11-30 12:00:05"}))
    column = {"pairs": 4, "margin": 0.5, "reward_chosen": 0.3, "reward_rejected": -0.2, "logprob_accuracy": 0.75}
    (job_dir / "metrics.json").write_text(json.dumps({
        "records": 4, "data": "prefs.jsonl", "objective": "dpo", "preference": {
            "adapter": {**column, "measure": "implicit reward", "accuracy": 1.0},
            "reference": {**column, "measure": "log-probability", "accuracy": 0.25}}}))
    open_page(browser, ui.url + "/#/run/fake-dpo-eval")
    browser.wait_for("document.querySelector('li.job .eval-table') !== null")
    rows = browser.js("[...document.querySelectorAll('li.job .eval-table tr')].map(row => "
                      "[...row.children].map(cell => cell.textContent))")
    assert rows[0][1:] == ["Starting point", "Adapter"]
    assert rows[1] == ["measure", "log-probability", "implicit reward"]
    assert rows[2] == ["preference accuracy", "0.2500", "1.0000"]
    assert "exact match %" not in [row[0] for row in rows]


def _visible_texts(browser: Chromium) -> list[str]:
    return browser.js("""(() => { const texts = []; const walk = document.createTreeWalker(document.body,
        NodeFilter.SHOW_TEXT); while (walk.nextNode()) { const node = walk.currentNode; const box = node.parentElement;
        if (node.textContent.trim() && box.offsetParent !== null && !box.closest('iframe, script, style'))
        texts.push(node.textContent.trim()); } return texts; })()""")


PAGE_READY = {  # what each page shows once its data has arrived
    "runs": "document.querySelector('tr[data-run] td.status') !== null",
    "new": "document.querySelector('#schema-form [data-key]') !== null && "
           "document.getElementById('plan-command').textContent !== ''",
    "data": "document.getElementById('data-preview-button') !== null",
    "run": "document.getElementById('run-status').dataset.status === 'finished' && "
           "window.loraftUI.points.loss.length > 0",
}


def test_the_language_switch_changes_every_visible_string(ui, browser, finished_run):
    english = json.loads((CATALOGS / "en.json").read_text(encoding="utf-8"))
    chinese = json.loads((CATALOGS / "zh-CN.json").read_text(encoding="utf-8"))
    translated = {value for key, value in english.items() if chinese[key] != value}
    for page in ("#/runs", "#/new", "#/data", f"#/run/{finished_run}"):
        open_page(browser, ui.url + "/" + page)
        browser.js("window.loraftUI.setLang('en')")
        browser.wait_for(PAGE_READY[page.split("/")[1]])  # the page fetched its data (runs, schema, run) and drew it
        before = _visible_texts(browser)
        assert any(text in translated for text in before), page
        browser.js("window.loraftUI.setLang('zh-CN')")
        browser.wait_for("document.documentElement.lang === 'zh-CN'")
        deadline = time.monotonic() + 10  # the switch may re-render parts after fetching them again
        while True:
            left_in_english = [text for text in _visible_texts(browser) if text in translated]
            if not left_in_english or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not left_in_english, (page, left_in_english)
        for key, text in browser.js("[...document.querySelectorAll('[data-i18n]')].map(e => [e.dataset.i18n, "
                                    "e.textContent])"):
            assert text == chinese[key], key
        if page == "#/new":
            shoot(browser, "new-run-zh")
    browser.js("window.loraftUI.setLang('en')")

    # the chat frames (loraft serve's page) follow the UI's language, live
    open_page(browser, ui.url + f"/#/chat/{finished_run}")
    frames = "['chat-adapter', 'chat-base'].map(id => document.getElementById(id).contentWindow)"
    browser.wait_for(f"{frames}.every(w => w.document.readyState === 'complete' && w.document.querySelector('[data-t]'))")
    for code in ("zh-CN", "en", "zh-CN"):
        browser.js(f"window.loraftUI.setLang({json.dumps(code)})")
        browser.wait_for(f"{frames}.every(w => w.document.documentElement.lang === {json.dumps(code)})")
        assert browser.js(f"""{frames}.every(w => {{ const words = w.eval('TEXT')[{json.dumps(code)}];
            return [...w.document.querySelectorAll('[data-t]')].every(e => e.id === 'model-name' ||
                     e.textContent === words[e.dataset.t]) &&
                   w.document.getElementById('prompt').placeholder === words.placeholder; }})""")
    assert browser.js(f"{frames}[0].eval(\"JSON.stringify(Object.keys(TEXT.en)) === "
                      f"JSON.stringify(Object.keys(TEXT['zh-CN']))\")")


def test_chat_with_the_run_and_its_base_side_by_side(ui, browser, finished_run, workspace):
    other = finished_run + "-copy"  # a second finished run of the same base
    if not (workspace / other).exists():
        shutil.copytree(workspace / finished_run, workspace / other)
    open_page(browser, ui.url + f"/#/chat/{finished_run}")
    browser.wait_for(f"[...document.getElementById('chat-compare').options].some(o => o.value === {json.dumps(other)})",
                     timeout=60)
    browser.js(f"{{ const s = document.getElementById('chat-compare'); s.value = {json.dumps(other)}; "
               "s.dispatchEvent(new Event('change')); }")
    for frame, model in (("chat-adapter", finished_run), ("chat-base", f"{finished_run}/base"), ("chat-other", other)):
        browser.wait_for(  # each frame asked its own model for its name: all are loaded and answering
            f"(() => {{ const d = document.getElementById({json.dumps(frame)}).contentDocument; "
            f"const m = d && d.getElementById('model-name'); return m && m.textContent === {json.dumps(model)}; }})()",
            timeout=120)
    for frame in ("chat-adapter", "chat-other"):
        browser.js(f"{{ const d = document.getElementById({json.dumps(frame)}).contentDocument; "
                   "d.getElementById('prompt').value = '人工智能是什么'; d.getElementById('temperature').value = '0'; "
                   "d.getElementById('send').click(); }")
        answer = browser.wait_for(f"(() => {{ const d = document.getElementById({json.dumps(frame)}).contentDocument; "
                                  "const m = [...d.querySelectorAll('.message.assistant')].pop(); "
                                  "return m && m.dataset.done === 'true' && m.textContent; })()", timeout=120)
        assert answer
    # three chat models, one copy of the base in the UI's memory
    chat = httpx.get(ui.url + "/api/info", timeout=30).json()["chat"]
    assert chat["base_copies"] == 1
    assert sorted(map(tuple, chat["models"])) == [(finished_run, None, False), (finished_run, None, True),
                                                  (other, None, False)]
    shoot(browser, "chat")


def test_security_token_host_and_paths(workspace, tmp_path, browser):
    refused = subprocess.run([sys.executable, "-m", "loraft.cli", "ui", "--workspace", str(workspace), "--host",
                              "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "LORAFT_UI_TOKEN": ""})
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--token" in refused.stderr

    guarded = UI(workspace, tmp_path / "ui.log", token="s3cret-token")
    try:
        assert httpx.get(guarded.url + "/api/runs", timeout=10).status_code == 401
        assert httpx.get(guarded.url + "/api/runs", headers={"X-Loraft-Token": "wrong"}, timeout=10).status_code == 401
        assert httpx.get(guarded.url + "/api/runs", headers={"Host": "evil.example"}, timeout=10).status_code in (
            400, 403, 421)
        outside = httpx.post(guarded.url + "/api/data/check", headers=guarded.headers, timeout=30,
                             json={"path": "../" + workspace.name + "/data/train.jsonl"})
        assert outside.status_code == 400 and "workspace" in outside.json()["error"]
        (workspace / "escape").symlink_to("/etc", target_is_directory=True)
        through_link = httpx.post(guarded.url + "/api/data/check", headers=guarded.headers, timeout=30,
                                  json={"path": "escape/passwd"})
        assert through_link.status_code == 400 and "workspace" in through_link.json()["error"]
        assert "access-control-allow-origin" not in {k.lower() for k in through_link.headers}

        # the page asks for the token after the first 401, then shows the runs
        open_page(browser, guarded.url + "/#/runs")
        browser.wait_for("getComputedStyle(document.getElementById('token-box')).display !== 'none' && "
                         "!document.getElementById('token-box').hidden")
        browser.js("const k = document.getElementById('token'); k.value = 's3cret-token'; "
                   "k.dispatchEvent(new Event('change', {bubbles: true}))")
        browser.wait_for("document.getElementById('token-box').hidden && (document.querySelector('tr[data-run]') "
                         "!== null || !document.getElementById('runs-empty').hidden)", timeout=30)
    finally:
        (workspace / "escape").unlink(missing_ok=True)
        guarded.stop()
