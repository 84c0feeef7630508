"""Many runs on one base (`loraft serve RUN RUN ...`): each run's answers inside mixed batches equal that run
served alone, runs that cannot share are refused, and adapters load and unload live."""

import asyncio
import json

import httpx
import pytest
import torch

from loraft.errors import RunError
from loraft.generate import generate_answers, load_run
from loraft.rundir import RunAccess, open_run
from loraft.serve import ServeSettings, create_app
from loraft.serve.adapters import load_runs
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
