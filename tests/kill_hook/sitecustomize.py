"""Loaded by a process started with this folder on PYTHONPATH (tests/test_crash_safety.py's training runs).

With KILL_ON="EVENT|SUBSTRING|N" set, the process SIGKILLs itself the Nth time Python raises audit event EVENT
(e.g. `open`, `os.rename`) for a path containing SUBSTRING: before that open or rename happens, so the file it
would have written or moved into place never appears. That is how a test kills training inside a checkpoint
save or inside the final save, at a moment it chooses.
"""

import os
import signal
import sys

_spec = os.environ.get("KILL_ON")
if _spec:
    _event, _substring, _count = _spec.split("|")
    _seen = [0]

    def _kill_on(event, args):
        if event != _event or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if _substring in os.fsdecode(args[0]):
            _seen[0] += 1
            if _seen[0] == int(_count):
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(_kill_on)
