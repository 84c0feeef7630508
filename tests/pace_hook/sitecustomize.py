"""Loaded by a process started with this folder on PYTHONPATH (tests/test_ui_e2e.py's UI and the runs it starts).

With LORAFT_TEST_STEP_SECONDS set, every training step of loraft's Trainer first sleeps that long, so a test can act
in the middle of a run (kill the browser or the UI, press Stop) on any machine, however fast its steps are. The
patch is applied when loraft.objectives.sft (LoraftTrainer) is first imported; nothing else changes.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time

_pause = float(os.environ.get("LORAFT_TEST_STEP_SECONDS") or 0)


class _SlowSteps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "loraft.objectives.sft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            step = module.LoraftTrainer.training_step

            def slow_step(self, *args, **kwargs):
                time.sleep(_pause)
                return step(self, *args, **kwargs)

            module.LoraftTrainer.training_step = slow_step

        spec.loader.exec_module = exec_module
        return spec


if _pause > 0:
    sys.meta_path.insert(0, _SlowSteps())
