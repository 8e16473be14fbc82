"""The config is validated before any job: unknown keys and bad values are named."""
import pytest

from workflow import snakemake


@pytest.mark.parametrize("override, named", [
    ({"trian": {"np": 2}}, "trian"),                        # unknown top-level key
    ({"train": {"np": 0}}, "np"),                           # out of range
    ({"train": {"launcher": "mpirun"}}, "mpirun"),          # not in the enum
    ({"shard": {"format": "png"}}, "png"),
    ({"resolutions": [32, "big"]}, "big"),
    ({"model": {"fc_hidden": [64]}}, "fc_hidden"),
    ({"dataset": {"source": "/no/such/folder"}}, "/no/such/folder"),
    ({"train": {"batch_size": 1, "np": 2}}, "train.batch_size"),
])
def test_bad_config_stops_before_any_job_and_names_the_key(tmp_path, override, named):
    r = snakemake(tmp_path, "-n", "--cores", "1", config=override, timeout=120)
    assert r.returncode != 0
    assert named in r.stdout + r.stderr
    assert not (tmp_path / "results").exists(), "no job may run on a bad config"


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
