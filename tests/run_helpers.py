"""Finished tiny runs for the eval / merge / serve tests, trained once per test session and shared.

A run is trained with `loraft.train.train` (the real pipeline) into the session's base temp directory and
reused by every test module that asks for the same name.
"""

from __future__ import annotations

from pathlib import Path

from conftest import write_alpaca


def trained_run(tmp_path_factory, name: str, base_model_dir: Path, overrides: list[str] = ()) -> Path:
    """Train (or reuse) a few-step run of `base_model_dir` on the alpaca records; returns its directory.

    The learning rate is high on purpose: after 4 steps the LoRA B matrices and any modules_to_save copy
    differ clearly from their initial values, so merge / eval invariants compare real changes.
    """
    from loraft.config import load_config
    from loraft.rundir import read_run_status
    from loraft.train import train

    root = tmp_path_factory.getbasetemp() / "loraft-runs"
    run_dir = root / name
    if read_run_status(run_dir) == "finished":
        return run_dir
    data = root / "alpaca.jsonl"
    if not data.is_file():
        write_alpaca(data)
    config = load_config(None, [
        f"model.name_or_path={base_model_dir}", f"data.path={data}", f"output_dir={run_dir}", "overwrite=true",
        "train.max_steps=4", "train.learning_rate=0.01", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.logging_steps=1", "train.save_steps=1000",
        "generation.max_new_tokens=8",
        # fp32 with the reference's order, and fp32 generation, on every CPU: the e2e chat test needs this run's
        # greedy answer to be several pieces long, and the serve / eval tests compare answers with fp32 generation
        "train.precision=fp32", "train.sampling=random", "generation.dtype=fp32", *overrides,
    ])
    return train(config)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A server started by `command(port)` in a child process on 127.0.0.1; up once `ready_path` answers 200.

    Args:
        port: the port to bind (a restarted server takes its predecessor's); None = a free one.
        headers: sent with the readiness probe (a token).
        environment: added to this process's environment for the child.
    """

    def __init__(self, command, log_path: Path, stop_timeout: float = 60, port: int | None = None,
                 ready_path: str = "/health", headers: dict | None = None, environment: dict | None = None):
        import os
        import subprocess
        import time

        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.stop_timeout = log_path, stop_timeout
        self.log = log_path.open("ab")  # a restarted server appends to its predecessor's log
        self.process = subprocess.Popen(command(self.port), stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited early:\n" + log_path.read_text(errors="replace"))
            try:
                if httpx.get(self.url + ready_path, headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError("the server did not come up:\n" + log_path.read_text(errors="replace"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
