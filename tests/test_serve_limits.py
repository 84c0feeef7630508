"""What keeps one client (or web page) from harming the server or other clients: Host and Content-Type checks,
the context limit, tokenizing off the event loop, the bounded queue, disconnects and stop strings that stop
generating, pathological bodies, non-ASCII keys, the run's dtype. In-process ASGI, no socket.
"""

import asyncio
import json
import shutil
import threading
from types import SimpleNamespace

import httpx
import pytest
import torch
import yaml

from loraft.generate import load_run
from loraft.serve import Engine, ServeSettings, create_app, model_context_length
from loraft.serve.validation import LOOPBACK_NAMES, host_rule
from run_helpers import trained_run
from test_serve import assert_error, chat_body, request, sse_events

LONG = 1000  # tokens: a generation that takes seconds on the tiny model, so stopping it early shows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bloom_dir):
    return trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)


def new_engine(loaded, run_dir, **options) -> Engine:
    """An Engine of its own (counters and batcher untouched by other tests)."""
    model, tokenizer, template, info = loaded
    return Engine(model, tokenizer, template, run_dir.name, info["config"].generation, info, **options)


@pytest.fixture()
def engine(loaded, run_dir):
    return new_engine(loaded, run_dir)


def record_generations(engine, monkeypatch) -> list:
    """The Answer of every generation the engine runs from now on."""
    answers = []
    original = engine.answered

    def recording(answer, *args):
        answers.append(answer)
        return original(answer, *args)

    monkeypatch.setattr(engine, "answered", recording)
    return answers


async def wait_until(condition, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def asgi_client(app, path: str, body: dict):
    """Call the app as a client that disconnects when told: (task, disconnect event, messages sent back)."""
    raw = json.dumps(body).encode()
    disconnect = asyncio.Event()
    sent: list = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80)}
    return asyncio.ensure_future(app(scope, receive, send)), disconnect, sent


# --- 5. cross-site posts and DNS rebinding -------------------------------------------------------------


@pytest.mark.parametrize("content_type, shown", [
    (None, "none was sent"), ("text/plain", "got 'text/plain'"),
    ("application/x-www-form-urlencoded", "got 'application/x-www-form-urlencoded'"),
    ("multipart/form-data; boundary=x", "got 'multipart/form-data; boundary=x'"),
])
def test_posts_must_declare_json(engine, content_type, shown):
    app = create_app(engine, ServeSettings(max_tokens_cap=8))
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = request(app, "POST", path, content=json.dumps(chat_body(engine)).encode(), headers=headers)
        assert_error(response, 415, code="unsupported_media_type",
                     message=f"Content-Type must be application/json ({shown}).")
    # what a JSON client sends, parameters and case aside, is accepted
    ok = request(app, "POST", "/v1/chat/completions", content=json.dumps(chat_body(engine)).encode(),
                 headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


def test_host_header_must_name_the_bound_address(engine):
    app = create_app(engine, ServeSettings(host="127.0.0.1", port=8000))
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000"):
        assert request(app, "GET", "/health", headers={"host": host}).status_code == 200, host
    for host in ("evil.example:8000", "evil.example", "127.0.0.1:9999", "127.0.0.1", "localhost:80", "[::1]",
                 "127.0.0.1:8000:1", "::1:8000", "127.0.0.1:٨٠٠٠", ""):
        for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/v1/chat/completions")):
            response = request(app, method, path, headers={"host": host.encode("utf-8")}, json=chat_body(engine))
            error = assert_error(response, 400, code="invalid_host")
            assert error["message"].endswith("this server answers to 127.0.0.1, [::1], localhost on port 8000; "
                                             "add names with --allowed-hosts.")
    # allowed_hosts widens the rule, on any port
    wider = create_app(engine, ServeSettings(host="127.0.0.1", port=8000, allowed_hosts=("Box.lan",)))
    for host in ("box.lan", "box.lan:8443", "localhost:8000"):
        assert request(wider, "GET", "/health", headers={"host": host}).status_code == 200, host
    assert request(wider, "GET", "/health", headers={"host": "evil.example:8000"}).status_code == 400


def test_host_rule_for_each_kind_of_bind():
    assert host_rule("127.0.0.1", 8000).bound == LOOPBACK_NAMES
    assert host_rule("::1", 8000).bound == LOOPBACK_NAMES
    assert host_rule("127.0.0.2", 8000).bound == LOOPBACK_NAMES | {"127.0.0.2"}
    specific = host_rule("192.0.2.7", 8000)
    assert specific.bound == {"192.0.2.7"}
    specific.check("192.0.2.7:8000")
    with pytest.raises(Exception):
        specific.check("localhost:8000")
    assert host_rule("2001:db8::1", 80).bound == {"[2001:db8::1]"}
    # a wildcard bind has no name to check unless allowed_hosts gives some; "*" turns the check off
    assert host_rule("0.0.0.0", 8000) is None and host_rule("::", 8000) is None
    assert host_rule("0.0.0.0", 8000, ["model.example.org"]).extra == {"model.example.org"}
    assert host_rule("127.0.0.1", 8000, ["*"]) is None
    assert host_rule("127.0.0.1", 0).port is None  # an OS-picked port is not known to the app


# --- 6. the prompt is bounded, and tokenized off the event loop ----------------------------------------


def test_context_length_comes_from_the_model_config_or_tokenizer(tiny_llama_dir, tiny_bloom_dir):
    from transformers import AutoConfig, AutoTokenizer

    llama = SimpleNamespace(config=AutoConfig.from_pretrained(tiny_llama_dir))
    bloom = SimpleNamespace(config=AutoConfig.from_pretrained(tiny_bloom_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    assert model_context_length(llama, tokenizer) == 512  # max_position_embeddings
    assert model_context_length(bloom, tokenizer) == tokenizer.model_max_length == 2048  # BLOOM has no positions
    assert model_context_length(bloom, SimpleNamespace(model_max_length=int(1e30))) is None  # transformers' "unset"
    assert Engine(bloom, SimpleNamespace(), None, "m", None).context_length == 2048  # the fallback


def test_prompt_over_the_context_is_a_400_that_gives_the_numbers(loaded, run_dir):
    content = "人工智能是什么" * 4
    prompt_tokens = len(new_engine(loaded, run_dir).prompt_token_ids([{"role": "user", "content": content}],
                                                                      loaded[2]))
    context = prompt_tokens + 5
    engine = new_engine(loaded, run_dir, context_length=context)
    app = create_app(engine, ServeSettings(max_tokens_cap=32))
    body = chat_body(engine, messages=[{"role": "user", "content": content}], max_tokens=32)
    assert_error(request(app, "POST", "/v1/chat/completions", json=body), 400, "messages", "context_length_exceeded",
                 f"This model's maximum context length is {context} tokens. However, you requested "
                 f"{prompt_tokens + 32} tokens ({prompt_tokens} in the messages, 32 in the completion). Please reduce "
                 "the length of the messages or completion.")
    text_tokens = len(engine.tokenizer("北京" * 30)["input_ids"])
    assert text_tokens >= context
    assert_error(request(app, "POST", "/v1/completions", json={"model": engine.model_id, "prompt": "北京" * 30}),
                 400, "prompt", "context_length_exceeded",
                 f"This model's maximum context length is {context} tokens. However, your prompt resulted in "
                 f"{text_tokens} tokens. Please reduce the length of the prompt.")
    # without max_tokens the run's default (8) shrinks to the 5 tokens left; min_tokens shows how far it ran
    response = request(app, "POST", "/v1/chat/completions",
                       json={k: v for k, v in body.items() if k != "max_tokens"} | {"min_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert engine.waiting == 0


def test_prompts_are_tokenized_off_the_event_loop(engine, monkeypatch):
    app = create_app(engine, ServeSettings(max_tokens_cap=8))
    tokenizing, release = threading.Event(), threading.Event()
    original = engine.prompt_token_ids

    def slow_tokenizer(*args):
        tokenizing.set()
        release.wait(timeout=30)
        return original(*args)

    monkeypatch.setattr(engine, "prompt_token_ids", slow_tokenizer)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            chat = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(engine)))
            await wait_until(tokenizing.is_set)
            # the event loop answers while the prompt is being tokenized; the request counts as waiting
            health = await asyncio.wait_for(client.get("/health"), timeout=5)
            release.set()
            return health.json(), await chat

    health, chat = asyncio.run(go())
    assert health == {"status": "ok", "generating": 0, "waiting": 1}
    assert chat.status_code == 200


def test_declared_oversized_bodies_are_refused_before_reading(engine):
    app = create_app(engine, ServeSettings(max_body_bytes=4096))
    read = []

    async def body():
        read.append(True)
        yield b"{}"

    response = request(app, "POST", "/v1/chat/completions", content=body(),
                       headers={"content-type": "application/json", "content-length": str(10**9)})
    assert_error(response, 413, code="request_too_large", message="Request body is larger than the 4096 byte limit.")
    assert read == []


# --- 7. a bounded queue; disconnects and stop strings stop generating ----------------------------------


def test_full_queue_answers_429_with_retry_after(loaded, run_dir):
    engine = new_engine(loaded, run_dir, max_queue=2)
    app = create_app(engine, ServeSettings(max_tokens_cap=8))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            engine.batcher.set_paused(True)  # the batch takes no one in
            queued = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(engine)))
                      for _ in range(2)]
            await wait_until(lambda: engine.waiting == 2)
            refused = [await client.post(path, json=chat_body(engine, prompt="北京", stream=stream))
                       for path in ("/v1/chat/completions", "/v1/completions") for stream in (False, True)]
            health = (await client.get("/health")).json()
            engine.batcher.set_paused(False)
            return refused, await asyncio.gather(*queued), health

    refused, queued, health = asyncio.run(go())
    for response in refused:
        error = assert_error(response, 429, code="queue_full",
                             message="The server is busy: 2 requests are queued (limit 2). Retry after 1 s.")
        assert error["type"] == "rate_limit_error" and response.headers["retry-after"] == "1"
    assert health == {"status": "ok", "generating": 0, "waiting": 2}
    assert [r.status_code for r in queued] == [200, 200]
    assert engine.waiting == 0 and engine.batcher.idle


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_stops_its_generation(loaded, run_dir, monkeypatch, stream):
    engine = new_engine(loaded, run_dir)
    answers = record_generations(engine, monkeypatch)
    app = create_app(engine, ServeSettings(max_tokens_cap=LONG))
    body = chat_body(engine, max_tokens=LONG, min_tokens=LONG, stream=stream)

    async def go():
        task, disconnect, sent = asgi_client(app, "/v1/chat/completions", body)
        if stream:  # leave after the opening chunk and two pieces of the answer
            await wait_until(lambda: sum(m["type"] == "http.response.body" for m in sent) >= 3)
        else:
            await wait_until(lambda: engine.active_generations == 1)
            await asyncio.sleep(0.05)
        disconnect.set()
        await asyncio.wait_for(task, timeout=60)
        await wait_until(lambda: engine.batcher.idle)

    asyncio.run(go())
    assert len(answers) == 1 and 0 < answers[0].tokens < LONG / 2
    assert engine.cancelled_generations == 1 and engine.waiting == 0 and engine.active_generations == 0


def test_a_queued_client_that_disconnects_never_generates(loaded, run_dir, monkeypatch):
    engine = new_engine(loaded, run_dir)
    answers = record_generations(engine, monkeypatch)
    app = create_app(engine, ServeSettings(max_tokens_cap=8))

    async def go():
        engine.batcher.set_paused(True)  # the batch takes no one in
        for stream in (False, True):
            task, disconnect, _ = asgi_client(app, "/v1/chat/completions", chat_body(engine, stream=stream))
            await wait_until(lambda: engine.waiting == 1)
            disconnect.set()
            await asyncio.wait_for(task, timeout=10)
            assert engine.waiting == 0
        engine.batcher.set_paused(False)

    asyncio.run(go())
    assert answers == []


def test_a_stop_string_stops_generating(loaded, run_dir, monkeypatch):
    engine = new_engine(loaded, run_dir)
    answers = record_generations(engine, monkeypatch)
    app = create_app(engine, ServeSettings(max_tokens_cap=64))
    body = chat_body(engine, max_tokens=64, min_tokens=64)
    full = request(app, "POST", "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert answers[-1].tokens == 64
    stop = full[len(full) // 4 : len(full) // 4 + 2]
    kept = full[: full.find(stop)]
    for stream in (False, True):
        response = request(app, "POST", "/v1/chat/completions", json={**body, "stop": [stop], "stream": stream})
        if stream:
            events = sse_events(response.text)
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = response.json()["choices"][0]["message"]["content"], response.json()["choices"][0]["finish_reason"]
        assert (text, finish) == (kept, "stop")
        # generation ended at the token that completed the stop string, not at max_tokens
        assert answers[-1].tokens < 64 and stop in answers[-1].text


# --- 12. pathological bodies are a 4xx, never a 500 -----------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000, "We could not parse the JSON body of your request: it nests too deeply."),
    (b'{"a":' * 50_000, "We could not parse the JSON body of your request: it nests too deeply."),
    (b'{"max_tokens": 1' + b"0" * 5000 + b"}", "We could not parse the JSON body of your request: it is not valid JSON."),
])
def test_pathological_json_is_a_400(engine, raw, message):
    app = create_app(engine, ServeSettings())
    response = request(app, "POST", "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, message=message)


@pytest.mark.parametrize("extra, param, message", [
    ({"stream": True, "stream_options": "include_usage"}, "stream_options",
     'stream_options must be an object such as {"include_usage": true}.'),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "stream_options.include_usage must be a boolean."),
    ({"seed": 2**64}, "seed", "seed must be an integer between -9223372036854775808 and 9223372036854775807."),
    ({"seed": -(2**63) - 1}, "seed", None),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content",
     "messages[0].content is not valid Unicode text (it holds a lone surrogate)."),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}, "messages[0].content", None),
    ({"stop": ["\udc80"]}, "stop", None),
])
def test_odd_fields_are_a_400(engine, extra, param, message):
    app = create_app(engine, ServeSettings(max_tokens_cap=8))
    raw = json.dumps(chat_body(engine, **extra)).encode()  # ASCII JSON: lone surrogates travel as \ud800
    response = request(app, "POST", "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, param, message=message)


def test_edge_values_that_are_valid_are_answered(engine):
    app = create_app(engine, ServeSettings(max_tokens_cap=8))
    for extra in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"temperature": 5e-324}, {"temperature": 1e-5, "top_p": 1e-300},
                  {"stream": None, "stream_options": None}, {"stream": True, "stream_options": {}}):
        response = request(app, "POST", "/v1/chat/completions", json=chat_body(engine, **extra))
        assert response.status_code == 200, (extra, response.text)
    # a model name that is not valid Unicode is echoed in a valid (ASCII-escaped) JSON error
    raw = json.dumps(chat_body(engine, model="\ud800x")).encode()
    response = request(app, "POST", "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 404, "model", "model_not_found")


# --- 13. a non-ASCII API key -------------------------------------------------------------------------------


def test_non_ascii_api_key_logs_in(engine):
    key = "clé-密钥"
    app = create_app(engine, ServeSettings(api_key=key, max_tokens_cap=8))
    good = {"Authorization": b"Bearer " + key.encode("utf-8")}
    assert request(app, "GET", "/v1/models", headers=good).status_code == 200
    assert request(app, "POST", "/v1/chat/completions", json=chat_body(engine), headers=good).status_code == 200
    for wrong in (b"Bearer " + key.encode("latin-1", "replace"), b"Bearer " + key.encode("utf-8")[:-1],
                  b"Bearer " + key.encode("utf-16")):
        assert_error(request(app, "GET", "/v1/models", headers={"Authorization": wrong}), 401, code="invalid_api_key",
                     message="Incorrect API key provided.")
    # a key given on the command line as bytes that are not UTF-8 (held by Python as surrogate escapes)
    raw_key = b"k\xe9y"
    app = create_app(engine, ServeSettings(api_key=raw_key.decode("utf-8", "surrogateescape")))
    assert request(app, "GET", "/v1/models", headers={"Authorization": b"Bearer " + raw_key}).status_code == 200


# --- 14 and 17. serve(): the run's dtype, the shutdown timeout ------------------------------------------


def base_weight_dtypes(model) -> set:
    """dtypes of the base model's weights (peft keeps adapter weights in fp32)."""
    return {p.dtype for name, p in model.named_parameters() if "lora_" not in name and "modules_to_save" not in name}


def test_serve_loads_the_runs_generation_dtype_and_bounds_shutdown(run_dir, tmp_path, monkeypatch):
    import uvicorn

    from loraft.serve import serve

    copy = tmp_path / "bf16-run"
    shutil.copytree(run_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text(encoding="utf-8"))
    config["generation"]["dtype"] = "bf16"
    (copy / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: started.append(server.config))
    serve(copy, port=0)
    engine = started[0].app.state.engine
    assert base_weight_dtypes(engine.model) == {torch.bfloat16}
    assert started[0].timeout_graceful_shutdown == 30
    assert engine.max_queue == 16
    serve(copy, port=0, dtype="fp32", shutdown_timeout=2, max_queue=3)  # an explicit dtype wins
    engine = started[1].app.state.engine
    assert base_weight_dtypes(engine.model) == {torch.float32}
    assert started[1].timeout_graceful_shutdown == 2 and engine.max_queue == 3


@pytest.mark.parametrize("option, value, message", [
    ("max_queue", 0, "--max-queue must be > 0 (got 0)"),
    ("shutdown_timeout", -1, "--shutdown-timeout must be >= 0 (got -1)"),
    ("context_length", 1, "--context-length must be > 1 (got 1)"),
])
def test_serve_refuses_bad_limits(run_dir, option, value, message):
    from loraft.errors import RunError
    from loraft.serve import serve

    with pytest.raises(RunError) as info:
        serve(run_dir, **{option: value})
    assert str(info.value) == message


@pytest.mark.parametrize("stream", [False, True])
def test_both_endpoints_share_one_handler_and_tokenize_each_prompt_once(engine, monkeypatch, stream):
    import loraft.generate
    import loraft.serve.app

    app = create_app(engine, ServeSettings(max_tokens_cap=8))
    tokenized, handled = [], []
    original_tokenize = engine.prompt_token_ids

    def counting(messages, template, tokenizer=None):
        tokenized.append(template.name)
        return original_tokenize(messages, template, tokenizer)

    def never(*args, **kwargs):  # the generation starts from the ids the context check counted
        raise AssertionError("the prompt was tokenized a second time")

    original_complete, original_stream = engine.complete, engine.stream
    monkeypatch.setattr(engine, "prompt_token_ids", counting)
    monkeypatch.setattr(loraft.generate, "encode_prompt", never)
    monkeypatch.setattr(engine, "complete", lambda ids, *a, **k: handled.append(len(ids)) or original_complete(ids, *a, **k))
    monkeypatch.setattr(engine, "stream", lambda ids, *a, **k: handled.append(len(ids)) or original_stream(ids, *a, **k))
    chat = request(app, "POST", "/v1/chat/completions", json={**chat_body(engine), "stream": stream})
    completion = request(app, "POST", "/v1/completions",
                         json={"model": engine.model_id, "prompt": "北京是", "max_tokens": 4, "stream": stream})
    assert chat.status_code == completion.status_code == 200, (chat.text, completion.text)
    assert tokenized == [engine.template.name, "raw"] and len(handled) == 2
    assert loraft.serve.app.RAW_TEXT.name == "raw"
