"""Precision by capability: every branch of `auto` forced by patching the probe or by $LORAFT_CPU_BF16 (no timings
asserted)."""

import json
import shutil

import pytest
import torch

from loraft import precision


@pytest.fixture()
def probe(monkeypatch, tmp_path):
    """A fresh probe cache; `probe.set(flags, speedup)` fixes what the CPU flags and the matmul probe say.

    The session's $LORAFT_CPU_BF16 (conftest) is removed: here the (patched) flags and probe decide.
    """
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(precision.CPU_BF16_OVERRIDE, raising=False)  # this fixture decides what the CPU says
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
    caps = precision.machine_capabilities("cpu")
    assert precision.choose_inference_dtype("auto", caps)[0] == expected
    assert precision.choose_precision("auto", caps) == (expected, precision.choose_precision("auto", caps)[1])
    assert f"{speedup:.2f}x fp32" in precision.choose_precision("auto", caps)[1]


def test_other_architectures_are_decided_by_the_probe(probe):
    probe.set(flags=None, speedup=2.0)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    probe.set(flags=None, speedup=0.5)
    assert precision.resolve_precision("auto", "cpu") == "fp32"


def test_explicit_precision_is_kept(probe):
    probe.set(flags=False, speedup=0.001)
    for name in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(name, "cpu") == name
    assert precision.choose_inference_dtype(None, precision.machine_capabilities("cpu"))[0] == "fp32"
    assert probe.calls == []


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_cuda_branch(probe, monkeypatch, bf16_supported, expected):
    probe.set(flags=False, speedup=1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda: bf16_supported)
    monkeypatch.setattr(precision, "cuda_device_name", lambda: "NVIDIA H100")
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
    args = build_training_arguments(config, _plan(config), tmp_path / "run", has_eval=False)
    assert not args.bf16 and not args.fp16
    probe.set(flags=True, speedup=3.0)
    args = build_training_arguments(config, _plan(config), tmp_path / "run", has_eval=False)
    assert args.bf16


def test_demo_pretraining_follows_the_probe(probe, tmp_path):
    from loraft import demo

    recipe = demo.BaseRecipe(hidden_size=32, n_layer=1, n_head=2, seq_len=16, batch_size=2,
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


def test_auto_budget_follows_the_probe(probe, tmp_path):
    from loraft.config import load_config
    from loraft.trainer import build_training_arguments

    config = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.device=cpu"])
    assert config.train.micro_batch_tokens == "auto"
    probe.set(flags=False, speedup=1.0)
    assert _plan(config).micro_batch_tokens == 256
    probe.set(flags=True, speedup=3.0)
    assert _plan(config).micro_batch_tokens == 1024
    # either way the whole optimizer step is collated as one batch
    args = build_training_arguments(config, _plan(config), tmp_path / "run", has_eval=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 1)


def _plan(config):
    """The run's plan from this (patched) machine's capabilities, with the static speed choices."""
    from loraft.plan import make_plan
    from loraft.precision import machine_capabilities

    return make_plan(config, machine_capabilities(config.model.device), {"model_type": "bloom"})


@pytest.mark.parametrize("setting, expected", [("fast", "bf16"), ("emulated", "fp32")])
def test_the_capability_override_decides_without_measuring(probe, monkeypatch, setting, expected):
    probe.set(flags=False, speedup=10.0)  # the flags and the probe would say otherwise: the override wins
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, setting)
    caps = precision.machine_capabilities("cpu")
    assert caps.source == "override"
    assert precision.choose_precision("auto", caps) == (
        expected, f"auto: $LORAFT_CPU_BF16={setting} says bf16 is {setting} on this CPU")
    assert probe.calls == []


def test_a_bad_capability_override_is_one_sentence(monkeypatch):
    from loraft.errors import ConfigError

    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "maybe")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^\$LORAFT_CPU_BF16 must be fast or emulated \(got 'maybe'\)$"):
        precision.machine_capabilities("cpu")
