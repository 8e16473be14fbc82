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
