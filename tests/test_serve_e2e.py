"""End to end: the real `loraft serve` process on 127.0.0.1, the official openai client, the chat page in
headless Chromium, and a graceful SIGTERM. All traffic stays on the loopback interface.

The browser test needs Debian's `chromium`. Without it the test is skipped on a developer machine and
fails under CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from browser import Chromium, find_chromium
from run_helpers import ServerProcess, trained_run

KEY = "e2e-secret"


class Server(ServerProcess):
    """`loraft serve` (the CLI, as a user starts it) on 127.0.0.1."""

    def __init__(self, run_dir: Path, log_path: Path):
        super().__init__(lambda port: [
            sys.executable, "-m", "loraft.cli", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
            # a long shutdown timeout: the SIGTERM test checks that queued work is finished, on any machine; one
            # request at a time, so a second one queues behind the first (batching is tested in test_serve_adapters)
            "--api-key", KEY, "--max-tokens-cap", "64", "--shutdown-timeout", "600", "--max-batch", "1"], log_path,
            stop_timeout=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bloom_dir):
    return trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    running = Server(run_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_lists_the_run_and_chats(server, client, run_dir, tiny_bloom_dir):
    assert [m.id for m in client.models.list().data] == [run_dir.name, tiny_bloom_dir.name]  # the run, its base
    messages = [{"role": "system", "content": "你是一个有帮助的助手。"}, {"role": "user", "content": "人工智能是什么"}]
    reply = client.chat.completions.create(model=run_dir.name, messages=messages, temperature=0, max_tokens=12)
    answer = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = client.chat.completions.create(model=run_dir.name, messages=messages, temperature=0, max_tokens=12,
                                            stream=True)
    chunks = list(stream)
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    completion = client.completions.create(model=run_dir.name, prompt="北京是中国的", temperature=0, max_tokens=6)
    streamed = client.completions.create(model=run_dir.name, prompt="北京是中国的", temperature=0, max_tokens=6,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_openai_client_sees_api_errors(server, client, run_dir):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    assert info.value.body["message"] == "max_tokens is 65, above this server's limit of 64."
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=run_dir.name, messages=[])


# --- the chat page in headless Chromium (tests/browser.py) ---------------------------------------------


def send_in_page(browser: Chromium, text: str, count_before: int) -> str:
    """Type a message into the page, press Send, wait for the streamed answer to finish; return its text."""
    browser.js(f"document.getElementById('prompt').value = {json.dumps(text)}")
    browser.js("document.getElementById('send').click()")
    done = (f"(() => {{ const m = document.querySelectorAll('.message.assistant'); "
            f"return m.length > {count_before} && m[m.length - 1].dataset.done === 'true'; }})()")
    browser.wait_for(done)
    return browser.js("[...document.querySelectorAll('.message.assistant')].pop().textContent")


def test_chat_page_streams_answers_and_keeps_the_conversation(server, client, run_dir, tmp_path):
    browser = Chromium(find_chromium(), tmp_path / "profile")
    try:
        browser.page("Page.enable")
        browser.page("Page.navigate", {"url": server.url + "/"})
        browser.wait_for(f"location.href === {json.dumps(server.url + '/')} && document.readyState === 'complete'")
        # The server wants a key: the page asks for it after the first 401.
        browser.wait_for("getComputedStyle(document.getElementById('api-key-box')).display !== 'none'")
        browser.js(f"const k = document.getElementById('api-key'); k.value = {json.dumps(KEY)}; "
                   "k.dispatchEvent(new Event('change'))")
        assert browser.wait_for("document.getElementById('model-name').textContent === "
                                f"{json.dumps(run_dir.name)} && document.getElementById('model-name').textContent")
        assert browser.js("document.getElementById('template-name').textContent") == "template human_assistant"
        browser.js("document.getElementById('temperature').value = '0'; "
                   "document.getElementById('max-tokens').value = '12'; window.textUpdates = 0; "
                   "new MutationObserver(() => window.textUpdates++).observe(document.getElementById('messages'), "
                   "{subtree: true, childList: true, characterData: true})")

        first = send_in_page(browser, "人工智能是什么", 0)
        history = [{"role": "user", "content": "人工智能是什么"}]
        expected = client.chat.completions.create(model=run_dir.name, messages=history, temperature=0, max_tokens=12)
        assert first == expected.choices[0].message.content
        assert browser.js("window.textUpdates") > 3  # the answer arrived piece by piece

        second = send_in_page(browser, "请再说一遍", 1)
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "请再说一遍"}]
        expected = client.chat.completions.create(model=run_dir.name, messages=history, temperature=0, max_tokens=12)
        assert second == expected.choices[0].message.content
        assert browser.js("document.querySelectorAll('.message.user').length") == 2

        shot = tmp_path / "chat-page.png"
        browser.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("LORAFT_SCREENSHOT"):
            shutil.copy(shot, os.environ["LORAFT_SCREENSHOT"])
    finally:
        browser.close()


# --- graceful shutdown: runs last in this module, it stops the shared server ---------------------------


def test_sigterm_finishes_in_flight_and_queued_requests(server, run_dir):
    headers = {"Authorization": f"Bearer {KEY}"}
    # min_tokens = max_tokens: every answer is as long as the cap allows, however fast the machine
    body = {"model": run_dir.name, "messages": [{"role": "user", "content": "写一首关于春天的诗"}],
            "temperature": 0, "max_tokens": 64, "min_tokens": 64}
    queued: dict = {}

    def queued_request() -> None:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        queued["status"], queued["body"] = response.status_code, response.json()

    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:  # the opening role chunk: the request holds the model
            if line.startswith("data: "):
                events.append(line[6:])
                break
        worker = threading.Thread(target=queued_request)
        worker.start()
        # the signal goes out while the server itself reports the second request queued behind the first
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health", timeout=5).json()["waiting"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            assert worker.is_alive(), "the second request finished before it was seen queued"
            time.sleep(0.002)
        server.process.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
    worker.join(timeout=120)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    # the queued request, still waiting when the signal came, was answered in full: shutdown waited for it
    assert queued["status"] == 200 and queued["body"]["choices"][0]["message"]["content"]
    assert queued["body"]["usage"]["completion_tokens"] == 64
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
