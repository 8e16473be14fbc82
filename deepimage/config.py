"""The workflow configuration: one frozen, typed object per section, built once from the schema.

    from deepimage.config import Config
    cfg = Config.from_dict({"train": {"np": 4}})   # every other key: the schema's default
    cfg.train.bucket_mib, cfg.shard.format, cfg.dataset.synthetic.classes

deepimage/schemas/config.schema.yaml is the one source of every key, its type and its default;
config.yaml states the same values for users (tests/test_config.py checks that they agree) and
no code restates one. The section classes are frozen, slotted dataclasses generated from the
schema when this module is imported, so a key added to the schema is an attribute here with no
change to this file: schema `integer` -> int, `number` -> float, `boolean` -> bool, `string`
-> str, `array` -> tuple, an object with `properties` -> a nested section, any other object
(model.per_resolution, train.per_resolution) -> dict.

The Snakefile validates config.yaml (plus any --configfile) with snakemake.utils.validate and
`check`s cross-key combinations; each rule passes the sections its stage reads as one JSON
argument (`--config-json`), which the stage turns back into a Config with `from_args`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = str(Path(__file__).parent / "schemas" / "config.schema.yaml")
_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "array": tuple}


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the key and the fix."""


@lru_cache(maxsize=1)
def schema() -> dict:
    """The parsed config schema (read once per process)."""
    return yaml.safe_load(Path(SCHEMA_PATH).read_text())


def normalize(config: dict) -> dict:
    """YAML reads `64:` as an int key; the schema (JSON) keys are strings. In place."""
    for section in ("model", "train"):
        per_res = config.get(section, {}).get("per_resolution")
        if isinstance(per_res, dict):
            config[section]["per_resolution"] = {str(k): v for k, v in per_res.items()}
    return config


def validate(config: dict) -> None:
    """Schema errors as one line per bad key: `train.np: 0 is less than the minimum of 1`."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.path) or '<top level>'}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration (see deepimage/schemas/config.schema.yaml):\n"
                          + "\n".join(lines))


def fill_defaults(config: dict, node: dict | None = None) -> dict:
    """Every key the config leaves out gets the schema's default, recursively. In place."""
    node = schema() if node is None else node
    for key, prop in node.get("properties", {}).items():
        if key not in config and "default" in prop:
            config[key] = copy.deepcopy(prop["default"])
        if isinstance(config.get(key), dict) and "properties" in prop:
            fill_defaults(config[key], prop)
    return config


def check(config: dict) -> None:
    """Cross-key checks, after schema validation has filled the defaults."""
    src = config["dataset"]["source"]
    if src != "synthetic":
        root = Path(src)
        if not root.is_dir():
            raise ConfigError(f"dataset.source: {src!r} is neither 'synthetic' nor an existing folder")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ConfigError(f"dataset.source: {src!r} has no '{split}/' folder "
                                  "(expected ImageNet layout <root>/{train,val}/<class>/*)")
    train = config["train"]
    if train["batch_size"] < train["np"]:
        raise ConfigError(f"train.batch_size ({train['batch_size']}) must be >= train.np "
                          f"({train['np']}): the global mini-batch is split across the workers")
    check_recipes(config)
    sc = config["scaling"]
    if sc["steps"] < 2:
        raise ConfigError(f"scaling.steps must be >= 2 timed steps, got {sc['steps']}")
    check_study(config)


def check_study(config: dict) -> None:
    """The performance model is fitted to the scaling study's all-reduce sweep, which needs the
    scaling study and a worker count above 1."""
    study = config["study"]
    if not (study["enabled"] and study["perfmodel"]):
        return
    if not study["scaling"]:
        raise ConfigError("study.perfmodel: the performance model needs the scaling study; "
                          "set study.scaling: true, or study.perfmodel: false")
    if max(config["scaling"]["np"]) < 2:
        raise ConfigError(f"study.perfmodel: scaling.np {config['scaling']['np']} has no worker count above 1, "
                          "so there is no all-reduce to fit; add one (e.g. [1, 2]) or set study.perfmodel: false")


def check_recipes(config: dict) -> None:
    """train.per_resolution: a warm start (of a resolution the run trains) from a lower
    resolution of the run whose network is the same (every weight must load)."""
    resolutions = [int(r) for r in config["resolutions"]]
    model = config["model"]
    for res, recipe in config["train"]["per_resolution"].items():
        key = f"train.per_resolution.{res}"
        src = recipe.get("init_from")
        if src is None or int(res) not in resolutions:  # like model.per_resolution: other runs' entries
            continue
        if src not in resolutions or src >= int(res):
            raise ConfigError(f"{key}.init_from: {src} must be a lower resolution of resolutions {resolutions} "
                              f"(or null: {res} px from scratch)")
        nets = [{k: model["per_resolution"].get(str(r), {}).get(k, model[k]) for k in ("conv", "fc_hidden")}
                for r in (int(res), src)]
        if nets[0] != nets[1]:
            raise ConfigError(f"{key}.init_from: {src} px builds {nets[1]} but {res} px builds {nets[0]}: "
                              f"a warm start loads every weight, so drop model.per_resolution.{res} "
                              "(or give both the same)")


# ---------------------------------------------------------------------------------------------
# Section objects, generated from the schema


class Section:
    """Base of every generated section: conversion back to plain JSON-ready dicts."""

    __slots__ = ()

    def to_dict(self) -> dict:
        """Plain dicts and lists (what config.yaml would say), e.g. for json_arg or MLflow."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _freeze(value: Any) -> Any:
    """Lists (also nested, as model.conv) -> tuples, so a section cannot change after building."""
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _build(cls: type, node: dict, values: dict) -> Section:
    """An instance of a generated class from a validated, default-filled dict."""
    kwargs = {}
    for key, prop in node.get("properties", {}).items():
        value = values.get(key)
        if isinstance(value, dict) and "properties" in prop:
            value = _build(cls.__sections__[key], prop, value)
        elif prop.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = _freeze(value)
    return cls(**kwargs)


def _class_name(path: tuple[str, ...]) -> str:
    return "".join(p.title().replace("_", "") for p in path) + "Config" if path else "Config"


def _generate(path: tuple[str, ...], node: dict) -> type:
    """A frozen, slotted dataclass with one field per schema property (nested sections too)."""
    fields, sections = [], {}
    for key, prop in node.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop:
            sections[key] = _generate((*path, key), prop)
            kind: Any = sections[key]
        else:
            kind = dict if prop.get("type") == "object" else _TYPES.get(prop.get("type"), Any)
        fields.append((key, kind if "default" in prop else kind | None))
    cls = dataclasses.make_dataclass(_class_name(path), fields, bases=(Section,), frozen=True,
                                     slots=True, namespace={"__module__": __name__})
    cls.__sections__ = sections  # not a slot: a class attribute
    cls.__doc__ = node.get("description", f"The `{'.'.join(path)}` section of config.yaml.").strip()
    globals()[cls.__name__] = cls  # importable by name, so sections pickle (spawned workers)
    return cls


def _from_dict(cls, config: dict | None = None) -> "Config":
    """The whole configuration from a (partial) dict: validated, the schema's defaults filled.

    Raises ConfigError naming the bad key and the value. Tests, benchmarks and notebooks call
    it with the keys they care about: `Config.from_dict({"train": {"lazy_update": False}})`."""
    values = normalize(copy.deepcopy(dict(config or {})))
    validate(values)
    return _build(cls, schema(), fill_defaults(values))


def _from_json(cls, text: str) -> "Config":
    """From a `--config-json` argument (the sections a rule passes; the rest: defaults).
    Validated once per process: the same text again returns the same (frozen) object."""
    return _parsed(text)


@lru_cache(maxsize=8)
def _parsed(text: str) -> "Config":
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config-json is not JSON ({e}): pass the rule's json_arg(...)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config-json must be a JSON object of config sections, got {text[:60]!r}")
    return Config.from_dict(values)


Config = _generate((), schema())
Config.from_dict = classmethod(_from_dict)
Config.from_json = classmethod(_from_json)


@lru_cache(maxsize=1)
def defaults() -> "Config":
    """The schema's defaults as a Config (for code that needs one default, never restating it).
    Nothing to validate: tests/test_config.py checks that the schema's defaults pass it."""
    return _build(Config, schema(), fill_defaults({}))


def default(key: str) -> Any:
    """The schema's default of one dotted key as plain JSON values (lists, not tuples):
    `default("model.fc_hidden")` -> [256, 256]."""
    value: Any = defaults()
    for part in key.split("."):
        value = getattr(value, part)
    return value.to_dict() if isinstance(value, Section) else json.loads(json.dumps(value))


def default_field(key: str) -> Any:
    """A dataclass field whose default is the schema's `key` (a fresh copy per instance):
    `dropout: float = default_field("model.dropout")`."""
    return dataclasses.field(default_factory=lambda: default(key))


def add_argument(parser: argparse.ArgumentParser, sections: str) -> None:
    """The `--config-json` option of a stage CLI; `sections` names what the rule passes."""
    parser.add_argument("--config-json", default="{}",
                        help=f"the config sections {sections} as one JSON object (what the rule "
                             "passes); any key left out takes the schema's default")


def from_args(args: argparse.Namespace) -> "Config":
    """The Config of a stage CLI's `--config-json`."""
    return Config.from_json(args.config_json)
