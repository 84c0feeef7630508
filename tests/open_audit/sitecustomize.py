"""Loaded by every Python process started with this folder on PYTHONPATH (tests/test_ui_fuzz.py's `loraft ui` and
everything it launches: the workers' fork server, training runs, jobs).

With $OPEN_AUDIT_LOG_DIR set, it logs every file or folder the process opens or lists that lies outside the roots in
$OPEN_AUDIT_ALLOWED (os.pathsep-separated), one line each to $OPEN_AUDIT_LOG_DIR/{pid}.txt:
`{pid} {event} {realpath} (asked: {path as given})`; {pid}.cmd holds the process's command line. Reading or
listing a path that does not exist reads nothing and is not logged; a write-mode open is logged wherever it leads.
The path is resolved from the working directory with symbolic links followed, so a link in the workspace that leads
out counts as out. A forked child (multiprocessing) keeps its
parent's hook and file; each line names the process that wrote it.

Python's audit hooks see what goes through Python: `open` (builtins.open, os.open, io.open_code for every module
imported), `os.listdir` and `os.scandir` (the import system lists sys.path folders). Files opened from C or Rust
(tokenizers, safetensors, torch) raise no event. An open by a descriptor (an int) names no path and is skipped; a
name relative to a `dir_fd` (shutil.rmtree's) is taken from the working directory, as the event does not carry it.
"""

import os
import sys
import threading

_log_dir = os.environ.get("OPEN_AUDIT_LOG_DIR")
if _log_dir:
    _allowed = tuple(os.path.join(os.path.realpath(root), "")  # "/a/b/": so "/a/bc" is not beneath "/a/b"
                     for root in os.environ.get("OPEN_AUDIT_ALLOWED", "").split(os.pathsep) if root)
    # opened once, before the hook exists: its own open is never audited, and a confined child can still write it
    _log = open(os.path.join(_log_dir, f"{os.getpid()}.txt"), "a", buffering=1, encoding="utf-8",
                errors="backslashreplace")
    try:  # which command each pid ran, for the report (sys.argv is not set yet)
        with open("/proc/self/cmdline", "rb") as _source:
            _command = _source.read().replace(b"\0", b" ").strip()
        with open(os.path.join(_log_dir, f"{os.getpid()}.cmd"), "wb") as _target:
            _target.write(_command)
    except OSError:  # no /proc (macOS)
        pass
    _audited_events = frozenset({"open", "os.listdir", "os.scandir"})
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _inside_hook = threading.local()  # realpath and the log's write must not audit themselves

    def _log_opens_outside(event, args):
        if event not in _audited_events or getattr(_inside_hook, "active", False):
            return
        _inside_hook.active = True
        try:
            path = args[0] if args else None
            if path is None:  # os.listdir() / os.scandir() without an argument: the working directory
                path = "."
            if isinstance(path, int):  # a descriptor: no path
                return
            asked = os.fsdecode(path)
            writes = event == "open" and len(args) > 2 and (
                (isinstance(args[1], str) and any(c in args[1] for c in "wax+")) or (args[2] or 0) & _write_flags)
            if not writes and not os.path.lexists(asked):
                return  # reading or listing what does not exist reads nothing (matplotlib probes ~/.fonts)
            real = os.path.realpath(asked)
            if not os.path.join(real, "").startswith(_allowed):
                _log.write(f"{os.getpid()} {event} {real} (asked: {asked})\n")
        except Exception:  # a hook that raises would fail the open it watches: never
            pass
        finally:
            _inside_hook.active = False

    sys.addaudithook(_log_opens_outside)
