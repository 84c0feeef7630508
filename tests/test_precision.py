"""Precision by capability: every branch of `auto` forced by patching the probe (no timings asserted)."""

import json
import shutil

import pytest
import torch

from loraft import precision


@pytest.fixture()
def probe(monkeypatch, tmp_path):
    """A fresh probe cache; `probe.set(flags, speedup)` fixes what the CPU flags and the matmul probe say."""
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision.cpu_probe.cache_clear()
    calls = []

    class Probe:
        def set(self, flags, speedup, keep_cache=False):
            if not keep_cache:
                shutil.rmtree(tmp_path / "home" / "probe", ignore_errors=True)
            monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)

            def measure():
                calls.append(speedup)
                return 100.0, 100.0 * speedup

            monkeypatch.setattr(precision, "measure_matmul_speedup", measure)
            precision.cpu_probe.cache_clear()

        calls = None

    handle = Probe()
    handle.calls = calls
    yield handle
    precision.cpu_probe.cache_clear()


def test_x86_without_bf16_flags_is_fp32_without_measuring(probe):
    probe.set(flags=False, speedup=10.0)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("auto", "auto") == "fp32"
    assert probe.calls == []  # settled by the flags: no probe
    assert precision.hardware_class("cpu") == "cpu-fp32-only"


@pytest.mark.parametrize("speedup, expected", [(3.2, "bf16"), (2.3, "bf16"), (1.2, "fp32"), (0.003, "fp32")])
def test_bf16_flags_are_confirmed_by_the_probe(probe, speedup, expected):
    """AMX (3-5x), AVX512-BF16 (2.3x), marginal (1.2x) and emulated bf16 (0.003x: flags present, kernels capped)."""
    probe.set(flags=True, speedup=speedup)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert probe.calls == [speedup]
    assert precision.inference_dtype("auto", "cpu") == precision.DTYPES[expected]


def test_other_architectures_are_decided_by_the_probe(probe):
    probe.set(flags=None, speedup=2.0)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    probe.set(flags=None, speedup=0.5)
    assert precision.resolve_precision("auto", "cpu") == "fp32"


def test_explicit_precision_is_kept(probe):
    probe.set(flags=False, speedup=0.001)
    for name in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(name, "cpu") == name
    assert precision.inference_dtype(None, "cpu") == torch.float32
    assert probe.calls == []


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_cuda_branch(probe, monkeypatch, bf16_supported, expected):
    probe.set(flags=False, speedup=1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda: bf16_supported)
    assert precision.device_type("auto") == "cuda"
    assert precision.resolve_precision("auto", "auto") == expected
    assert precision.resolve_precision("auto", "cuda:1") == expected
    # an explicit CPU device is still decided by the CPU
    assert precision.resolve_precision("auto", "cpu") == "fp32"


def test_probe_is_measured_once_per_machine_and_cached_on_disk(probe, monkeypatch, tmp_path):
    probe.set(flags=True, speedup=2.5)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    files = list((tmp_path / "home" / "probe").glob("precision-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["bf16_speedup"] == 2.5
    precision.cpu_probe.cache_clear()  # a new process reads the file instead of measuring
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    assert probe.calls == [2.5]
    # capping the kernels' instruction set changes what bf16 costs: another cache entry, measured again
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision.cpu_probe.cache_clear()
    probe.set(flags=True, speedup=0.01, keep_cache=True)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert probe.calls == [2.5, 0.01]
    assert len(list((tmp_path / "home" / "probe").glob("precision-*.json"))) == 2


def test_real_probe_measures_both_dtypes():
    fp32, bf16 = precision.measure_matmul_speedup(size=64, rounds=1, seconds=0.01)
    assert fp32 > 0 and bf16 > 0


def test_training_arguments_follow_the_probe(probe, tmp_path, tiny_bloom_dir):
    from loraft.config import load_config
    from loraft.trainer import build_training_arguments

    config = load_config(None, [f"model.name_or_path={tiny_bloom_dir}", f"output_dir={tmp_path / 'run'}",
                                "model.device=cpu"])
    probe.set(flags=True, speedup=0.003)  # flags say bf16, the kernels emulate it
    args = build_training_arguments(config, tmp_path / "run", has_eval=False)
    assert not args.bf16 and not args.fp16
    probe.set(flags=True, speedup=3.0)
    args = build_training_arguments(config, tmp_path / "run", has_eval=False)
    assert args.bf16


def test_demo_pretraining_follows_the_probe(probe, tmp_path):
    from loraft import demo

    recipe = demo.BaseRecipe(vocab_size=600, hidden_size=32, n_layer=1, n_head=2, seq_len=16, batch_size=2,
                             steps=1, warmup_steps=1)
    for speedup, expected in ((0.003, "fp32"), (3.0, "bf16 autocast")):
        probe.set(flags=True, speedup=speedup)
        lines: list[str] = []
        demo.build_demo_base(tmp_path / f"home-{speedup}", recipe=recipe, log=lines.append)
        assert f"  pretraining on cpu, {expected}" in lines


def test_shipped_configs_say_auto():
    from loraft.config import load_config
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(path)
        assert config.train.precision == "auto", path
        assert config.model.device == "auto", path
        assert config.generation.dtype == "auto", path


@pytest.mark.parametrize("setting, precision_name, max_length, expected", [
    ("auto", "fp32", 256, 256), ("auto", "bf16", 256, 1024), ("auto", "fp16", 256, 1024),
    ("auto", "bf16", 64, 256), ("auto", "bf16", 2048, 2048), ("auto", "fp32", 2048, 2048), ("auto", "fp32", 64, 256),
    (512, "fp32", 256, 512), (0, "bf16", 256, 0),
])
def test_micro_batch_budget(setting, precision_name, max_length, expected):
    from loraft.batching import micro_batch_budget

    assert micro_batch_budget(setting, precision_name, max_length) == expected


def test_auto_budget_follows_the_probe(probe, tmp_path):
    from loraft.config import load_config
    from loraft.trainer import build_training_arguments, micro_batch_tokens

    config = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.device=cpu"])
    assert config.train.micro_batch_tokens == "auto"
    probe.set(flags=False, speedup=1.0)
    assert micro_batch_tokens(config) == 256
    probe.set(flags=True, speedup=3.0)
    assert micro_batch_tokens(config) == 1024
    # either way the whole optimizer step is collated as one batch
    args = build_training_arguments(config, tmp_path / "run", has_eval=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 1)
