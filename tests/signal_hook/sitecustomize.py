"""Loaded by a process started with this folder on PYTHONPATH (tests/test_lifecycle.py's training runs).

With SIGNAL_ON set, the process sends itself a signal at the first write that names it, before that write happens:
a signal at a moment named by what is being written, as tests/kill_hook kills at one. SIGNAL_ON holds one or more
`SIGNAME@EVENT|SUFFIX`, separated by `;`, each sent once:

    SIGTERM@os.rename|checkpoints/checkpoint-2                      when checkpoint-2 is moved into place
    SIGINT@open|checkpoints/.staging/checkpoint-3/adapter_config.json  while checkpoint-3 is being staged

EVENT|SUFFIX as in tests/kill_hook: a write-mode `open` of a path ending in SUFFIX, or an `os.rename` /
`os.replace` onto one. A signal whose action is the default (a second stop signal) ends the process right there.
"""

import os
import signal
import sys

_spec = os.environ.get("SIGNAL_ON")
if _spec:
    _pending = []
    for _item in _spec.split(";"):
        _name, _where = _item.split("@", 1)
        _event, _suffix = _where.split("|", 1)
        _pending.append((getattr(signal, _name), _event, _suffix))
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _path(value):
        return os.fsdecode(value).replace(os.sep, "/") if isinstance(value, (str, bytes, os.PathLike)) else None

    def _signal_on(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _write_flags):
                return
            target = _path(path)
        elif event == "os.rename":
            target = _path(args[1])
        else:
            return
        for entry in list(_pending):
            number, wanted, suffix = entry
            if wanted == event and target and target.endswith(suffix):
                _pending.remove(entry)
                os.kill(os.getpid(), number)

    sys.addaudithook(_signal_on)
