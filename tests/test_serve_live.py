"""The real server on 127.0.0.1 (a `serve()` process with options the CLI may not expose): SIGTERM with a
shutdown timeout, and a bounded load test (slow: LORAFT_SLOW=1 or -m slow). All traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from run_helpers import ServerProcess, trained_run

LONG = 1500  # tokens: seconds of generation on the tiny model
LOAD_CLIENTS, LOAD_SECONDS = 64, 60


class LiveServer(ServerProcess):
    """`loraft.serve.serve(run_dir, **options)` in a child process on 127.0.0.1, up once /health answers."""

    def __init__(self, run_dir: Path, log_path: Path, **options):
        code = "import json, sys; from loraft.serve import serve; serve(**json.loads(sys.argv[1]))"
        super().__init__(lambda port: [sys.executable, "-c", code, json.dumps(
            {"run_dir": str(run_dir), "host": "127.0.0.1", "port": port, **options})], log_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bloom_dir):
    return trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)


def chat(run_dir, **extra) -> dict:
    return {"model": run_dir.name, "messages": [{"role": "user", "content": "写一首关于春天的诗"}], "temperature": 0,
            **extra}


# --- 14. SIGTERM: queued and in-flight requests get shutdown_timeout seconds, then are cancelled ----------


def test_sigterm_cancels_what_is_left_after_the_shutdown_timeout(run_dir, tmp_path):
    server = LiveServer(run_dir, tmp_path / "serve.log", max_tokens_cap=LONG, shutdown_timeout=1, max_batch=1)
    try:
        body = chat(run_dir, max_tokens=LONG, min_tokens=LONG)
        outcomes: dict = {}

        def queued(index: int) -> None:
            try:
                response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                outcomes[index] = (response.status_code, response.json())
            except httpx.HTTPError as exc:  # the connection closed before an answer
                outcomes[index] = (None, type(exc).__name__)

        events = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:  # the first piece of the answer: the request holds the model
                if line.startswith("data: ") and '"content":""' not in line.replace(" ", ""):
                    events.append(line)
                    break
            workers = [threading.Thread(target=queued, args=(i,)) for i in range(3)]
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 60
            while httpx.get(server.url + "/health", timeout=5).json()["waiting"] != 3:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.01)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                for line in lines:
                    if line.startswith("data: "):
                        events.append(line)
            except httpx.HTTPError:
                pass  # the stream is cut when its task is cancelled
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        stopped_after = time.monotonic() - signalled
        for worker in workers:
            worker.join(timeout=60)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    # four generations of LONG tokens were waiting; the server gave them 1 s, then cancelled them
    assert stopped_after < 10, (stopped_after, log)
    # the answer being streamed is cut (its in-band reason races the process exit); the queued ones get a 503
    assert "data: [DONE]" not in events
    assert "server_shutting_down" in events[-1] or '"finish_reason": null' in events[-1]
    assert len(outcomes) == 3
    for status, body in outcomes.values():
        assert status is None or (status == 503 and body["error"]["code"] == "server_shutting_down"), (status, body)
    assert "Exception in ASGI application" not in log and "Traceback" not in log


# --- load: 64 clients for 60 s, good, bad and disconnecting requests -------------------------------------


class Load:
    """Request kinds, each sent by the clients at random, and what came back."""

    def __init__(self, server: LiveServer, run_dir: Path):
        self.server, self.run_dir = server, run_dir
        self.outcomes: Counter = Counter()
        self.lock = threading.Lock()

    def count(self, kind: str, outcome) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1

    def send(self, client: httpx.Client, kind: str) -> None:
        url, name = self.server.url, self.run_dir.name
        json_headers = {"content-type": "application/json"}
        if kind == "disconnect-stream":  # read two events, then hang up mid-answer
            with client.stream("POST", url + "/v1/chat/completions",
                               json=chat(self.run_dir, max_tokens=64, min_tokens=64, stream=True)) as response:
                if response.status_code == 200:
                    for index, _ in enumerate(response.iter_lines()):
                        if index >= 3:
                            break
                self.count(kind, response.status_code)
            if response.status_code == 429:
                time.sleep(float(response.headers["retry-after"]))
            return
        if kind == "disconnect-wait":  # give up after 0.3 s, queued or generating
            try:
                response = client.post(url + "/v1/chat/completions", json=chat(self.run_dir, max_tokens=64,
                                                                              min_tokens=64), timeout=0.3)
                self.count(kind, response.status_code)
            except httpx.TimeoutException:
                self.count(kind, "gave up")
            return
        requests = {
            "chat": lambda: client.post(url + "/v1/chat/completions", json=chat(self.run_dir, max_tokens=16)),
            "stream": lambda: client.post(url + "/v1/chat/completions",
                                          json=chat(self.run_dir, max_tokens=16, stream=True)),
            "completion": lambda: client.post(url + "/v1/completions",
                                              json={"model": name, "prompt": "北京是中国的", "max_tokens": 16}),
            "bad-json": lambda: client.post(url + "/v1/chat/completions", content=b'{"model": ', headers=json_headers),
            "deep-json": lambda: client.post(url + "/v1/chat/completions", content=b"[" * 100_000,
                                             headers=json_headers),
            "text-plain": lambda: client.post(url + "/v1/chat/completions", content=json.dumps(chat(self.run_dir)),
                                              headers={"content-type": "text/plain"}),
            "bad-field": lambda: client.post(url + "/v1/chat/completions", json=chat(self.run_dir, temperature=5)),
            "too-large": lambda: client.post(url + "/v1/chat/completions", content=b"x" * (2 << 20),
                                             headers=json_headers),
            "long-prompt": lambda: client.post(url + "/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "人工智能是计算机科学的一个分支。" * 3000}]}),
            "wrong-host": lambda: client.get(url + "/v1/models", headers={"host": "evil.example"}),
        }
        response = requests[kind]()
        self.count(kind, response.status_code)
        if response.status_code == 429:  # a polite client, as the openai SDK: wait as long as it is told
            time.sleep(float(response.headers["retry-after"]))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from /proc")
def test_load_keeps_health_fast_memory_flat_and_no_5xx(run_dir, tmp_path):
    clients, seconds = LOAD_CLIENTS, LOAD_SECONDS
    server = LiveServer(run_dir, tmp_path / "serve.log", max_tokens_cap=64, max_queue=16)
    load = Load(server, run_dir)
    kinds = ["chat", "stream", "completion", "bad-json", "deep-json", "text-plain", "bad-field", "too-large",
             "long-prompt", "wrong-host", "disconnect-stream", "disconnect-wait"]
    health_seconds: list[float] = []
    rss: list[int] = []
    stop = threading.Event()
    errors: list[str] = []

    def wait_idle(timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(server.url + "/health", timeout=5).json() != {"status": "ok", "generating": 0, "waiting": 0}:
            assert time.monotonic() < deadline, "the server never went idle"
            time.sleep(0.1)

    def client_loop(seed: int) -> None:
        chooser = random.Random(seed)
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                kind = chooser.choice(kinds)
                try:
                    load.send(client, kind)
                except httpx.HTTPError as exc:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    def monitor() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get(server.url + "/health").status_code == 200
                health_seconds.append(time.monotonic() - started)
                rss.append(server.rss_bytes())
                time.sleep(0.1)

    try:
        with httpx.Client(timeout=120) as client:  # warm up: every kind once, so lazy allocations are done
            for kind in kinds:
                load.send(client, kind)
        wait_idle()
        time.sleep(1)
        rss_start = server.rss_bytes()
        load.outcomes.clear()
        threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(clients)]
        watcher = threading.Thread(target=monitor)
        for thread in [watcher, *threads]:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        watcher.join(timeout=60)
        wait_idle()
        time.sleep(2)
        rss_end = server.rss_bytes()
        alive = server.process.poll() is None
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    by_status = Counter()
    for (kind, outcome), number in load.outcomes.items():
        by_status[outcome] += number
    report = {
        "clients": clients, "seconds": seconds, "requests": sum(load.outcomes.values()),
        "by_kind": {f"{kind} {outcome}": n for (kind, outcome), n in sorted(load.outcomes.items(), key=str)},
        "by_status": {str(k): v for k, v in sorted(by_status.items(), key=str)},
        "health_checks": len(health_seconds), "health_max_s": round(max(health_seconds), 3),
        "health_p50_s": round(sorted(health_seconds)[len(health_seconds) // 2], 4),
        "rss_start_mib": round(rss_start / 2**20, 1), "rss_peak_mib": round(max(rss) / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1), "client_errors": len(errors),
        "server_5xx": sum(n for (_, outcome), n in load.outcomes.items() if isinstance(outcome, int) and outcome >= 500),
    }
    print("\nload report: " + json.dumps(report, ensure_ascii=False, indent=1))
    if os.environ.get("LORAFT_LOAD_REPORT"):
        Path(os.environ["LORAFT_LOAD_REPORT"]).write_text(json.dumps(report, ensure_ascii=False, indent=1))
    assert alive
    assert report["server_5xx"] == 0 and " 500 " not in log and "Traceback" not in log
    assert errors == [], errors[:5]
    assert report["health_max_s"] < 1.0
    assert abs(rss_end - rss_start) <= 0.10 * rss_start
    # refused before they queue: always their 4xx; the long prompt is tokenized after it gets a place (else 429)
    for kind, expected in (("bad-json", {400}), ("deep-json", {400}), ("text-plain", {415}), ("bad-field", {400}),
                           ("too-large", {413}), ("wrong-host", {400}), ("long-prompt", {400, 429})):
        outcomes = {o for (k, o) in load.outcomes if k == kind}
        assert outcomes <= expected and min(expected) in outcomes, (kind, outcomes)
    assert by_status[200] > 0 and by_status[429] > 0
