"""MLflow logging for every stage: one parent run per `snakemake` invocation, each job a child.

    python -m deepimage.tracking start --config-json results/config.json   # Snakefile onstart
    python -m deepimage.tracking end --status FINISHED                      # onsuccess / onerror
    with tracking.stage_run(args, "evaluate", params) as run: ...          # in a stage

`store` holds where the store is by default, the experiment and whether a server answers;
`runs` a job's run (`stage_run`, `StageRun`); `pending` what a job keeps while its tracking
server does not answer; `workflow` the parent run's life. The client itself, and the retry
around every call, is deepimage.mlflow_client (the model registry, deepimage.registry, uses it
too). Several jobs may log to one SQLite store at once: every write goes through
deepimage.mlflow_client.retry, which backs off while SQLite reports the database locked, and
metrics are sent in batches so a job holds the write lock briefly and rarely.

Outages of a tracking server (http URIs): `start_workflow` stops the workflow within seconds,
naming the URI, when the server does not answer; it also marks a parent run that a killed
Snakemake left RUNNING as KILLED, and sends what earlier jobs could not (below). A job whose
server stops answering keeps training: its metrics, params, tags, artifacts, its model upload and
its final status go, in order, to `mlflow_pending.jsonl` in its results folder (`Pending`), and
are sent when the server answers again, at the end of the job, or by the next invocation's onstart:
only as the calls the workflow makes, naming only files in its results folder; a record that is
not, or that the server refuses, is set aside in rejected/ beside the file.
"""
from deepimage.tracking.pending import PENDING_NAME, Pending, pending_for
from deepimage.tracking.runs import (
    JOB_TAG,
    REPLAY,
    SYSTEM_METRICS_STAGES,
    NullRun,
    StageRun,
    add_args,
    read_parent,
    run_exists,
    stage_run,
)
from deepimage.tracking.store import (
    DEFAULT_EXPERIMENT,
    DEFAULT_PARENT_FILE,
    DEFAULT_URI,
    EXPERIMENT_TAGS,
    TrackingUnreachable,
    artifact_root,
    check_reachable,
    experiment_id,
    flatten,
    is_remote,
    unreachable,
)
from deepimage.tracking.workflow import end_workflow, main, mark_killed_parent, send_pending, start_workflow

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_PARENT_FILE", "DEFAULT_URI", "EXPERIMENT_TAGS", "JOB_TAG", "PENDING_NAME",
           "REPLAY", "SYSTEM_METRICS_STAGES", "NullRun", "Pending", "StageRun", "TrackingUnreachable",
           "add_args", "artifact_root", "check_reachable", "end_workflow", "experiment_id",
           "flatten", "is_remote", "main", "mark_killed_parent", "pending_for", "read_parent", "run_exists",
           "send_pending", "stage_run", "start_workflow", "unreachable"]
