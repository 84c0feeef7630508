"""Many runs on one base (`loraft serve RUN RUN ...`): each run's answers inside mixed batches equal that run
served alone, runs that cannot share are refused, and adapters load and unload live."""

import asyncio
import json

import httpx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loraft.errors import RunError
from loraft.generate import generate_answers, load_run
from loraft.rundir import RunAccess, open_run
from loraft.serve import ServeSettings, create_app
from loraft.serve.adapters import load_runs
from test_serve_fuzz import FUZZ, json_values, text
from run_helpers import trained_run

PROMPTS = ["人工智能是什么", "北京", "写一首关于春天的诗，要长一点，再长一点", "你好", "1+1=?", "翻译成英文：今天天气很好",
           "天", "请列出三种水果"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bloom_dir):
    """Three runs of one tiny BLOOM: the recipe's (LoRA on layer 1's query_key_value + word_embeddings trained in
    full), LoRA r 4 on every attention and MLP layer, and LoRA r 8 on the MLP with a higher learning rate."""
    return [
        trained_run(tmp_path_factory, "bloom-default", tiny_bloom_dir),
        trained_run(tmp_path_factory, "bloom-all-linear", tiny_bloom_dir,
                    ["adapter.target_modules=[query_key_value,dense,dense_h_to_4h,dense_4h_to_h]", "adapter.r=4",
                     "adapter.modules_to_save=null"]),
        trained_run(tmp_path_factory, "bloom-mlp", tiny_bloom_dir,
                    ["adapter.target_modules=[dense_h_to_4h,dense_4h_to_h]", "adapter.modules_to_save=null",
                     "train.learning_rate=0.03"]),
    ]


def opened(run_dirs):
    return [open_run(run_dir, RunAccess()) for run_dir in run_dirs]


@pytest.fixture(scope="module")
def shared(runs):
    """One Engine serving the three runs and the base, fp32, in batches of up to 16 rows."""
    engine, _ = load_runs(opened(runs), [run.name for run in runs], device="cpu", dtype="fp32", max_batch=16,
                          max_queue=64)
    return engine


@pytest.fixture(scope="module")
def alone(runs):
    """Each run loaded by itself, as `loraft serve RUN` loads it (and the base, without the adapter)."""
    models = {run.name: load_run(run, dtype="fp32") for run in runs}
    models["base"] = load_run(runs[0], dtype="fp32", base_only=True)
    return models


def test_the_shared_model_serves_every_run_and_the_base_by_name(shared, runs, tiny_bloom_dir):
    assert shared.names == [run.name for run in runs] + [tiny_bloom_dir.name]
    assert shared.models[tiny_bloom_dir.name].adapter is None
    adapters = [shared.models[run.name].adapter for run in runs]
    assert len(set(adapters)) == 3 and set(adapters) <= set(shared.model.peft_config)
    # one copy of the base: the model holds each base weight once, whatever the number of adapters
    base_weights = [name for name, _ in shared.model.named_parameters() if "lora_" not in name
                    and "modules_to_save" not in name]
    assert len(base_weights) == len(list(load_run(runs[0], dtype="fp32", base_only=True)[0].parameters()))


def mixed_requests(runs, base_name):
    """(model name, prompt, max_tokens) for 16 rows: every model, prompts of different lengths, in a mixed order."""
    names = [run.name for run in runs] + [base_name]
    return [(names[(index * 3) % 4], PROMPTS[index % len(PROMPTS)], 6 + index % 5) for index in range(16)]


def test_mixed_batches_give_each_adapter_its_alone_tokens_and_first_logits(shared, alone, runs, tiny_bloom_dir):
    """16 requests over 3 adapters and the base enter one batch: each row's first-token logits equal that run's
    model alone (fp32, 1e-5), and its greedy tokens equal the run's model alone generating with transformers."""
    requests = mixed_requests(runs, tiny_bloom_dir.name)
    captured = []
    shared.batcher.first_logits = lambda jobs, logits: captured.append(([(job.adapter, job.prompt_ids)
                                                                          for job in jobs], logits.clone()))
    app = create_app(shared, ServeSettings(max_tokens_cap=32))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            with shared.paused():
                calls = [asyncio.ensure_future(client.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": tokens})) for name, prompt, tokens in requests]
                while len(shared.batcher.waiting) < len(requests):
                    await asyncio.sleep(0.01)
            return await asyncio.gather(*calls)

    shared.most_concurrent_generations = 0
    try:
        responses = asyncio.run(go())
    finally:
        del shared.batcher.first_logits
    assert shared.most_concurrent_generations == 16 and len(captured) == 1  # one prefill of all 16 rows
    kinds = [kind for _, kind in shared.batcher.mixed.modules()]  # LoRA linear layers took the stacked path
    assert kinds.count("stacked") > 12 and "wrapper" in kinds  # (the recipe's word_embeddings: peft's own)
    rows, logits = captured[0]
    for (name, prompt, tokens), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        key = "base" if name == tiny_bloom_dir.name else name
        model, tokenizer, template, info = alone[key]
        messages = [{"role": "user", "content": prompt}]
        settings = info["config"].generation.model_copy(update={"temperature": 0.0, "max_new_tokens": tokens})
        expected = generate_answers(model, tokenizer, template, [messages], settings, batch_size=1)[0]
        assert response.json()["choices"][0]["message"]["content"] == expected.text, (name, prompt)
        assert response.json()["usage"]["completion_tokens"] == expected.tokens
        from loraft.generate import encode_prompt

        ids = encode_prompt(tokenizer, template, messages)
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        row = rows.index((shared.models[name].adapter or "__base__", ids))
        torch.testing.assert_close(logits[row], reference, rtol=0, atol=1e-5)


def test_rows_join_a_running_batch_and_leave_when_done(shared, alone, runs):
    """Requests that arrive while a batch decodes join it at the next step (their cache spliced in) and leave when
    they end; every answer still equals its run alone."""
    app = create_app(shared, ServeSettings(max_tokens_cap=32))
    requests = [(runs[index % 3].name, PROMPTS[index], 4 + 3 * index) for index in range(6)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            calls = []
            for name, prompt, tokens in requests:
                calls.append(asyncio.ensure_future(client.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": tokens, "min_tokens": tokens})))
                await asyncio.sleep(0.02)
            return await asyncio.gather(*calls)

    shared.most_concurrent_generations = 0
    responses = asyncio.run(go())
    assert shared.most_concurrent_generations > 1
    for (name, prompt, tokens), response in zip(requests, responses):
        model, tokenizer, template, info = alone[name]
        settings = info["config"].generation.model_copy(update={"temperature": 0.0, "max_new_tokens": tokens,
                                                                "min_new_tokens": tokens})
        expected = generate_answers(model, tokenizer, template, [[{"role": "user", "content": prompt}]], settings,
                                    batch_size=1)[0]
        assert response.json()["choices"][0]["message"]["content"] == expected.text


def test_a_seeded_sample_is_the_same_in_any_batch(shared, runs):
    app = create_app(shared, ServeSettings(max_tokens_cap=32))
    body = {"model": runs[1].name, "messages": [{"role": "user", "content": "你好"}], "temperature": 1.0,
            "top_p": 0.9, "seed": 1234, "max_tokens": 12}

    async def go(company: int):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            with shared.paused():
                others = [asyncio.ensure_future(client.post("/v1/chat/completions", json={
                    **body, "model": runs[i % 3].name, "seed": None, "messages": [
                        {"role": "user", "content": PROMPTS[i]}]})) for i in range(company)]
                mine = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
                while len(shared.batcher.waiting) < company + 1:
                    await asyncio.sleep(0.01)
            await asyncio.gather(*others)
            return (await mine).json()["choices"][0]["message"]["content"]

    assert asyncio.run(go(0)) == asyncio.run(go(5)) == asyncio.run(go(2))


def test_models_lists_every_run_and_the_base(shared, runs, tiny_bloom_dir):
    app = create_app(shared)
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get("/v1/models")).json(), (await client.post("/v1/chat/completions", json={
                "model": "nope", "messages": [{"role": "user", "content": "hi"}]})).json()

    models, unknown = asyncio.run(go())
    assert [m["id"] for m in models["data"]] == [run.name for run in runs] + [tiny_bloom_dir.name]
    assert [m["loraft"]["adapter"] for m in models["data"]] == [True, True, True, False]
    assert unknown["error"]["code"] == "model_not_found"
    assert unknown["error"]["message"] == ("The model 'nope' does not exist; this server serves 'bloom-default', "
                                           f"'bloom-all-linear', 'bloom-mlp', '{tiny_bloom_dir.name}'.")


def test_runs_that_cannot_share_a_base_are_refused_in_one_sentence(runs, tmp_path_factory, tiny_llama_dir,
                                                                  tiny_bloom_dir):
    llama = trained_run(tmp_path_factory, "llama-default", tiny_llama_dir, ["adapter.target_modules=[q_proj]",
                                                                           "adapter.modules_to_save=null"])
    with pytest.raises(RunError) as refused:
        load_runs(opened([runs[0], llama]), ["bloom-default", "llama-default"], device="cpu", dtype="fp32")
    assert str(refused.value) == (f"{llama}: its base is {tiny_llama_dir.resolve()}, not the "
                                  f"{tiny_bloom_dir.resolve()} this server shares: serve it from a server of its own")
    with pytest.raises(RunError, match="the name 'bloom-default' is served already"):
        load_runs(opened([runs[0], runs[0]]), ["bloom-default", "bloom-default"], device="cpu", dtype="fp32")


@pytest.mark.parametrize("kind, overrides, reason", [
    ("dora", ["adapter.use_dora=true", "adapter.modules_to_save=null"], "it is a DoRA adapter"),
    ("prompt", ["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=4"], "it is a prompt tuning adapter"),
])
def test_adapter_kinds_that_cannot_mix_are_refused_but_serve_alone(runs, tmp_path_factory, tiny_bloom_dir, kind,
                                                                   overrides, reason):
    run = trained_run(tmp_path_factory, f"bloom-{kind}", tiny_bloom_dir, overrides)
    with pytest.raises(RunError) as refused:
        load_runs(opened([runs[1], run]), [runs[1].name, run.name], device="cpu", dtype="fp32")
    assert str(refused.value) == (f"{run}: cannot share a base with other adapters: {reason}, which peft cannot mix "
                                  "in one batch; serve it alone")
    # alone it serves, its answers equal to transformers' generate on it
    engine, _ = load_runs(opened([run]), [run.name], device="cpu", dtype="fp32", serve_base=False)
    app = create_app(engine, ServeSettings(max_tokens_cap=16))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            return await asyncio.gather(*[client.post("/v1/chat/completions", json={
                "model": run.name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": 6}) for prompt in PROMPTS[:3]])

    responses = asyncio.run(go())
    model, tokenizer, template, info = load_run(run, dtype="fp32")
    settings = info["config"].generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 6})
    for prompt, response in zip(PROMPTS, responses):
        expected = generate_answers(model, tokenizer, template, [[{"role": "user", "content": prompt}]], settings,
                                    batch_size=1)[0]
        assert response.json()["choices"][0]["message"]["content"] == expected.text
    engine.close()


def sse(text):
    return [json.loads(block[6:]) for block in text.split("\n\n") if block.startswith("data: {")]


# --- live load and unload (vLLM's endpoints) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(runs, tiny_bloom_dir, tmp_path_factory):
    """A server of the first run with --adapters-dir holding copies of the other two, a run still training, a run
    of another base, and a link that points out of the directory."""
    import shutil

    from loraft.serve.adapters import LiveAdapters

    adapters = tmp_path_factory.mktemp("adapters")
    for run in runs[1:]:
        shutil.copytree(run, adapters / run.name)
    unfinished = adapters / "unfinished"
    shutil.copytree(runs[1], unfinished)
    record = json.loads((unfinished / "loraft_run.json").read_text())
    (unfinished / "loraft_run.json").write_text(json.dumps({**record, "status": "running"}))
    llama = trained_run(tmp_path_factory, "llama-default", tiny_llama_dir_of(tmp_path_factory),
                        ["adapter.target_modules=[q_proj]", "adapter.modules_to_save=null"])
    shutil.copytree(llama, adapters / "other-base")
    (adapters / "escape").symlink_to(runs[2].parent)
    engine, shared = load_runs(opened(runs[:1]), [runs[0].name], device="cpu", dtype="fp32", max_batch=8)
    app = create_app(engine, ServeSettings(max_tokens_cap=64), live=LiveAdapters(engine, shared, adapters))
    yield engine, app, adapters
    engine.close()


def tiny_llama_dir_of(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "tiny-llama0"
    assert path.is_dir(), "the tiny llama fixture made it"
    return path


def call(app, *requests):
    """Send each (method, path, json) in turn; the responses."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            return [await client.request(method, path, json=body) for method, path, body in requests]

    return asyncio.run(go())


def chat(name, prompt="你好", tokens=6):
    return ("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": prompt}],
                                            "temperature": 0, "max_tokens": tokens})


def test_an_adapter_loaded_live_answers_as_its_run_alone_and_unloads(live, alone, runs, tiny_llama_dir):
    engine, app, adapters = live
    loaded, models, answer, again = call(
        app, ("POST", "/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": "bloom-mlp"}),
        ("GET", "/v1/models", None), chat("mlp", PROMPTS[2], 8),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": "bloom-mlp"}))
    assert loaded.json() == {"status": "loaded", "lora_name": "mlp"}
    assert [m["id"] for m in models.json()["data"]] == ["bloom-default", "tiny-bloom0", "mlp"]
    model, tokenizer, template, info = alone["bloom-mlp"]
    settings = info["config"].generation.model_copy(update={"temperature": 0.0, "max_new_tokens": 8})
    expected = generate_answers(model, tokenizer, template, [[{"role": "user", "content": PROMPTS[2]}]], settings,
                                batch_size=1)[0]
    assert answer.json()["choices"][0]["message"]["content"] == expected.text
    assert again.status_code == 400 and again.json()["error"]["message"] == (
        "The adapter 'mlp' is loaded already; unload it first.")
    adapter = engine.models["mlp"].adapter
    unloaded, gone, models = call(app, ("POST", "/v1/unload_lora_adapter", {"lora_name": "mlp"}), chat("mlp"),
                                  ("GET", "/v1/models", None))
    assert unloaded.json() == {"status": "unloaded", "lora_name": "mlp", "waited_for_requests": 0}
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in models.json()["data"]] == ["bloom-default", "tiny-bloom0"]
    assert adapter not in engine.model.peft_config  # its weights are gone from the model


def test_an_unload_waits_for_the_requests_running_on_the_adapter(live, alone):
    engine, app, _ = live
    call(app, ("POST", "/v1/load_lora_adapter", {"lora_name": "all", "lora_path": "bloom-all-linear"}))
    long = {"model": "all", "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 48,
            "min_tokens": 48}

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            running = asyncio.ensure_future(client.post("/v1/chat/completions", json=long))
            while engine.active_generations == 0:
                await asyncio.sleep(0.005)
            unload = asyncio.ensure_future(client.post("/v1/unload_lora_adapter", json={"lora_name": "all"}))
            while not engine.models["all"].unloading:
                await asyncio.sleep(0.005)
            refused = await client.post("/v1/chat/completions", json=long)  # new requests are refused at once
            return await running, await unload, refused

    running, unload, refused = asyncio.run(go())
    assert running.status_code == 200 and running.json()["usage"]["completion_tokens"] == 48
    assert unload.json() == {"status": "unloaded", "lora_name": "all", "waited_for_requests": 1}
    assert refused.status_code == 404


@pytest.mark.parametrize("body, status, message", [
    ({"lora_name": "x", "lora_path": "../bloom-default"}, 400, "lora_path must be inside the server's --adapters-dir."),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "lora_path must be inside the server's --adapters-dir."),
    ({"lora_name": "x", "lora_path": "escape"}, 400, "lora_path must be inside the server's --adapters-dir."),
    ({"lora_name": "x", "lora_path": "nothing-here"}, 400,
     "lora_path 'nothing-here' is not a run directory inside --adapters-dir."),
    ({"lora_name": "x", "lora_path": "unfinished"}, 400, None),
    ({"lora_name": "x", "lora_path": "other-base"}, 400, None),
    ({"lora_name": "", "lora_path": "bloom-mlp"}, 400, "lora_name must be a non-empty string."),
    ({"lora_name": "bloom-default", "lora_path": "bloom-mlp"}, 400,
     "The adapter 'bloom-default' is loaded already; unload it first."),
    ({"lora_name": "x" * 129, "lora_path": "bloom-mlp"}, 400, "lora_name must be at most 128 printable characters."),
    ({"lora_name": "x", "lora_path": "bloom-mlp", "extra": 1}, 400, "Unknown field 'extra'."),
    ({"lora_name": "x", "lora_path": 7}, 400, "lora_path must be a non-empty path string."),
])
def test_bad_loads_are_a_4xx_in_one_sentence(live, body, status, message):
    engine, app, _ = live
    response = call(app, ("POST", "/v1/load_lora_adapter", body))[0]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if message is not None:
        assert error["message"] == message
    assert error["message"].count(". ") == 0 and "/" not in error["message"].replace("--adapters-dir", ""), error
    assert engine.names == ["bloom-default", "tiny-bloom0"]


def test_unfinished_and_foreign_runs_are_named_in_their_sentence(live):
    _, app, _ = live
    unfinished, foreign = call(app, ("POST", "/v1/load_lora_adapter", {"lora_name": "u", "lora_path": "unfinished"}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "f", "lora_path": "other-base"}))
    assert unfinished.json()["error"]["message"].startswith("unfinished: ")
    assert "still running" in unfinished.json()["error"]["message"] or "not finished" in unfinished.json()[
        "error"]["message"]
    assert foreign.json()["error"]["message"].startswith("other-base: its base is ")


@pytest.mark.parametrize("body, status, message", [
    ({"lora_name": "nope"}, 404, "The adapter 'nope' is not loaded."),
    ({"lora_name": "tiny-bloom0"}, 400, "'tiny-bloom0' is the base model, not an adapter."),
    ({"lora_name": "bloom-default"}, 400, "'bloom-default' holds the shared base's adapter slot (the first run the "
                                          "server started with); it stays loaded."),
    ({}, 400, "lora_name must be a non-empty string."),
])
def test_bad_unloads_are_a_4xx_in_one_sentence(live, body, status, message):
    response = call(live[1], ("POST", "/v1/unload_lora_adapter", body))[0]
    assert response.status_code == status and response.json()["error"]["message"] == message


def test_live_loading_is_off_without_an_adapters_dir_and_needs_a_key_off_loopback(shared, runs, tmp_path):
    from loraft.serve import serve

    response = call(create_app(shared), ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y"}))[0]
    assert response.status_code == 404 and response.json()["error"]["message"] == (
        "Loading adapters while serving is off: start the server with --adapters-dir DIR.")
    with pytest.raises(RunError, match=r"^--adapters-dir on 0\.0\.0\.0 needs --api-key: off loopback, loading "
                                       r"adapters takes a key, as `loraft ui` does$"):
        serve(runs[:1], host="0.0.0.0", adapters_dir=tmp_path)
    keyed = create_app(shared, ServeSettings(api_key="k"))
    assert call(keyed, ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y"}))[0].status_code == 401


def test_a_flood_of_loads_is_answered_without_a_5xx(live):
    engine, app, _ = live

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            return await asyncio.gather(*[client.post("/v1/load_lora_adapter", json={
                "lora_name": f"flood-{index}", "lora_path": "bloom-mlp"}) for index in range(12)])

    responses = asyncio.run(go())
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)
    loaded = [name for name in engine.names if name.startswith("flood-")]
    assert len(loaded) == statuses.count(200)
    unloads = call(app, *[("POST", "/v1/unload_lora_adapter", {"lora_name": name}) for name in loaded])
    assert [r.status_code for r in unloads] == [200] * len(loaded)
    assert engine.names == ["bloom-default", "tiny-bloom0"]


@FUZZ
@given(path=st.sampled_from(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]), data=st.data())
def test_any_load_or_unload_body_gets_an_answer_never_a_500(live, path, data):
    engine, app, _ = live
    anything = json_values | text | st.sampled_from(["bloom-mlp", "../bloom-default", "escape", "/", ".", "..",
                                                     "bloom-default", "tiny-bloom0", "unfinished", "other-base"])
    body = data.draw(st.one_of(json_values, st.dictionaries(st.sampled_from(["lora_name", "lora_path",
                                                                              "load_inplace", "x"]), anything,
                                                             max_size=3)))

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            return await client.post(path, content=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})

    response = asyncio.run(go())
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif path.endswith("/load_lora_adapter"):  # loaded: take it out again, so the names stay as they were
        name = response.json()["lora_name"]
        assert call(app, ("POST", "/v1/unload_lora_adapter", {"lora_name": name}))[0].status_code == 200
    assert engine.names == ["bloom-default", "tiny-bloom0"]


def test_one_adapter_per_batch_never_mixes_and_answers_the_same(runs, alone):
    engine, _ = load_runs(opened(runs), [run.name for run in runs], device="cpu", dtype="fp32", max_batch=8,
                          mix_adapters=False, max_queue=64)
    seen = []
    forward = engine.batcher._forward
    engine.batcher._forward = lambda *args: seen.append(set(args[-1])) or forward(*args)
    app = create_app(engine, ServeSettings(max_tokens_cap=32))
    requests = [(runs[index % 3].name, PROMPTS[index], 5) for index in range(6)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            with engine.paused():
                calls = [asyncio.ensure_future(client.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": tokens})) for name, prompt, tokens in requests]
                while len(engine.batcher.waiting) < len(requests):
                    await asyncio.sleep(0.01)
            return await asyncio.gather(*calls)

    responses = asyncio.run(go())
    assert all(len(adapters) == 1 for adapters in seen) and engine.batcher.largest_batch == 2
    for (name, prompt, tokens), response in zip(requests, responses):
        model, tokenizer, template, info = alone[name]
        settings = info["config"].generation.model_copy(update={"temperature": 0.0, "max_new_tokens": tokens})
        expected = generate_answers(model, tokenizer, template, [[{"role": "user", "content": prompt}]], settings,
                                    batch_size=1)[0]
        assert response.json()["choices"][0]["message"]["content"] == expected.text
    engine.close()


def test_the_stacked_lora_path_equals_peft_mixed_path(shared, runs):
    """loraft.serve.lora_rows against peft's own adapter_names on the same mixed batch: logits within 1e-5 (fp32)."""
    from loraft.serve.lora_rows import MixedAdapters

    model = shared.model
    names = [shared.models[run.name].adapter for run in runs] + ["__base__", shared.models[runs[0].name].adapter]
    ids = torch.randint(5, 300, (len(names), 9), generator=torch.Generator().manual_seed(0))
    own = {id(module) for module in model.modules() if "forward" in vars(module)}
    with torch.no_grad():
        with MixedAdapters(model, stacked=True).rows(names):
            stacked = model(input_ids=ids).logits
        with MixedAdapters(model, stacked=False).rows(names):
            peft = model(input_ids=ids).logits
    torch.testing.assert_close(stacked, peft, rtol=0, atol=1e-5)
    assert {id(module) for module in model.modules() if "forward" in vars(module)} == own  # layers' own forwards back


@FUZZ
@given(path=st.sampled_from(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]), raw=st.binary(max_size=200),
       content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_any_bytes_to_load_or_unload_get_a_4xx(live, path, raw, content_type):
    engine, app, _ = live

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            return await client.post(path, content=raw, headers={"content-type": content_type})

    response = asyncio.run(go())
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert engine.names == ["bloom-default", "tiny-bloom0"]
