"""Loaded by a process started with this folder on PYTHONPATH (tests/test_ui_e2e.py's UI and the runs it starts).

With LORAFT_TEST_GATE set to a folder, a training run may be held before any optimizer step, so a test can act in the
middle of a run (kill the browser or the UI, press Stop) on any machine, however fast its steps are, without a sleep:

    GATE/NAME          the number of steps run NAME (its run directory's name) may take; while it has taken that
                       many, it waits before the next one. No file: the run is not held (a test lets a run go by
                       removing it).
    GATE/NAME.held     written by the run: the step it has taken and waits after.

A run held for MAX_HOLD seconds goes on by itself: a test that died while holding it leaves no process waiting.

The patch is on transformers' CallbackHandler.on_step_begin, so it holds whichever Trainer class runs the steps; it is
applied when transformers.trainer_callback is first imported, and nothing else changes.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path

_gate = os.environ.get("LORAFT_TEST_GATE")
MAX_HOLD = 600


def _run_name(output_dir) -> str:
    """The run directory's name: the nearest folder above Trainer's output_dir (the staging folder) with a record."""
    for folder in Path(output_dir).resolve().parents:
        if (folder / "loraft_run.json").is_file():
            return folder.name
    return Path(output_dir).name


def _wait(name: str, done: int) -> None:
    gate = Path(_gate) / name
    announced, deadline = False, time.monotonic() + MAX_HOLD
    while time.monotonic() < deadline:
        try:
            allowed = int(gate.read_text() or 0)
        except (OSError, ValueError):
            return  # no gate for this run (the test writes one whole, with a rename)
        if done < allowed:
            return
        if not announced:
            partial = gate.with_name(f"{name}.held.partial")
            partial.write_text(str(done))
            os.replace(partial, gate.with_name(f"{name}.held"))
            announced = True
        time.sleep(0.01)  # a signal (Stop) is handled here at once


class _StepGate(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer_callback":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            on_step_begin = module.CallbackHandler.on_step_begin

            def gated(self, args, state, control):
                _wait(_run_name(args.output_dir), state.global_step)
                return on_step_begin(self, args, state, control)

            module.CallbackHandler.on_step_begin = gated

        spec.loader.exec_module = exec_module
        return spec


if _gate:
    sys.meta_path.insert(0, _StepGate())
