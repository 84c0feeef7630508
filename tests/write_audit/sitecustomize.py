"""Loaded by every Python process started with this folder on PYTHONPATH (tests/test_distributed.py's torchrun).

In each torchrun worker (RANK is set) it logs, one line per event to $WRITE_AUDIT_LOG_DIR/rank{RANK}.txt, every
write-mode open, rename, removal and directory creation under $WRITE_AUDIT_DIR, as `event relative/path`.
Python's audit hooks see writes made through Python (open, os.replace, os.makedirs, shutil); files written from
C or Rust (torch.save, safetensors, tokenizers) raise no event, so the test also compares directory listings.
"""

import os
import sys

_watched = os.environ.get("WRITE_AUDIT_DIR")
_rank = os.environ.get("RANK")
if _watched and _rank is not None:
    _log = open(os.path.join(os.environ["WRITE_AUDIT_LOG_DIR"], f"rank{_rank}.txt"), "a", buffering=1)
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _path_events = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink", "os.link",
                    "os.chmod", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move"}

    def _log_writes(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _write_flags):
                return
            args = (path,)
        elif event not in _path_events:
            return
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.abspath(os.fsdecode(path))
                if full == _watched or full.startswith(_watched + os.sep):
                    _log.write(f"{event} {os.path.relpath(full, _watched)}\n")

    sys.addaudithook(_log_writes)
