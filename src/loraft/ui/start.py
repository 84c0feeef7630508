"""`loraft ui`'s process: check the address and token, enter the workspace, then serve the app (loraft.ui.app).

Entering the workspace (Workspace.enter) asks the kernel to confine this process and everything it starts to the
workspace and the caches; Landlock confines only the thread that asks and what it starts afterwards, so it happens
here, before the app's imports (torch among them) start a thread of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from loraft.errors import RunError
from loraft.serve.validation import is_loopback
from loraft.ui.requests import UISettings
from loraft.ui.workspace import Workspace


def serve_ui(workspace: Union[str, Path], host: str = "127.0.0.1", port: int = 7860, token: Optional[str] = None,
             allowed_hosts: Sequence[str] = (), log=print, kernel_confinement: bool = True, **limits) -> None:
    """Run the UI under uvicorn until Ctrl-C; runs it started keep running after it ends.

    The UI works in its workspace: it becomes the working directory, temporary files go to `.loraft-ui/tmp`, and
    where the kernel has Landlock this process and all it starts can open files only in the workspace, loraft's
    and Hugging Face's caches and the system's and Python's own folders (Workspace.confine_process).

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
    kernel = place.enter(confine=kernel_confinement, log=log)
    from loraft.serve.app import run_uvicorn  # torch comes with these: after entering
    from loraft.ui.app import create_app

    app = create_app(place, settings)
    app.state.kernel_confinement = kernel
    # a wildcard bind answers on loopback too; an IPv6 address goes in brackets in a URL
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    log(f"loraft ui: http://{shown}:{port}/  (workspace {place.root}; Ctrl-C stops the UI, not its runs)")
    # streams of live runs never end on their own: give them a moment at shutdown, not uvicorn's forever
    run_uvicorn(app, host, port, shutdown_timeout=3, log_level="warning", what="the UI")
