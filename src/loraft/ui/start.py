"""`loraft ui`'s process: check the address and token, enter the workspace, then serve the app (loraft.ui.app).

Entering the workspace (enter_workspace) asks the kernel to confine this process and everything it starts to the
workspace and the caches; Landlock confines only the thread that asks and what it starts afterwards, so it happens
here, before the app's imports (torch among them) start a thread of their own.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from loraft.errors import RunError
from loraft.files import cache_home
from loraft.serve.validation import is_loopback
from loraft.ui.requests import UISettings
from loraft.ui.workspace import Workspace, caches


def enter_workspace(workspace: Workspace, confine: bool = True, log=print) -> Optional[int]:
    """Make this process (the UI) work in `workspace`: its working directory, temporary files in
    `.loraft-ui/tmp`, matplotlib's cache under loraft's; then, with `confine` and where the kernel has Landlock,
    let this process and every process it starts open files only beneath the workspace, the caches (read and
    write), /dev, and the system's and Python's folders (read). The kernel checks each open at the moment it
    happens, so a symbolic link swapped after `place` checked a path still cannot lead outside.

    Call it once, before any thread starts. Returns the Landlock ABI applied, or None (not applied: logged).
    """
    from loraft import landlock

    temporary = workspace.ui_dir / "tmp"
    temporary.mkdir(parents=True, exist_ok=True)
    cache_home().mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(temporary)  # children inherit it; Python's tempfile reads it again below
    os.environ.setdefault("MPLCONFIGDIR", str(cache_home() / "matplotlib"))
    if not workspace.allow_hub:  # nothing the UI starts downloads: hub models and data, llama.cpp's converter
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LORAFT_OFFLINE="1")
    tempfile.tempdir = None
    # the read roots before leaving the folder the UI was started from: `python -m` put it on sys.path, and it
    # is no business of the UI's (system_read_roots leaves out the working directory)
    started_in = Path.cwd().resolve()
    system_roots = landlock.system_read_roots()
    sys.path[:] = [entry for entry in sys.path if not entry or Path(entry).resolve() != started_in]
    os.chdir(workspace.root)
    if not confine:
        log("loraft ui: kernel confinement off (--no-kernel-confinement); paths are checked before use")
        return None
    writable = [workspace.root, *caches(), Path("/dev")]
    try:
        applied = landlock.restrict(read=[*system_roots, *writable], write=writable)
    except RuntimeError as exc:  # a thread started before us: our bug, said rather than half-applied
        log(f"loraft ui: kernel confinement not applied ({exc}); paths are checked before use")
        return None
    except OSError as exc:  # the kernel refused a rule: better not to start than to start half-confined
        raise RunError(f"loraft ui: kernel confinement failed ({exc}); start with --no-kernel-confinement to "
                       "rely on the path checks alone") from None
    if applied is None:
        log("loraft ui: this kernel has no Landlock: paths are checked before use, not at every open")
    return applied


def serve_ui(workspace: Union[str, Path], host: str = "127.0.0.1", port: int = 7860, token: Optional[str] = None,
             allowed_hosts: Sequence[str] = (), log=print, kernel_confinement: bool = True, **limits) -> None:
    """Run the UI under uvicorn until Ctrl-C; runs it started keep running after it ends.

    The UI works in its workspace: it becomes the working directory, temporary files go to `.loraft-ui/tmp`, and
    where the kernel has Landlock this process and all it starts can open files only in the workspace, loraft's
    and Hugging Face's caches and the system's and Python's own folders (enter_workspace).

    Args:
        kernel_confinement: False leaves the kernel out (`--no-kernel-confinement`); paths are still checked.
        limits: UISettings' allow_hub, time_limit, max_runs, max_jobs, max_streams and max_chat_loads.
    Raises:
        RunError (one sentence): a non-loopback address without a token, a missing workspace, a bad port, or an
            address that cannot be bound.
    """
    token = token or None
    if token is not None and not (token.isascii() and token.isprintable()):
        # a browser's fetch cannot carry other characters in a header: the page could never send it
        raise RunError("loraft ui: the token must be printable ASCII (a browser cannot send other characters in "
                       "a header)")
    if not is_loopback(host) and token is None:
        raise RunError(f"loraft ui: refusing to listen on {host} without a token (anyone who reaches it could start "
                       "runs on this machine); pass --token T or set LORAFT_UI_TOKEN")
    root = Path(workspace)
    if not root.is_dir():
        raise RunError(f"{workspace}: workspace directory not found")
    if not 0 <= port <= 65535:
        raise RunError(f"--port must be between 0 and 65535 (got {port})")
    settings = UISettings(token=token, host=host, port=port, allowed_hosts=tuple(allowed_hosts), warm_worker=True,
                          **limits)
    place = Workspace(root, settings.allow_hub)
    kernel = enter_workspace(place, confine=kernel_confinement, log=log)
    from loraft.serve.app import run_uvicorn  # torch comes with these: after entering
    from loraft.ui.app import create_app

    app = create_app(place, settings)
    app.state.kernel_confinement = kernel
    # a wildcard bind answers on loopback too; an IPv6 address goes in brackets in a URL
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    log(f"loraft ui: http://{shown}:{port}/  (workspace {place.root}; Ctrl-C stops the UI, not its runs)")
    # streams of live runs never end on their own: give them a moment at shutdown, not uvicorn's forever
    run_uvicorn(app, host, port, shutdown_timeout=3, log_level="warning", what="the UI")
