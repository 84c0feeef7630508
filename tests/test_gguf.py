"""GGUF export, proved by llama.cpp itself (xllamacpp): merged f32 and q8_0, adapter-only with its negative
control, rsLoRA's alpha, the BLOOM pre-tokenizer fallback, and the refusals, each one sentence.

The converter tree is llama.cpp's own, fetched once with pip (the pinned llama-cpp-python source package, sha256
checked) into a cache that outlives the test session ($LORAFT_TEST_CACHE, else ~/.cache/loraft-test), or
$LLAMA_CPP_DIR. The real tokenizer is Qwen2's, rebuilt by transformers from the tree's ggml-vocab-qwen2.gguf.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("xllamacpp", reason="the gguf extra is not installed (pip install 'loraft[gguf]')")
pytest.importorskip("sentencepiece", reason="the gguf extra is not installed (pip install 'loraft[gguf]')")
pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'loraft[gguf]')")

from conftest import TEST_CACHE as CACHE, locked_test_cache  # noqa: E402
from loraft.demo import bloom_pre_tokenizer  # noqa: E402
from loraft.errors import RunError  # noqa: E402
from loraft.export import llamacpp  # noqa: E402
from loraft.export.gguf import export_gguf, llama_cpp_adapter_config  # noqa: E402
from loraft.export.verify import TOLERANCES  # noqa: E402
from loraft.files import staged_directory  # noqa: E402

RECORDS = [
    {"instruction": "把字母变成大写", "input": "abc", "output": "ABC"},
    {"instruction": "你好", "input": "", "output": "你好！我是一个简洁的助手。"},
    {"instruction": "1+1 等于几？", "input": "", "output": "2"},
    {"instruction": "Translate to English", "input": "猫", "output": "cat"},
]


@pytest.fixture(scope="session")
def llama_cpp_tree() -> Path:
    """llama.cpp's converter tree: $LLAMA_CPP_DIR, else the pinned copy (fetched once, kept across sessions)."""
    if os.environ.get(llamacpp.ENV_DIR):
        return Path(os.environ[llamacpp.ENV_DIR])
    target = CACHE / "llama.cpp" / f"{llamacpp.PINNED_PACKAGE}-{llamacpp.PINNED_VERSION}"
    with locked_test_cache():
        if not (target / llamacpp.STAMP).is_file():
            llamacpp.fetch_pinned(target, log=lambda line: None)
    return target


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(llama_cpp_tree) -> Path:
    """Qwen2's real tokenizer, rebuilt offline from ggml-vocab-qwen2.gguf (cached: the rebuild takes ~20 s)."""
    from transformers import AutoTokenizer

    target = CACHE / "tokenizers" / f"qwen2-{llamacpp.PINNED_VERSION}"
    with locked_test_cache():
        if not (target / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(llama_cpp_tree / "models"),
                                                      gguf_file="ggml-vocab-qwen2.gguf")
            with staged_directory(target) as staging:
                tokenizer.save_pretrained(str(staging))
    return target


@pytest.fixture(scope="module")
def tiny_qwen2_real_vocab(tmp_path_factory, qwen2_tokenizer_dir) -> Path:
    """A 2-layer random Qwen2 (tied embeddings) with Qwen2's real tokenizer and chat template."""
    from transformers import AutoTokenizer, Qwen2Config

    from conftest import save_random_model

    tokenizer = AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    return save_random_model(tmp_path_factory.mktemp("qwen2-real-vocab"), tokenizer, config)


def _train(root: Path, name: str, base: Path, template: str, overrides=()) -> Path:
    from conftest import write_alpaca
    from loraft.config import load_config
    from loraft.train import train

    data = write_alpaca(root / f"{name}.jsonl", RECORDS, repeat=3)
    config = load_config(None, [
        f"model.name_or_path={base}", f"data.path={data}", f"output_dir={root / name}", "overwrite=true",
        f"data.template={template}", "adapter.modules_to_save=null", "adapter.r=8", "adapter.alpha=16",
        "train.max_steps=10", "train.learning_rate=0.05", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.save_steps=1000", "train.precision=fp32", *overrides,
    ])
    return train(config)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_qwen2_real_vocab) -> Path:
    """rsLoRA (scale alpha/sqrt(r) = 2; llama.cpp applies alpha/r, so the export rescales alpha) on every attention
    and MLP projection; the model's own (ChatML) template."""
    return _train(tmp_path_factory.mktemp("gguf-runs"), "qwen", tiny_qwen2_real_vocab, "model",
                  ["adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                   "adapter.use_rslora=true", "adapter.r=16", "adapter.alpha=8"])


@pytest.fixture(scope="module")
def qwen_adapter_export(qwen_run, llama_cpp_tree, tmp_path_factory) -> tuple[Path, dict]:
    """The run exported with --adapter-only (f32), once for the tests that read it: (its folder, its report)."""
    out = tmp_path_factory.mktemp("gguf-adapter") / "adapter"
    return out, export_gguf(qwen_run, out, outtype="f32", adapter_only=True, llama_cpp=str(llama_cpp_tree),
                            log=lambda line: None)


def _report(out: Path) -> dict:
    return json.loads((out / "export_report.json").read_text(encoding="utf-8"))


def test_converter_tree_is_read_without_running_it(llama_cpp_tree):
    architectures = llamacpp.supported_architectures(llama_cpp_tree)
    assert {"Qwen2ForCausalLM", "LlamaForCausalLM", "BloomForCausalLM", "MistralForCausalLM"} <= architectures
    chktxt, table = llamacpp.pre_tokenizer_table(llama_cpp_tree)
    assert "我想在apple工作1314151天～" in chktxt
    assert {"qwen2", "llama-bpe", "bloom", "gpt-2"} <= set(table.values())


def test_merged_f32_and_q8_0_are_verified_by_llama_cpp(qwen_run, llama_cpp_tree, tmp_path):
    out, reports = tmp_path / "gguf", {}
    for outtype in ("f32", "q8_0"):  # q8_0 overwrites the f32 export: no stale GGUF may stay beside it
        report = export_gguf(qwen_run, out, outtype=outtype, llama_cpp=str(llama_cpp_tree), overwrite=outtype != "f32",
                             log=lambda line: None)
        assert report == _report(out)
        reports[outtype] = verify = report["verify"]
        assert verify["passed"] and verify["logprob_max_abs_diff"] <= TOLERANCES[outtype]
        assert verify["tokenization"]["equal"] == verify["tokenization"]["strings"] >= 8
        assert all(p["template_text_equal"] and p["chat_tokens_equal"] for p in verify["prompts"])
        assert report["tokenizer"] == {"kind": "recognised", "pre_tokenizer": "qwen2",
                                       "chkhsh": report["tokenizer"]["chkhsh"]}
        assert (out / f"model-{outtype}.gguf").stat().st_size == report["files"]["bytes"]["model"]
        modelfile = (out / "Modelfile").read_text(encoding="utf-8")
        assert f"FROM ./model-{outtype}.gguf" in modelfile and "TEMPLATE" in modelfile
        assert 'PARAMETER stop "<|im_end|>"' in modelfile
        assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging or work folder left
        assert [p.name for p in out.glob("*.gguf")] == [f"model-{outtype}.gguf"]
    # f32 differs from transformers by rounding alone; q8_0 by its quantization, which is larger
    assert reports["f32"]["logprob_max_abs_diff"] < 1e-3
    assert reports["q8_0"]["logprob_max_abs_diff"] > reports["f32"]["logprob_max_abs_diff"]


def test_q4_k_m_through_llama_quantize_is_verified(qwen_run, llama_cpp_tree, tmp_path):
    """q4_k_m needs llama.cpp's llama-quantize, which no wheel ships: run where one is found ($LLAMA_QUANTIZE, PATH
    or the tree's build/bin); CI has none and tests the refusal instead (below)."""
    quantizer = llamacpp.find_quantize(str(llama_cpp_tree))
    if quantizer is None:
        pytest.skip("no llama-quantize ($LLAMA_QUANTIZE, PATH or LLAMA_CPP_DIR/build/bin); the refusal is tested")
    out = tmp_path / "q4"
    report = export_gguf(qwen_run, out, outtype="q4_k_m", llama_cpp=str(llama_cpp_tree), log=lambda line: None)
    assert report["verify"]["passed"] and report["quantizer"] == str(quantizer)
    assert report["verify"]["logprob_max_abs_diff"] <= TOLERANCES["q4_k_m"]
    assert (out / "model-q4_k_m.gguf").is_file() and not (out / "model-f16.gguf").exists()


def test_adapter_only_is_verified_and_the_base_alone_is_not(qwen_adapter_export):
    out, report = qwen_adapter_export
    assert report["mode"] == "adapter" and report["verify"]["passed"]
    assert {p.name for p in out.iterdir()} >= {"base-f32.gguf", "adapter-f32.gguf", "Modelfile", "export_report.json"}
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./base-f32.gguf" in modelfile and "ADAPTER ./adapter-f32.gguf" in modelfile
    # negative control: the same comparison without the adapter is far outside the tolerance
    control = report["verify"]["base_without_adapter_max_abs_diff"]
    assert control > 5 * TOLERANCES["f32"] and control > 100 * report["verify"]["logprob_max_abs_diff"]


def test_rslora_alpha_is_rescaled_for_llama_cpp(qwen_run, qwen_adapter_export, llama_cpp_tree, tmp_path,
                                                monkeypatch):
    config, note = llama_cpp_adapter_config({"r": 16, "lora_alpha": 16, "use_rslora": True})
    assert config["lora_alpha"] / config["r"] == pytest.approx(16 / 16 ** 0.5) and "rsLoRA" in note
    _, report = qwen_adapter_export  # the run is rsLoRA's
    assert report["verify"]["passed"] and any("rsLoRA" in n for n in report["notes"])
    # without the rescale llama.cpp applies alpha/r instead of alpha/sqrt(r): the check catches it
    monkeypatch.setattr("loraft.export.gguf.llama_cpp_adapter_config", lambda adapter: (adapter, None))
    with pytest.raises(RunError, match="verification failed"):
        export_gguf(qwen_run, tmp_path / "wrong", outtype="f32", adapter_only=True, llama_cpp=str(llama_cpp_tree),
                    log=lambda line: None)
    assert not _report(tmp_path / "wrong")["verify"]["passed"]


def _bpe_tokenizer(pre_tokenizer, path: Path):
    """A small byte-level BPE with `pre_tokenizer`, trained on Chinese/English/code text, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    text = CORPUS + [r["instruction"] + r["input"] + r["output"] for r in RECORDS] + [
        "def square(x):\n    return x ** 2", "你好，世界！今天天气很好。", "3 33 333 3.14159"]
    tokenizer.train_from_iterator(text * 5, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>")
    wrapped.save_pretrained(str(path))
    return wrapped


def test_bloom_pre_tokenizer_fallback_is_proved_by_tokenizing(tmp_path_factory, llama_cpp_tree, tmp_path):
    """A BLOOM vocabulary llama.cpp's hash table does not know (like Langboat/bloom-1b4-zh's) converts as
    llama.cpp's 'bloom' pre-tokenizer because its structure is BLOOM's, and the export proves the tokenization;
    with the recipe's adapter, whose trained copy of the tied embedding the merge unties (lm_head keeps its own)."""
    from transformers import BloomConfig

    from conftest import save_random_model

    base = tmp_path_factory.mktemp("bloom-vocab")
    tokenizer = _bpe_tokenizer(bloom_pre_tokenizer(), base)
    save_random_model(base, tokenizer, BloomConfig(
        vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # the recipe's adapter: LoRA on layer 1's query_key_value, the tied word_embeddings trained in full
    run = _train(tmp_path_factory.mktemp("gguf-bloom"), "bloom", base, "human_assistant",
                 ["adapter.target_modules=.*\\.1.*query_key_value", "adapter.modules_to_save=[word_embeddings]"])
    report = export_gguf(run, tmp_path / "bloom", outtype="f32", llama_cpp=str(llama_cpp_tree), log=lambda line: None)
    assert report["tokenizer"]["kind"] == "fallback" and report["tokenizer"]["pre_tokenizer"] == "bloom"
    assert report["verify"]["passed"]
    assert report["verify"]["tokenization"]["equal"] == report["verify"]["tokenization"]["strings"]
    assert 'PARAMETER stop "</s>"' in (tmp_path / "bloom" / "Modelfile").read_text(encoding="utf-8")


def test_an_unrecognised_pre_tokenizer_is_refused_in_one_sentence(llama_cpp_tree, tmp_path):
    from tokenizers import pre_tokenizers

    converter = llamacpp.Converter(llama_cpp_tree, "test")
    tokenizer = _bpe_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), tmp_path)
    with pytest.raises(RunError) as refused:
        llamacpp.check_tokenizer(tmp_path, tokenizer, converter)
    message = str(refused.value)
    assert "does not recognise this tokenizer's pre-tokenizer" in message and "\n" not in message
    assert str(tmp_path / "tokenizer.json") in message
    # the same vocabulary with BLOOM's pre-tokenizer is accepted as the fallback
    bloom_dir = tmp_path / "bloom"
    bloom = _bpe_tokenizer(bloom_pre_tokenizer(), bloom_dir)
    assert llamacpp.check_tokenizer(bloom_dir, bloom, converter).name == "bloom"


def test_refusals_before_any_heavy_work(qwen_run, llama_cpp_tree, tmp_path, monkeypatch):
    """adapter-only with modules_to_save or DoRA, q4_k_m without a quantizer, an architecture the converter lacks:
    one sentence each, nothing written; the CLI exits 2."""
    from loraft.cli import main

    for change, reason in (({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
                           ({"use_dora": True}, "DoRA")):
        run = tmp_path / f"run-{reason}"
        shutil.copytree(qwen_run, run)
        adapter = json.loads((run / "adapter_config.json").read_text())
        (run / "adapter_config.json").write_text(json.dumps({**adapter, **change}))
        with pytest.raises(RunError, match=f"--adapter-only is not possible because .*{reason}.*export the merged"):
            export_gguf(run, tmp_path / f"out-{reason}", adapter_only=True, llama_cpp=str(llama_cpp_tree))
        assert not (tmp_path / f"out-{reason}").exists()
    monkeypatch.delenv(llamacpp.ENV_QUANTIZE, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RunError, match="q4_k_m needs llama.cpp's quantizer and none was found"):
        export_gguf(qwen_run, tmp_path / "q4", outtype="q4_k_m", llama_cpp=str(llama_cpp_tree))
    monkeypatch.undo()
    monkeypatch.setattr(llamacpp, "supported_architectures", lambda root: frozenset({"LlamaForCausalLM"}))
    with pytest.raises(RunError, match="converter .* does not support the Qwen2ForCausalLM architecture"):
        export_gguf(qwen_run, tmp_path / "arch", llama_cpp=str(llama_cpp_tree))
    assert not (tmp_path / "arch").exists()
    monkeypatch.undo()
    run = tmp_path / "run-modules_to_save"
    assert main(["export", str(run), "--adapter-only", "--llama-cpp", str(llama_cpp_tree)]) == 2


def test_no_converter_offline_is_one_sentence(tmp_path, monkeypatch):
    """No --llama-cpp, no $LLAMA_CPP_DIR, no cached copy, and pip cannot reach an index: say what to pass."""
    monkeypatch.delenv(llamacpp.ENV_DIR, raising=False)
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RunError) as refused:
        llamacpp.locate_converter(None, log=lambda line: None)
    message = str(refused.value)
    assert message.startswith("no llama.cpp converter: pass --llama-cpp DIR") and "$LLAMA_CPP_DIR" in message
    assert not (tmp_path / "home" / "llama.cpp").exists()
    with pytest.raises(RunError, match="not a llama.cpp tree"):
        llamacpp.locate_converter(str(tmp_path))


def test_no_converter_is_fetched_where_downloads_are_off(tmp_path, monkeypatch):
    """loraft ui without --allow-hub sets LORAFT_OFFLINE=1 for all it starts: an export job says so, runs no pip."""
    monkeypatch.delenv(llamacpp.ENV_DIR, raising=False)
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(llamacpp.ENV_OFFLINE, "1")
    monkeypatch.setattr(llamacpp, "fetch_pinned", lambda *args, **kwargs: pytest.fail("it tried to download"))
    with pytest.raises(RunError) as refused:
        llamacpp.locate_converter(None, log=lambda line: None)
    target = tmp_path / "home" / "llama.cpp" / f"{llamacpp.PINNED_PACKAGE}-{llamacpp.PINNED_VERSION}"
    assert str(refused.value) == (
        f"no llama.cpp converter: pass --llama-cpp DIR (a llama.cpp checkout) or set $LLAMA_CPP_DIR, or run once with "
        f"network so loraft can fetch {llamacpp.PINNED_PACKAGE}=={llamacpp.PINNED_VERSION}'s copy into {target} "
        "($LORAFT_OFFLINE=1: this process does not download; loraft ui sets it unless started with --allow-hub)")
