from pathlib import Path

import pytest

from loraft.config import RunConfig, describe_fields, load_config
from loraft.presets import preset_names, preset_path, resolve_config_source
from loraft.errors import ConfigError

ROOT = Path(__file__).parents[1]


def test_the_shipped_configs_are_the_package_presets():
    # one copy: the checkout's configs/ is a link to the package data a wheel ships
    assert (ROOT / "configs").is_symlink()
    assert (ROOT / "configs").resolve() == (ROOT / "src" / "loraft" / "configs").resolve()
    assert {"bloom-1b4-zh-lora", "demo"} <= set(preset_names())
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == preset_names()


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_config_parses_and_names_its_command(name):
    path = preset_path(name)
    config = load_config(path)
    assert isinstance(config, RunConfig)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# loraft "), first_line
    command = first_line.split()[1:3]
    if command[0] == "train":  # the command in the header runs this very file, from any directory
        assert resolve_config_source(command[1]) == path


def test_config_source_is_a_file_first_then_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_source("demo") == preset_path("demo")
    (tmp_path / "demo").write_text("output_dir: mine\n", encoding="utf-8")
    assert resolve_config_source("demo") == Path("demo")  # a file by that name wins
    assert resolve_config_source("missing.yaml") == Path("missing.yaml")  # load_config says it is not found
    with pytest.raises(ConfigError) as error:
        resolve_config_source("bloom")
    assert str(error.value) == f"bloom: no config file or preset by that name (presets: {', '.join(preset_names())})"


def test_reference_config_is_the_recipe_value_for_value():
    config = load_config(preset_path("bloom-1b4-zh-lora"))
    assert config.model.name_or_path == "Langboat/bloom-1b4-zh"
    assert config.data.template == "human_assistant"
    assert config.data.max_length == 256
    assert config.adapter.method == "lora"
    assert config.adapter.target_modules == r".*\.1.*query_key_value"
    assert config.adapter.modules_to_save == ["word_embeddings"]
    assert (config.adapter.r, config.adapter.alpha, config.adapter.dropout) == (8, 8, 0.0)
    assert config.train.num_train_epochs == 1
    assert config.train.per_device_train_batch_size == 1
    assert config.train.gradient_accumulation_steps == 8
    assert config.train.logging_steps == 10
    assert config.train.learning_rate == 5e-5
    # the recipe's values; how they are computed is loraft's fast default (fp32 is the parity mode)
    assert config.train.precision == "auto"
    assert config.train.sampling == "length_grouped"
    assert config.train.retention == "off"  # the recipe has no guard: token for token


def test_dot_overrides_are_typed(tmp_path):
    config = load_config(None, ["train.max_steps=3", "output_dir=out", "adapter.target_modules=[a, b]",
                                "adapter.modules_to_save=null"])
    assert config.train.max_steps == 3
    assert config.output_dir == "out"
    assert config.adapter.target_modules == ["a", "b"]
    assert config.adapter.modules_to_save is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stepz=3"], "defaults with overrides: unknown config key train.max_stepz"),
        (["adapter.r=0"], "defaults with overrides: adapter.r must be > 0 (got 0)"),
        (["data.max_length=1"], "defaults with overrides: data.max_length must be >= 2 (got 1)"),
        (["adapter.method=lorra"], "defaults with overrides: adapter.method input should be 'lora', 'prompt_tuning', "
                                   "'prefix_tuning' or 'ia3'"),
        (["train.max_steps"], "override 'train.max_steps' must look like key=value (e.g. train.max_steps=3)"),
        (["train.max_steps.x=1"], "override train.max_steps.x: max_steps is not a section"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    if overrides == ["train.max_steps.x=1"]:
        with pytest.raises(ConfigError) as error:
            load_config(None, ["train.max_steps=1", *overrides])
    else:
        with pytest.raises(ConfigError) as error:
            load_config(None, overrides)
    assert str(error.value) == message


def test_bad_files(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  name: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown\.yaml: unknown config key model\.name$"):
        load_config(unknown)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line 2 is not valid YAML$"):
        load_config(broken)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_configs_read_no_dates_and_no_number_too_long_to_read(tmp_path):
    """A date-like value stays text (so where a number belongs it is the schema's sentence, not a ValueError from
    datetime), and a number past Python's 4300-digit limit is a YAML error at its line."""
    dated = tmp_path / "dated.yaml"
    dated.write_text("train:\n  seed: 2026-02-31\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(dated)
    assert str(error.value) == (f"{dated}: train.seed input should be a valid integer, unable to parse string as an "
                                "integer")
    assert load_config(None, ["data.system_prompt=2026-02-03"]).data.system_prompt == "2026-02-03"
    long = tmp_path / "long.yaml"
    long.write_text("train:\n  max_steps: " + "9" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(long)
    assert str(error.value) == f"{long}: line 2 is not valid YAML (a number too long to read)"
    assert load_config(None, ["train.max_steps=0x10"]).train.max_steps == 16  # other YAML integers as before


def test_every_field_has_a_description():
    rows = describe_fields()
    assert len(rows) > 40
    assert all(description for _, _, _, description in rows)
