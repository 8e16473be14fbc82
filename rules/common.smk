# Config validation, MLflow parent run, and the helpers the rule files share.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from deepimage import config as di_config
from deepimage import registry, store_guard, summary, tracking
from deepimage.redact import MASK, export_uri

# Stops before any job with a message naming the bad key or value; then fills the defaults.
try:
    di_config.normalize(config)
    di_config.validate(config)
    validate(config, di_config.SCHEMA_PATH)
    di_config.check(config)
    store_guard.check_tracking_store(config)
except di_config.ConfigError as e:
    raise WorkflowError(str(e))

# The jobs (and MLflow clients here) connect to the full tracking URI, which they find in their
# environment: a command line is there for every user of the host to read (`ps`). What the
# workflow logs, records and reports (the config too) names it without its credentials.
config["mlflow"]["tracking_uri"] = export_uri(config["mlflow"]["tracking_uri"])
if MASK in config["mlflow"]["tracking_uri"]:
    print(f"deepimage: mlflow.tracking_uri {config['mlflow']['tracking_uri']} carries credentials, and "
          f"`snakemake --report` copies config files into the report as they are: keep them in "
          f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead", file=sys.stderr)

RESOLUTIONS = [int(r) for r in config["resolutions"]]
# Registered model names: <prefix>-<res>px and <prefix>-ensemble, the prefix the experiment's
# name unless mlflow.registry_prefix sets one.
try:
    REGISTRY_PREFIX = registry.check_prefix(
        config["mlflow"].get("registry_prefix") or config["mlflow"]["experiment"],
        "mlflow.registry_prefix" if config["mlflow"].get("registry_prefix") else "mlflow.experiment")
except ValueError as e:
    raise WorkflowError(str(e))
PARENT_FILE = tracking.DEFAULT_PARENT_FILE
# Every rule's `python` (and horovodrun) is the interpreter that runs Snakemake, so
# `.venv/bin/snakemake` works without activating the environment.
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")


def mlflow_args(run_record):
    """Tracking options of every stage CLI (the URI is MLFLOW_TRACKING_URI of the job's
    environment); the run record is one of the rule's outputs."""
    return (f"--experiment {shlex.quote(config['mlflow']['experiment'])} "
            f"--parent-file {PARENT_FILE} --run-record {run_record}")


def json_arg(obj):
    """The config sections a stage reads, as one shell-quoted JSON argument for its
    --config-json (deepimage.config.Config.from_json); a change of a value reruns the rule."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def worker_config():
    """The config sections a training worker reads (it resolves per_resolution itself)."""
    return {"seed": config["seed"], "train": config["train"], "model": config["model"]}


def init_model(wildcards):
    """The lower-resolution model a warm-started resolution starts from
    (train.per_resolution.<res>.init_from), so its job runs after that model's; else nothing."""
    src = config["train"]["per_resolution"].get(str(wildcards.res), {}).get("init_from")
    return [f"results/train/{src}/model.pt"] if src else []


def init_option(wildcards, input):
    """--init-from <model.pt> for a warm-started resolution, else nothing."""
    return f"--init-from {input.init[0]}" if input.init else ""


NO_AUGMENT = {"color_cast": False, "vignetting": False, "lens_distortion": False,
              "rotation_deg": 0, "flip": False, "random_crop": False}


def study(stage):
    """Whether a study stage (ablation, scaling, perfmodel) runs: study.enabled and its own key."""
    return config["study"]["enabled"] and config["study"][stage]


def ablation_models():
    """The robustness ablation's checkpoint (lowest resolution, no augmentation) when
    study.ablation is on, else nothing."""
    if not study("ablation"):
        return []
    return [f"results/train/{min(RESOLUTIONS)}-noaug/model.pt"]


def scaling_outputs():
    """The scaling study's and the performance model's outputs that the report reads, as far as
    study.scaling and study.perfmodel turn them on."""
    out = {}
    if study("scaling"):
        out["scaling"] = "results/scaling/scaling.json"
    if study("perfmodel"):
        out["perfmodel"] = "results/perfmodel/perfmodel.md"
    return out


def rule_resources(rule):
    """A rule's cluster resources: resources.default, overridden key by key by resources.<rule>."""
    return {**config["resources"]["default"], **config["resources"][rule]}


def final_targets():
    """What `snakemake` with no target builds: the user's job, and the study stages turned on."""
    targets = ["results/report.md", "results/ensemble/metrics.json", "results/robustness/robustness.json"]
    if study("perfmodel"):
        targets.append("results/scaling/perfmodel.json")
    return targets


def worker_config_without_augmentation():
    """The training workers' config with train.augment all off (the robustness ablation)."""
    cfg = worker_config()
    return {**cfg, "train": {**cfg["train"], "augment": NO_AUGMENT}}


onstart:
    # Stops before any job, naming the URI, when the tracking server does not answer.
    try:
        tracking.start_workflow(config, PARENT_FILE)
    except tracking.TrackingUnreachable as e:
        raise WorkflowError(str(e))


def registered_name(wildcards):
    """The name a training job registers its model under: <prefix>-<res>px."""
    return registry.registered_name(REGISTRY_PREFIX, wildcards.res)


def registered_names():
    """The model names training and the ensemble register, the ensemble last."""
    return ([registry.registered_name(REGISTRY_PREFIX, res) for res in RESOLUTIONS]
            + [registry.ensemble_name(REGISTRY_PREFIX)])


onsuccess:
    tracking.end_workflow("FINISHED", PARENT_FILE)
    # What the run produced and where to look next, after Snakemake's job log.
    print("\n".join(summary.summary(Path("results"), registered_names())))


onerror:
    tracking.end_workflow("FAILED", PARENT_FILE)
