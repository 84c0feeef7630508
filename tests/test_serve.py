"""API rules of `loraft serve`, through an in-process ASGI client (no socket)."""

import asyncio
import json
import re

import httpx
import pytest
import torch

from loraft.cli import main
from loraft.generate import generate_batch, load_run
from loraft.serve import RAW_TEXT, Engine, ServeSettings, StopScanner, create_app
from run_helpers import trained_run

KEY = "test-key-123"
DROP = object()  # leave the key out of the request body


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_bloom_dir):
    run_dir = trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir)
    model, tokenizer, template, info = load_run(run_dir)
    return Engine(model, tokenizer, template, run_dir.name, info["config"].generation, info)


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, ServeSettings(max_tokens_cap=32, max_body_bytes=4096))


def chat_body(engine, **extra):
    return {"model": engine.model_id, "messages": [{"role": "user", "content": "人工智能是什么"}],
            "temperature": 0, "max_tokens": 8, **extra}


def sse_events(text: str) -> list:
    events = [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def greedy(engine, messages, template, max_new_tokens=8) -> str:
    settings = engine.defaults.model_copy(update={"temperature": 0.0, "max_new_tokens": max_new_tokens})
    return generate_batch(engine.model, engine.tokenizer, template, [messages], settings, batch_size=1)[0]


def assert_error(response, status: int, param=None, code=None, message=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["code"] == code
    if message is not None:
        assert body["error"]["message"] == message
    return body["error"]


# --- the happy paths ------------------------------------------------------------------------------------


def test_health_models_and_page(app, engine):
    assert request(app, "GET", "/health").json() == {"status": "ok", "generating": 0, "waiting": 0}
    models = request(app, "GET", "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["bloom-default"]
    assert models["data"][0]["loraft"]["template"] == "human_assistant"
    assert request(app, "GET", "/v1/models/bloom-default").json()["id"] == "bloom-default"
    page = request(app, "GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # works offline: no external scripts, styles, fonts or images
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page.text)
    assert "@import" not in page.text and "url(" not in page.text


def test_chat_applies_the_run_template(app, engine):
    response = request(app, "POST", "/v1/chat/completions", json=chat_body(engine))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "bloom-default"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == greedy(engine, [{"role": "user", "content": "人工智能是什么"}], engine.template)
    assert choice["finish_reason"] in ("stop", "length")
    prompt_ids = engine.tokenizer("Human: 人工智能是什么\n\nAssistant: ")["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stream_is_server_sent_events_with_the_same_answer(app, engine):
    plain = request(app, "POST", "/v1/chat/completions", json=chat_body(engine)).json()
    response = request(app, "POST", "/v1/chat/completions",
                       json=chat_body(engine, stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_completions_continue_raw_text_without_the_template(app, engine):
    prompt = "北京是中国的"
    response = request(app, "POST", "/v1/completions",
                       json={"model": engine.model_id, "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        output = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                       do_sample=False, eos_token_id=engine.tokenizer.eos_token_id,
                                       pad_token_id=engine.tokenizer.pad_token_id)
    expected = engine.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    assert body["choices"][0]["text"] == expected
    streamed = request(app, "POST", "/v1/completions",
                       json={"model": engine.model_id, "prompt": [prompt], "max_tokens": 6, "temperature": 0,
                             "stream": True})
    events = sse_events(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events) == expected


def test_stop_sequences_cut_the_answer_streamed_or_not(app, engine):
    full = greedy(engine, [{"role": "user", "content": "人工智能是什么"}], engine.template)
    assert len(full) >= 4
    stop = full[2:4]
    expected = full[: full.find(stop)]
    plain = request(app, "POST", "/v1/chat/completions", json=chat_body(engine, stop=stop)).json()
    assert plain["choices"][0]["message"]["content"] == expected
    assert plain["choices"][0]["finish_reason"] == "stop"
    events = sse_events(request(app, "POST", "/v1/chat/completions",
                                json=chat_body(engine, stop=[stop], stream=True)).text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_generated_tokens_and_finish_reason_says_why_it_ended(app, engine):
    # min_tokens = max_tokens: the answer runs to the cap, streamed or not
    for path, extra in (("/v1/chat/completions", {}), ("/v1/completions", {"prompt": "北京"})):
        body = chat_body(engine, max_tokens=12, min_tokens=12, **extra)
        if "prompt" in extra:
            body.pop("messages")
        plain = request(app, "POST", path, json=body).json()
        assert plain["usage"]["completion_tokens"] == 12 and plain["choices"][0]["finish_reason"] == "length"
        events = sse_events(request(app, "POST", path,
                                    json={**body, "stream": True, "stream_options": {"include_usage": True}}).text)
        assert events[-1]["usage"] == plain["usage"] and events[-2]["choices"][0]["finish_reason"] == "length"
    # an end token as the model's first choice: nothing generated, finish_reason stop
    bias = torch.zeros(engine.model.config.vocab_size)
    bias[engine.tokenizer.eos_token_id] = 1e4
    hook = engine.model.base_model.model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        for stream in (False, True):
            response = request(app, "POST", "/v1/chat/completions",
                               json=chat_body(engine, stream=stream, stream_options={"include_usage": True}))
            if stream:
                events = sse_events(response.text)
                usage, finish = events[-1]["usage"], events[-2]["choices"][0]["finish_reason"]
            else:
                usage, finish = response.json()["usage"], response.json()["choices"][0]["finish_reason"]
            assert usage["completion_tokens"] == 0 and finish == "stop"
    finally:
        hook.remove()


def test_stop_scanner_holds_back_a_possible_stop_start():
    scanner = StopScanner(["END"])
    assert scanner.feed("abcE") == "ab"  # "cE" could start "END"
    assert scanner.feed("N") == "c"
    assert scanner.feed("D and more") == "" and scanner.stopped
    assert scanner.feed("more") == "" and scanner.flush() == ""
    scanner = StopScanner(["xyz"])
    assert "".join(scanner.feed(p) for p in ["ab", "xy"]) + scanner.flush() == "abxy"
    assert StopScanner([]).feed("anything") == "anything"


def test_concurrent_requests_are_batched_and_answer_as_each_alone(engine):
    app = create_app(engine, ServeSettings(max_tokens_cap=32))
    engine.most_concurrent_generations = 0
    prompts = ["人工智能是什么", "北京", "写一首关于春天的诗，要长一点", "你好", "1+1=?", "翻译成英文：今天天气很好"]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            with engine.paused():  # all six wait, then enter one batch of prompts of different lengths
                calls = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(
                    engine, messages=[{"role": "user", "content": prompt}], stream=index % 2 == 1,
                    max_tokens=4 + index))) for index, prompt in enumerate(prompts)]
                while len(engine.batcher.waiting) < len(prompts):
                    await asyncio.sleep(0.01)
            return await asyncio.gather(*calls)

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 6
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        if index % 2:
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(response.text)
                           if e["choices"])
        else:
            text = response.json()["choices"][0]["message"]["content"]
        assert text == greedy(engine, [{"role": "user", "content": prompt}], engine.template, 4 + index)
    assert engine.most_concurrent_generations == 6
    assert engine.active_generations == 0 and engine.waiting == 0


# --- validation: 4xx in OpenAI's error shape, never a 500 -------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param, code, message",
    [
        ({"model": DROP}, 400, "model", None, "You must provide a model parameter."),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found",
         "The model 'gpt-4o' does not exist; this server serves 'bloom-default'."),
        ({"messages": []}, 400, "messages", None, "messages must be a non-empty array of {role, content} objects."),
        ({"messages": "hi"}, 400, "messages", None, None),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None,
         "messages[0].role must be one of system, user, assistant (got 'tool')."),
        ({"messages": [{"content": "x"}]}, 400, "messages[0].role", None, None),
        ({"messages": ["hi"]}, 400, "messages[0]", None, None),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages[0].content", None, None),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
         "messages[1].role", None, "The last message must have role 'user'."),
        ({"max_tokens": 33}, 400, "max_tokens", None, "max_tokens is 33, above this server's limit of 32."),
        ({"max_completion_tokens": 100}, 400, "max_completion_tokens", None, None),
        ({"max_tokens": 0}, 400, "max_tokens", None, "max_tokens must be a positive integer."),
        ({"max_tokens": "8"}, 400, "max_tokens", None, None),
        ({"max_tokens": True}, 400, "max_tokens", None, None),
        ({"max_tokens": 8, "min_tokens": 9}, 400, "min_tokens", None,
         "min_tokens must be an integer between 0 and max_tokens (8)."),
        ({"min_tokens": -1}, 400, "min_tokens", None, None),
        # ranges come from GenerationConfig through loraft.generate.resolve_generation
        ({"temperature": 3}, 400, "temperature", None, "temperature must be less than or equal to 2 (got 3.0)."),
        ({"temperature": -0.5}, 400, "temperature", None, "temperature must be greater than or equal to 0 (got -0.5)."),
        ({"temperature": "hot"}, 400, "temperature", None, "temperature must be a number."),
        ({"top_p": 0}, 400, "top_p", None, "top_p must be greater than 0 (got 0.0)."),
        ({"n": 2}, 400, "n", None, "Only n=1 is supported."),
        ({"stop": 5}, 400, "stop", None, None),
        ({"stream": "yes"}, 400, "stream", None, None),
        ({"seed": 1.5}, 400, "seed", None, None),
        ({"logprobs": True}, 400, "logprobs", None, None),
    ],
)
def test_chat_validation(app, engine, body, status, param, code, message):
    payload = {key: value for key, value in {**chat_body(engine), **body}.items() if value is not DROP}
    error = assert_error(request(app, "POST", "/v1/chat/completions", json=payload), status, param, code, message)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_and_non_object_bodies(app, engine):
    response = request(app, "POST", "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                       headers={"content-type": "application/json"})
    assert_error(response, 400, message="We could not parse the JSON body of your request: it is not valid JSON.")
    assert_error(request(app, "POST", "/v1/chat/completions", content=b"\xff\xfe",
                         headers={"content-type": "application/json"}), 400)
    assert_error(request(app, "POST", "/v1/chat/completions", json=[1, 2]), 400,
                 message="The request body must be a JSON object.")
    assert_error(request(app, "POST", "/v1/completions", json={"model": engine.model_id, "prompt": ""}), 400, "prompt")
    assert_error(request(app, "POST", "/v1/completions", json={"model": engine.model_id, "prompt": ["a", "b"]}), 400,
                 "prompt")
    assert_error(request(app, "POST", "/v1/completions", json={"model": engine.model_id}), 400, "prompt")


def test_oversized_bodies_get_413(app, engine):
    big = chat_body(engine, messages=[{"role": "user", "content": "字" * 5000}])
    error = assert_error(request(app, "POST", "/v1/chat/completions", json=big), 413, code="request_too_large")
    assert error["message"] == "Request body is larger than the 4096 byte limit."

    async def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "bloom-default", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    assert_error(request(app, "POST", "/v1/chat/completions", content=chunked(),
                         headers={"content-type": "application/json"}), 413, code="request_too_large")


def test_unknown_routes_and_methods_use_the_error_shape(app):
    error = assert_error(request(app, "GET", "/v1/nothing"), 404)
    assert error["type"] == "not_found_error"
    assert_error(request(app, "GET", "/v1/chat/completions"), 405)
    assert_error(request(app, "GET", "/v1/models/other"), 404, "model", "model_not_found")


def test_api_key_is_required_on_every_api_request(engine):
    app = create_app(engine, ServeSettings(api_key=KEY, max_tokens_cap=32))
    missing = request(app, "GET", "/v1/models")
    assert_error(missing, 401, code="invalid_api_key",
                 message="Missing API key: send the header 'Authorization: Bearer <key>'.")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = request(app, "POST", "/v1/chat/completions", json=chat_body(engine),
                    headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, code="invalid_api_key", message="Incorrect API key provided.")
    assert_error(request(app, "POST", "/v1/completions", json={}, headers={"Authorization": KEY}), 401,
                 code="invalid_api_key")
    # an unauthenticated oversized body is refused as unauthenticated, before it is read
    assert_error(request(app, "POST", "/v1/chat/completions", content=b"x" * (2 << 20),
                         headers={"content-type": "application/json"}), 401, code="invalid_api_key")
    good = {"Authorization": f"Bearer {KEY}"}
    assert request(app, "GET", "/v1/models", headers=good).status_code == 200
    assert request(app, "POST", "/v1/chat/completions", json=chat_body(engine), headers=good).status_code == 200
    # the static page and the health probe hold no data and stay open
    assert request(app, "GET", "/health").status_code == 200
    assert request(app, "GET", "/").status_code == 200


def test_serve_bad_inputs(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: run directory not found\n"
    assert main(["serve", str(tmp_path), "--max-tokens-cap", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-tokens-cap must be > 0 (got 0)\n"
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: not a finished loraft run (no adapter_config.json)\n"


def test_raw_text_template_adds_nothing():
    messages = [{"role": "user", "content": "北京是中国的"}]
    assert RAW_TEXT.render_text(messages, "</s>", add_generation_prompt=True) == "北京是中国的"
