"""The plan: every decision made once, from explicit capabilities, with its reason; the autotune's choices."""

import json

import pytest

from loraft import tune
from loraft.config import load_config
from loraft.errors import ConfigError
from loraft.plan import make_plan
from loraft.plan_memory import estimate_memory
from loraft.precision import Capabilities

FAST = Capabilities("cpu", "override", cpu_bf16_flags=True, bf16_speedup=4.0)
EMULATED = Capabilities("cpu", "override", cpu_bf16_flags=False, bf16_speedup=0.01)
PROBED_SLOW = Capabilities("cpu", "probe", cpu_bf16_flags=True, bf16_speedup=0.9, fp32_gflops=100.0, bf16_gflops=90.0)
NO_FLAGS = Capabilities("cpu", "flags", cpu_bf16_flags=False)
H100 = Capabilities("cuda", "cuda", cuda_name="NVIDIA H100", cuda_bf16=True)
BLOOM = {"model_type": "bloom", "hidden_size": 64, "n_head": 4, "n_layer": 2, "vocab_size": 300}


@pytest.fixture(autouse=True)
def fresh_tuning_cache(monkeypatch, tmp_path):
    """Each test measures into its own cache (the session's is shared)."""
    monkeypatch.setenv("LORAFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFT_CACHE_DIR", raising=False)


def _config(*overrides):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("caps, precision, budget, reason", [
    (FAST, "bf16", 1024, "auto: $LORAFT_CPU_BF16=fast says bf16 is fast on this CPU"),
    (EMULATED, "fp32", 256, "auto: $LORAFT_CPU_BF16=emulated says bf16 is emulated on this CPU"),
    (NO_FLAGS, "fp32", 256, "auto: the CPU flags show neither AVX512-BF16 nor AMX, so bf16 would be emulated"),
    (PROBED_SLOW, "fp32", 256, "auto: the matmul probe measured bf16 at 0.90x fp32 (90.0 vs 100.0 GFLOPS), below "
                               "the 1.5x that pays"),
    (H100, "bf16", 1024, "auto: NVIDIA H100 supports bf16"),
])
def test_precision_and_sub_batches_follow_the_capabilities_on_both_branches(caps, precision, budget, reason):
    plan = make_plan(_config(), caps, BLOOM)
    assert (plan.precision, plan.micro_batch_tokens, plan.reasons["precision"]) == (precision, budget, reason)
    assert plan.generation_dtype == precision
    assert (plan.samples_per_batch, plan.accumulation) == (8, 1)
    assert plan.weights == ("fp32" if precision == "fp32" else "frozen linear weights in bf16, trainable ones fp32")
    assert plan.use_cpu == (caps.device == "cpu")


def test_the_plan_is_a_pure_function_and_round_trips():
    first, second = make_plan(_config(), FAST, BLOOM), make_plan(_config(), FAST, BLOOM)
    assert first == second
    assert type(first).from_dict(json.loads(json.dumps(first.to_dict()))) == first
    with pytest.raises(AttributeError):
        first.precision = "fp32"  # frozen


def test_an_unregistered_family_trains_without_a_speed_path_and_says_so():
    plan = make_plan(_config("train.packing=true"), EMULATED, {"model_type": "gemma3"})
    assert plan.speed_path == "none: trains at transformers' speed"
    assert plan.reasons["speed_path"] == "no loraft.fastpaths entry for model_type gemma3"
    assert not plan.fused_loss and plan.reasons["fused_loss"] == "no speed path registered for model_type gemma3"
    assert not plan.packing and not plan.attention_patch
    assert "speed path          none: trains at transformers' speed" in plan.describe()


@pytest.mark.parametrize("overrides, world_size, reason", [
    ((), 2, "2 processes: the wrapped model (DDP) must be called whole"),
    (("adapter.method=prompt_tuning",), 1, "prompt and prefix tuning prepend virtual tokens to the logits"),
    (("train.supervised_loss=false",), 1, "off (train.supervised_loss=false)"),
])
def test_when_the_fused_loss_does_not_apply(overrides, world_size, reason):
    plan = make_plan(_config(*overrides), EMULATED, BLOOM, world_size=world_size)
    assert not plan.fused_loss and plan.reasons["fused_loss"] == reason
    assert plan.world_size == world_size


def test_fp16_without_cuda_is_one_sentence():
    with pytest.raises(ConfigError, match=r"^train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on this machine$"):
        make_plan(_config("train.precision=fp16"), FAST, BLOOM)
    assert make_plan(_config("train.precision=fp16"), H100, BLOOM).precision == "fp16"


def test_explicit_settings_are_kept_with_their_reason():
    plan = make_plan(_config("train.micro_batch_tokens=0", "train.precision=bf16", "model.attn_implementation=eager",
                             "train.optim=adamw_torch"), EMULATED, BLOOM)
    assert (plan.precision, plan.micro_batch_tokens, plan.samples_per_batch, plan.accumulation) == ("bf16", 0, 1, 8)
    assert (plan.attention, plan.attention_patch, plan.optimizer) == ("eager", False, "adamw_torch")
    assert plan.reasons["micro_batch_tokens"] == "set in the config (train.micro_batch_tokens)"


def test_measured_choices_replace_the_static_defaults():
    tuning = {"choice": {"micro_batch_tokens": 512, "attention": "eager", "fused_loss": False,
                         "optimizer": "adamw_torch"}, "seconds": 1.0, "predicted_step": {"chosen": 1, "recipe": 2}}
    plan = make_plan(_config(), EMULATED, BLOOM, tuning=tuning)
    assert (plan.micro_batch_tokens, plan.attention, plan.attention_patch) == (512, "eager", False)
    assert not plan.fused_loss and "measured slower" in plan.reasons["fused_loss"]
    assert plan.optimizer == "adamw_torch" and plan.tuning == tuning
    # a setting the user chose is never overruled by a measurement
    chosen = make_plan(_config("train.optim=sgd"), EMULATED, BLOOM, tuning=tuning)
    assert chosen.optimizer == "sgd"


class _Tagged:
    """A stand-in for a timed piece of work: what it is, so the patched timer can answer for it."""

    def __init__(self, *tag):
        self.tag = tag

    def __call__(self, first_only=False):
        pass


def _patched_measurement(monkeypatch, seconds):
    monkeypatch.setattr(tune, "one_layer_model", lambda config, precision, attention, device, vocab: attention)
    monkeypatch.setattr(tune, "_step_work", lambda model, lengths, budget, precision, device: _Tagged(model, budget))
    monkeypatch.setattr(tune, "_head_work", lambda hidden, vocab, precision, fused, device: _Tagged("head", fused))
    monkeypatch.setattr(tune, "_optimizer_work", lambda name, device: _Tagged("optimizer", name))
    monkeypatch.setattr(tune, "timed", lambda work, **kwargs: seconds(*work.tag))


def test_when_every_speed_path_loses_the_reference_path_is_chosen(monkeypatch):
    def seconds(what, option):
        if what == "library":
            return 1.0 if option == 0 else 2.0  # one sample at a time, the library's attention: the fastest
        if what == "patch":
            return 1.5
        if what == "head":
            return 2.0 if option else 1.0  # the fused loss twice as slow per row as full logits
        return 1.0 if option == "adamw_torch" else 1.5  # foreach AdamW clearly faster

    _patched_measurement(monkeypatch, seconds)
    config = _config()
    result = tune.measure(config, "fp32", BLOOM, log=lambda line: None)
    assert result["choice"] == {"micro_batch_tokens": 0, "attention": "eager", "fused_loss": False,
                                "optimizer": "adamw_torch"}
    plan = make_plan(config, EMULATED, BLOOM, tuning=result)
    assert (plan.micro_batch_tokens, plan.attention, plan.fused_loss, plan.optimizer) == (0, "eager", False,
                                                                                        "adamw_torch")
    assert (plan.samples_per_batch, plan.accumulation) == (1, 8)  # the reference's micro-batches
    assert result["predicted_step"]["chosen"] <= result["predicted_step"]["recipe"]
    assert tune.cached(config, "fp32", BLOOM) == result  # measured once, then read back


def test_when_sub_batches_and_the_patch_win_they_are_chosen(monkeypatch):
    def seconds(what, option):
        if what in ("library", "patch"):
            return {0: 3.0, 256: 2.0, 512: 1.0, 1024: 1.2}[option] * (1.0 if what == "patch" else 1.5)
        if what == "head":
            return 0.5 if option else 1.0
        return 1.0

    _patched_measurement(monkeypatch, seconds)
    result = tune.measure(_config(), "bf16", BLOOM, log=lambda line: None)
    assert result["choice"] == {"micro_batch_tokens": 512, "attention": "patch", "fused_loss": True,
                                "optimizer": "adamw_torch_fused"}
    # sub-batches up to the static budget (bf16 at max_length 256: 1,024 tokens), never more memory than that
    # 256 tokens hold one of these similar-length samples at a time: the one-sample layout, not timed again
    assert set(result["layouts"]) == {f"{name}/{size}" for name in ("library", "patch") for size in (0, 512, 1024)}
    fp32 = tune.measure(_config("train.sampling=random"), "fp32", BLOOM, log=lambda line: None)
    assert set(fp32["layouts"]) == {"library/0", "patch/0", "patch/256", "library/256"}
    assert (fp32["choice"]["micro_batch_tokens"], fp32["choice"]["attention"]) == (256, "patch")


@pytest.mark.parametrize("static_seconds, expected", [
    (0.98, (256, "patch")),  # within the timing noise of the others: the static default stays
    (1.05, (256, "patch")),  # 5% slower than the reference's path: still noise
    (1.15, (0, "eager")),  # clearly slower than the reference's path: the reference's path
])
def test_the_static_default_stays_unless_clearly_beaten(monkeypatch, static_seconds, expected):
    def seconds(what, option):
        if what in ("library", "patch"):
            return 1.0 if (what, option) == ("library", 0) else static_seconds
        return 1.0

    _patched_measurement(monkeypatch, seconds)
    result = tune.measure(_config(), "fp32", BLOOM, log=lambda line: None)
    assert (result["choice"]["micro_batch_tokens"], result["choice"]["attention"]) == expected


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000}


@pytest.mark.parametrize("eager_seconds, attention, reason", [
    (0.5, "eager", "measured faster than the library default on this machine (loraft.tune)"),
    (1.5, None, "transformers' default for this family"),
])
def test_without_a_patch_the_librarys_default_is_measured_against_eager(monkeypatch, eager_seconds, attention,
                                                                          reason):
    """A family no patch replaces trains with the library's default attention (sdpa) unless eager measures clearly
    faster (its backward at short lengths, on some CPUs); the plan then loads eager and says why."""
    def seconds(what, option):
        if what == "default":
            return 1.0
        if what == "library":
            return eager_seconds
        return 1.0

    _patched_measurement(monkeypatch, seconds)
    config = _config("model.name_or_path=some/llama")
    result = tune.measure(config, "fp32", LLAMA, log=lambda line: None)
    assert {key.split("/")[0] for key in result["layouts"]} == {"default", "library"}
    plan = make_plan(config, EMULATED, LLAMA, tuning=result)
    assert (plan.attention, plan.attention_patch, plan.reasons["attention"]) == (attention, False, reason)
    chosen = make_plan(_config("model.name_or_path=some/llama", "model.attn_implementation=sdpa"), EMULATED, LLAMA,
                       tuning=result)
    assert chosen.attention == "sdpa"  # a setting the user chose is never overruled by a measurement


def test_the_measurement_runs_on_a_tiny_model_and_is_cached(tiny_bloom_dir):
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(tiny_bloom_dir)
    config = _config("data.max_length=32")
    assert tune.cached(config, "fp32", model_config) is None
    result = tune.measure(config, "fp32", model_config, log=lambda line: None)
    assert set(result["layouts"]) >= {"library/0", "patch/256"}
    assert result["choice"]["micro_batch_tokens"] in (0, 256, 512, 1024)
    assert tune.cached(config, "fp32", model_config) == result
    assert tune.cached(_config("data.max_length=48"), "fp32", model_config) is None  # another shape of step
    llama = tune.measure(config, "fp32", LLAMA, log=lambda line: None)  # no patch: sdpa against eager
    assert {key.split("/")[0] for key in llama["layouts"]} == {"default", "library"}


def test_autotune_is_off_by_config_or_environment(monkeypatch):
    monkeypatch.delenv("LORAFT_AUTOTUNE", raising=False)
    assert tune.autotune_enabled(_config())
    assert not tune.autotune_enabled(_config("train.autotune=false"))
    monkeypatch.setenv("LORAFT_AUTOTUNE", "0")
    assert not tune.autotune_enabled(_config())


def test_memory_estimate_adds_up_its_parts():
    plan = make_plan(_config(), EMULATED, BLOOM)
    estimate = estimate_memory(plan, _config(), BLOOM, total_params=1_000_000, trainable_params=10_000,
                               embedding_params=19_200)
    assert estimate["peak_gib"] == pytest.approx(sum(estimate["parts_gib"].values()), abs=0.02)
    bf16 = estimate_memory(make_plan(_config(), FAST, BLOOM), _config(), BLOOM, 10**9, 10**6, 10**7)
    fp32 = estimate_memory(make_plan(_config(), EMULATED, BLOOM), _config(), BLOOM, 10**9, 10**6, 10**7)
    assert bf16["parts_gib"]["weights"] < fp32["parts_gib"]["weights"]


@pytest.mark.parametrize("preset, bf16, precision, budget", [
    ("bloom-1b4-zh-lora", "emulated", "fp32", 256), ("bloom-1b4-zh-lora", "fast", "bf16", 1024),
    ("demo", "emulated", "fp32", 256), ("demo", "fast", "bf16", 320),
])
def test_loraft_plan_prints_the_plan_offline(preset, bf16, precision, budget, capsys, monkeypatch):
    from loraft.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LORAFT_CPU_BF16", bf16)
    assert main(["plan", preset, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["plan"]
    assert report["model"].endswith("(shape shipped with loraft)")
    assert plan["precision"] == precision and bf16 in plan["reasons"]["precision"]
    assert plan["fused_loss"] and plan["speed_path"].startswith("bloom: ")
    assert plan["micro_batch_tokens"] == budget and not plan["packing"]
    assert report["memory"]["peak_gib"] > 0 and report["parameters"]["total"] > report["parameters"]["trainable"] > 0
    assert report["autotune"] == "off: the static defaults"  # the suite sets LORAFT_AUTOTUNE=0
    if preset == "bloom-1b4-zh-lora":
        assert report["parameters"]["total"] == 1_303_111_680


def test_loraft_plan_with_a_bad_config_is_one_sentence(tmp_path, capsys):
    from loraft.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nonsense: 1\n", encoding="utf-8")
    assert main(["plan", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: unknown config key train.nonsense\n"


def test_loraft_plan_with_a_missing_model_directory_is_one_sentence(tmp_path, capsys):
    from loraft.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["plan", "bloom-1b4-zh-lora", f"model.name_or_path={missing}"]) == 2
    assert capsys.readouterr().err == f"error: {missing}: model directory not found (model.name_or_path)\n"


def test_the_shipped_demo_shape_is_the_shipped_demo_base():
    from loraft.demo import PREBUILT_DIR, BaseRecipe
    from loraft.presets import shipped_shape

    shape = json.loads((shipped_shape("loraft/demo-base") / "config.json").read_text())
    base = json.loads((PREBUILT_DIR / "config.json").read_text())
    keys = ("model_type", "hidden_size", "n_layer", "n_head", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    assert {key: shape[key] for key in keys} == {key: base[key] for key in keys}
    recipe = BaseRecipe()
    assert (shape["hidden_size"], shape["n_layer"], shape["n_head"]) == (recipe.hidden_size, recipe.n_layer, recipe.n_head)


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
def test_for_trls_objectives_only_the_attention_is_measured(monkeypatch, objective):
    """TRL's trainer runs its own batch and loss: the autotune times only the family's attention against eager, over
    one batch as TRL forwards it, and the plan keeps the configured batch."""
    extra = (["grpo.rewards=[{type: number, field: answer}]", "grpo.num_generations=2",
              "grpo.max_completion_length=32"] if objective == "grpo" else [])
    config = _config("model.name_or_path=some/llama", f"train.objective={objective}",
                     "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", *extra)
    lengths = tune.trl_batch_lengths(config)
    assert lengths == ([256 // 4 + 32] * 2 if objective == "grpo" else tune.step_lengths(config)[:2] * 2)

    def seconds(what, option):
        assert option == sum(lengths)  # one padded batch
        return {"default": 1.0, "library": 0.5}[what]

    _patched_measurement(monkeypatch, seconds)
    monkeypatch.setattr(tune, "measure", lambda *args, **kwargs: pytest.fail("SFT's layouts measured"))
    monkeypatch.setenv("LORAFT_AUTOTUNE", "1")
    from loraft.plan import plan_run

    plan = plan_run(config, LLAMA, world_size=1, log=lambda line: None)
    assert plan.tuning["choice"] == {"attention": "eager"} and set(plan.tuning["layouts"]) == {
        f"default/{sum(lengths)}", f"library/{sum(lengths)}"}
    assert (plan.attention, plan.attention_patch, plan.samples_per_batch, plan.accumulation) == ("eager", False, 2, 2)
    assert "the attention over one of TRL's batches" in plan.describe()
    assert tune.cached(config, plan.precision, LLAMA) == plan.tuning
