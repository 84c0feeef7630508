"""The whole run's settings: one typed schema (its sections are in loraft.config_schema and imported from here),
loaded from YAML with `key=value` dot-overrides, validated with the offending key named, saved and described.

Every field carries a one-line description; `loraft config` prints them as the config reference. The shipped
presets (`loraft train NAME`) are found in loraft.presets.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from loraft.config_schema import (DPO_LOSS_TYPES, KTO_LOSS_TYPES, OBJECTIVES, AdapterConfig, DataConfig,
                                  GenerationConfig, GrpoConfig, ModelConfig, PreferenceConfig, RewardConfig, RunConfig,
                                  TrainConfig)
from loraft.errors import ConfigError
from loraft.files import write_text_atomically

__all__ = [
    # the schema, from loraft.config_schema
    "AdapterConfig", "DataConfig", "DPO_LOSS_TYPES", "GenerationConfig", "GrpoConfig", "KTO_LOSS_TYPES", "ModelConfig",
    "OBJECTIVES", "PreferenceConfig", "RewardConfig", "RunConfig", "TrainConfig",
    # reading, writing and describing it
    "ConfigLoader", "REQUIRED", "config_from_sections", "describe_fields", "load_config", "parse_yaml", "save_config",
]


class ConfigLoader(yaml.SafeLoader):
    """YAML as a config reads it: no key is a date, so `2026-02-31` stays text (safe_load builds a date, or raises a
    bare ValueError for an impossible one); a number past Python's 4300-digit conversion limit is a YAML error at its
    line, not a ValueError from int()."""

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(None, None, "a number too long to read", node.start_mark) from None


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)
# resolvers are kept per first character: drop the timestamp one, so a date-like value is a string
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def parse_yaml(text: str) -> Any:
    """A YAML document read as loraft reads configs (ConfigLoader). Raises yaml.YAMLError."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


def _parse_value(text: str) -> Any:
    """Parse a command-line override value as YAML (numbers, booleans, lists, null), else keep the string."""
    try:
        return parse_yaml(text)
    except (yaml.YAMLError, RecursionError):
        return text


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted_key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _describe_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown config key {key}"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not key:  # a check across sections (RunConfig's own validator) names its keys itself
        return f"{source}: {message}"
    return f"{source}: {key} {message[0].lower() + message[1:]}" if message else f"{source}: invalid {key}"


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a run config from YAML (or the defaults) and apply `key=value` dot-overrides.

    Args:
        path: YAML file; None starts from the defaults (the reference recipe).
        overrides: strings like `train.max_steps=3`; values are parsed as YAML scalars.
    Raises:
        ConfigError: naming the file and the key that is unknown or invalid.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: config file is not UTF-8 text") from None
        except OSError as exc:  # a folder, no permission
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        try:
            loaded = parse_yaml(text)
        except RecursionError:  # "[[[[...": PyYAML's parser recurses once per level
            raise ConfigError(f"{path}: is not valid YAML (it nests too deeply)") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            # a value YAML reads but cannot build (ConfigLoader's number too long) says which
            problem = f" ({exc.problem})" if isinstance(exc, yaml.constructor.ConstructorError) and exc.problem else ""
            raise ConfigError(f"{path}:{where} is not valid YAML{problem}") from None
        if loaded is None:
            # an empty file is a mistake (or a cut-off write), not a request for the defaults
            raise ConfigError(f"{path}: config file is empty; give at least one key, or a preset such as "
                              "bloom-1b4-zh-lora")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        tree = loaded
    for override in overrides or []:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value (e.g. train.max_steps=3)")
        key, _, raw = override.partition("=")
        _set_dotted(tree, key.strip(), _parse_value(raw))
    if overrides:
        source = f"{source} with overrides"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, source)) from None


def config_from_sections(source: str, **sections: dict) -> RunConfig:
    """A RunConfig from section values (the command line's data flags: `data={...}, preference={...}`).

    Raises:
        ConfigError: `SOURCE: KEY ...` naming the first invalid key, as load_config does.
    """
    try:
        return RunConfig.model_validate(sections)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, source)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's `config.yaml`): to a temporary file, then renamed,
    so a crash never leaves a cut-off config that would load as something else."""
    write_text_atomically(path, yaml.safe_dump(config.model_dump(), sort_keys=False, allow_unicode=True))


def _type_name(annotation: Any) -> str:
    """Readable type for docs: `fp32/bf16`, `int?`, `str or list[str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "/".join(str(a) for a in args)
    if origin is Union or origin is UnionType:
        options = [a for a in args if a is not type(None)]
        # typing caches equal unions, so Union[str, list[str]] may come back as another module's Union[list[str], str]:
        # classes, then literals, then lists, each by name, whatever order the annotation arrived in
        rank = {Literal: 1, list: 2}
        options.sort(key=lambda a: (rank.get(get_origin(a), 0), _type_name(a)))
        name = " or ".join(_type_name(a) for a in options)
        return name + "?" if len(options) < len(args) else name
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


REQUIRED = "(required)"  # describe_fields' default for a key without one (a reward's type)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flatten the schema into (key, type, default, description) rows for docs and `loraft config`; a list of
    sections (grpo.rewards) is one row, then its entries' keys as `name[].key`."""
    rows: list[tuple[str, str, Any, str]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        item = get_args(annotation)[0] if get_origin(annotation) is list and get_args(annotation) else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # a list of sections: the list, then an entry's keys
            default = field.default_factory() if field.default_factory is not None else field.default
            rows.append((f"{prefix}{name}", "list", default, field.description or ""))
            rows.extend(describe_fields(item, f"{prefix}{name}[]."))
            continue
        type_name = _type_name(annotation)
        default = field.default_factory() if field.default_factory is not None else field.default
        if field.is_required():
            default = REQUIRED
        rows.append((f"{prefix}{name}", type_name, default, field.description or ""))
    return rows
