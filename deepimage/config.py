"""The workflow configuration: its schema, normalisation, and checks the schema cannot express.

The Snakefile validates config.yaml (plus any --configfile) against schemas/config.schema.yaml
with snakemake.utils.validate, which names the offending key and fills defaults; `check` then
stops on combinations that are valid one by one but cannot run together.
"""
from __future__ import annotations

from pathlib import Path

SCHEMA_PATH = str(Path(__file__).parent / "schemas" / "config.schema.yaml")


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the key and the fix."""


def normalize(config: dict) -> dict:
    """YAML reads `64:` as an int key; the schema (JSON) keys are strings. In place."""
    per_res = config.get("model", {}).get("per_resolution")
    if isinstance(per_res, dict):
        config["model"]["per_resolution"] = {str(k): v for k, v in per_res.items()}
    return config


def validate(config: dict) -> None:
    """Schema errors as one line per bad key: `train.np: 0 is less than the minimum of 1`."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(SCHEMA_PATH).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.path) or '<top level>'}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration (see deepimage/schemas/config.schema.yaml):\n"
                          + "\n".join(lines))


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
    sc = config["scaling"]
    if sc["steps"] < 2:
        raise ConfigError(f"scaling.steps must be >= 2 timed steps, got {sc['steps']}")
