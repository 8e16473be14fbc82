"""The config is validated before any job: unknown keys and bad values are named.

    pytest tests/test_config.py
"""
import re

import pytest

from workflow import snakemake

FIRST_JOB = "results/dataset/source.json"   # make_dataset's output: a real run's first job
TINY_DATASET = {"dataset": {"synthetic": {"classes": 2, "train_per_class": 2, "val_per_class": 1,
                                          "image_size": 32}}}


def _names(line: str, key: str, value: str) -> bool:
    """Whether `line` names `key` (or a path under it, "resolutions.1") and `value`, each as a
    whole word: "np" is not found inside "input", nor "0" inside "10" or "0.5"."""
    return (re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", line) is not None
            and re.search(rf"(?<![\w.]){re.escape(value)}(?!\w|\.\w)", line) is not None)


@pytest.mark.parametrize("override, key, value", [
    ({"trian": {"np": 2}}, "trian", "trian"),                        # unknown top-level key
    ({"train": {"np": 0}}, "train.np", "0"),                         # out of range
    ({"train": {"launcher": "mpirun"}}, "train.launcher", "mpirun"), # not in the enum
    ({"shard": {"format": "png"}}, "shard.format", "png"),
    ({"resolutions": [32, "big"]}, "resolutions", "big"),
    ({"model": {"fc_hidden": [64]}}, "model.fc_hidden", "[64]"),
    ({"dataset": {"source": "/no/such/folder"}}, "dataset.source", "/no/such/folder"),
    ({"train": {"batch_size": 1, "np": 2}}, "train.batch_size", "1"),
])
def test_bad_config_stops_before_any_job_and_names_the_key(tmp_path, override, key, value):
    """A real run (not -n, which never runs a job anyway) asked for its first job stops with one
    line naming the key and the bad value, and leaves no results/ or logs/ behind."""
    r = snakemake(tmp_path, "--cores", "1", FIRST_JOB, config=override, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert [line for line in out.splitlines() if _names(line, key, value)], out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists(), \
        "a job ran on a bad config"


def test_the_same_run_on_a_good_config_does_run_the_first_job(tmp_path):
    """The control for the test above: the identical command on a valid config writes results/,
    so 'no results/ folder' there means the config stopped the job."""
    r = snakemake(tmp_path, "--cores", "1", FIRST_JOB, config=TINY_DATASET, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / FIRST_JOB).is_file()


def test_lint_is_clean(tmp_path):
    r = snakemake(tmp_path, "--lint", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr


def test_default_config_dry_run_plans_every_stage(tmp_path):
    r = snakemake(tmp_path, "-n", "--cores", "2", timeout=120)
    assert r.returncode == 0, r.stderr
    for rule in ("make_dataset", "shard_images", "train_model", "evaluate_model",
                 "ensemble_models", "measure_scaling", "write_report"):
        assert rule in r.stdout
    assert not (tmp_path / "results").exists(), "a dry run wrote results/"


def _differences(schema_side, yaml_side, prefix=""):
    """Keys missing on one side or values that differ, as 'key: schema X, config.yaml Y'."""
    out = []
    for key in sorted(set(schema_side) | set(yaml_side), key=str):
        a, b = schema_side.get(key, "<absent>"), yaml_side.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b or type(a) is not type(b):
            out.append(f"{prefix}{key}: schema {a!r}, config.yaml {b!r}")
    return out


def test_config_yaml_states_every_schema_default_and_nothing_else():
    """Every key of the schema has a default, config.yaml states each one with the same value
    (and type), and config.yaml has no key the schema lacks."""
    import yaml

    from deepimage.config import fill_defaults, normalize
    from workflow import ROOT

    stated = normalize(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert _differences(fill_defaults({}), stated) == []


def test_config_objects_are_frozen_typed_and_filled_from_the_schema():
    """Config.from_dict fills what a partial dict leaves out with the schema's defaults (equal
    to config.yaml), types each value, refuses changes, and names a bad key."""
    import dataclasses

    import yaml

    from deepimage.config import Config, ConfigError, normalize
    from workflow import ROOT

    cfg = Config.from_dict({"train": {"np": 4}})
    full = Config.from_dict(normalize(yaml.safe_load((ROOT / "config.yaml").read_text())))
    assert cfg.train.np == 4 and dataclasses.replace(cfg.train, np=full.train.np) == full.train
    assert cfg.shard == full.shard and cfg.model == full.model
    assert isinstance(cfg.train.bucket_mib, float) and isinstance(cfg.model.conv, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.np = 2
    with pytest.raises(ConfigError, match=r"train\.compute_nice: 20 is greater than the maximum"):
        Config.from_dict({"train": {"compute_nice": 20}})
    with pytest.raises(ConfigError, match="shard_mb"):
        Config.from_json('{"shard": {"shard_mb": 3}}')


# The objects built from a config section, by import path, with the section their fields come
# from; a field named elsewhere in the schema is listed in OTHER_KEYS.
CONFIG_BUILT = {"deepimage.model.ModelSpec": "model", "deepimage.data.augment.AugmentConfig": "train.augment",
                "deepimage.shard.ShardParams": "shard", "deepimage.synthetic.SyntheticSpec": "dataset.synthetic"}
OTHER_KEYS = {"strict": "dataset.strict", "seed": "seed"}


def test_every_default_of_a_config_built_object_is_the_schema_default():
    """A dataclass built from a config section may leave a field out only where its default is
    the schema's: ModelSpec(num_classes=10) is the configured default network, and every
    defaulted field is a schema key."""
    import dataclasses
    import importlib
    import json

    from deepimage import config

    for path, section in CONFIG_BUILT.items():
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        keys = config.default(section)
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue
            key = f"{section}.{f.name}" if f.name in keys else OTHER_KEYS.get(f.name)
            assert key is not None, f"{path}.{f.name} has a default but no schema key"
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert json.loads(json.dumps(value)) == config.default(key), \
                f"{path}.{f.name} defaults to {value!r}, the schema's {key} to {config.default(key)!r}"


def test_comm_timeout_without_the_launcher_setting_is_the_schema_default(monkeypatch):
    from deepimage import config
    from deepimage.parallel.transport.base import COMM_TIMEOUT_ENV, comm_timeout_s

    monkeypatch.delenv(COMM_TIMEOUT_ENV, raising=False)
    assert comm_timeout_s() == config.defaults().train.comm_timeout_s
    monkeypatch.setenv(COMM_TIMEOUT_ENV, "7.5")
    assert comm_timeout_s() == 7.5


def test_a_stage_validates_its_config_once_per_process(monkeypatch):
    """from_args is called where a stage needs its config (twice in a training worker): the
    schema check runs once per process for the same --config-json, and the schema's defaults
    need none."""
    import argparse

    from deepimage import config

    calls = []
    real = config.validate
    monkeypatch.setattr(config, "validate", lambda values: (calls.append(values), real(values)))
    config.defaults.cache_clear()
    assert config.defaults().model.dropout == config.default("model.dropout")
    args = argparse.Namespace(config_json='{"train": {"np": 3, "lr": 0.05}}')
    first = config.from_args(args)
    assert config.from_args(args) is first and first.train.np == 3
    assert len(calls) == 1
