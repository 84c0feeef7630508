"""Loaded by a process started with this folder on PYTHONPATH (tests/test_crash_safety.py's training runs).

With KILL_ON set, the process SIGKILLs itself at the first write that KILL_ON names, before that write happens,
so the file it would have written or moved into place never appears. That is how a test kills training inside a
checkpoint save or inside the final save, at a moment named by what is being written (never by a count of
writes, which one more record write would silently move):

    open|SUFFIX               a write-mode open of a path ending in SUFFIX
                              (e.g. `open|checkpoints/.staging/checkpoint-2/adapter_config.json`)
    os.rename|SUFFIX          a rename (os.rename / os.replace) onto a path ending in SUFFIX
                              (e.g. `os.rename|checkpoints/checkpoint-4`)
    os.rename|SUFFIX|KEY=VAL  the same, only when the file being moved is a JSON object whose KEY is VAL
                              (e.g. `os.rename|/loraft_run.json|status=finished`: the run record that says finished)

Python's audit hooks see writes made through Python (open, os.replace, shutil); a file written from C or Rust
(torch.save, safetensors) raises no open event, so name a file Python writes, or a rename.
"""

import json
import os
import signal
import sys

_spec = os.environ.get("KILL_ON")
if _spec:
    _event, _suffix, *_condition = _spec.split("|")
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _path(value):
        return os.fsdecode(value).replace(os.sep, "/") if isinstance(value, (str, bytes, os.PathLike)) else None

    def _condition_holds(source) -> bool:
        if not _condition:
            return True
        key, expected = _condition[0].split("=", 1)
        try:
            with open(source, encoding="utf-8") as handle:
                payload = json.load(handle)
        except (OSError, ValueError):
            return False
        return isinstance(payload, dict) and str(payload.get(key)) == expected

    def _kill_on(event, args):
        if event != _event:
            return
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _write_flags):
                return
            target, source = _path(path), None
        elif event == "os.rename":
            source, target = _path(args[0]), _path(args[1])
        else:
            return
        if target and target.endswith(_suffix) and _condition_holds(source):
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(_kill_on)
