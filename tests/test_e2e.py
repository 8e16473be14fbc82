"""The whole workflow on a tiny config, real Horovod workers, read back through MlflowClient.

One session-wide run (tests/conftest.py's tiny_workflow, about two minutes on 2 cores) serves
every assertion below. Tests here and in other modules rerun rules in its folder, so each test
finds the parent run it is about (the fixture's, or its own invocation's) instead of counting.

    pytest tests/test_e2e.py
"""
import json
import time

import pytest

from deepimage import tracking
from workflow import log_tail, snakemake

STAGES = {"make_dataset": "dataset", "shard": "shard", "train": "train", "evaluate": "evaluate",
          "ensemble": "ensemble", "scaling": "scaling", "report": "report"}


@pytest.fixture(scope="module")
def run(tiny_workflow):
    t = tiny_workflow
    return t.workdir, t.config, t.client, t.experiment_id


def _runs(client, exp, **tags):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp], filter_string=flt, max_results=1000)


def _parents(client, exp):
    """Every workflow (parent) run of the experiment, oldest first."""
    return sorted(_runs(client, exp, **{"deepimage.stage": "workflow"}), key=lambda r: r.info.start_time)


def _fixture_parent(client, exp):
    """The parent run of tiny_workflow's own invocation: the first in its fresh experiment."""
    return _parents(client, exp)[0]


def _fixture_children(client, exp, **tags):
    """The job runs of tiny_workflow's invocation (reruns by later tests have other parents)."""
    return _runs(client, exp, **{"mlflow.parentRunId": _fixture_parent(client, exp).info.run_id}, **tags)


def test_outputs_exist_and_metrics_have_the_documented_shape(run):
    workdir, cfg, _, _ = run
    m = json.loads((workdir / "results/ensemble/metrics.json").read_text())
    assert set(m["models"]) == {"16", "32"}
    for errs in [*m["models"].values(), m["ensemble"]]:
        assert set(errs) >= {"top1_error", "top5_error"}
        assert 0.0 <= errs["top5_error"] <= errs["top1_error"] <= 1.0
    report = (workdir / "results/report.md").read_text()
    assert "| 16 x 16 |" in report and "| 32 x 32 |" in report and "average of 2" in report
    assert (workdir / "results/report/loss.png").stat().st_size > 0
    assert (workdir / "results/scaling/scaling.png").stat().st_size > 0
    assert "](scaling/scaling.png)" in report  # the scaling stage's plot, linked from the report


def test_every_job_is_a_child_of_one_workflow_run(run):
    workdir, _, client, exp = run
    parent = _fixture_parent(client, exp)               # later parents are other tests' reruns
    assert parent.info.status == "FINISHED"
    children = _runs(client, exp, **{"mlflow.parentRunId": parent.info.run_id})
    # Every run started while tiny_workflow's invocation ran is one of its children.
    during = [r for r in client.search_runs([exp], max_results=1000)
              if r.info.run_id != parent.info.run_id
              and parent.info.start_time <= r.info.start_time <= parent.info.end_time]
    assert {r.info.run_id for r in during} == {r.info.run_id for r in children}, "a job without the parent"
    stages = sorted(r.data.tags["deepimage.stage"] for r in children)
    # 1 dataset + 4 shard (2 res x 2 splits) + 2 train (+ 1 without augmentation, the robustness
    # ablation) + 2 evaluate + ensemble + scaling + perfmodel + robustness + report
    assert stages == sorted(["dataset"] + ["shard"] * 4 + ["train"] * 3 + ["evaluate"] * 2
                            + ["ensemble", "scaling", "perfmodel", "robustness", "report"])
    assert all(r.info.status == "FINISHED" for r in children)
    report = (workdir / "results/report.md").read_text()
    for r in children:
        if r.data.tags["deepimage.stage"] != "report":
            assert r.info.run_id in report, f"report does not name the {r.info.run_name} run"


def test_stage_runs_hold_their_key_metrics_and_params(run):
    workdir, cfg, client, exp = run
    ens = json.loads((workdir / "results/ensemble/metrics.json").read_text())
    for t in _fixture_children(client, exp, **{"deepimage.stage": "train"}):
        assert t.data.params["train.np"] == "2" and t.data.params["np"] == "2"
        losses = client.get_metric_history(t.info.run_id, "loss")
        assert len(losses) == cfg["train"]["epochs"]  # one per epoch, only rank 0 logged
        assert t.data.metrics["images_per_s"] > 0
        assert len(client.get_metric_history(t.info.run_id, "val_top1_error")) == cfg["train"]["epochs"]
    evals = {r.data.tags["deepimage.resolution"]: r
             for r in _fixture_children(client, exp, **{"deepimage.stage": "evaluate"})}
    for res, r in evals.items():
        assert r.data.metrics["top1_error"] == pytest.approx(ens["models"][res]["top1_error"])
        assert r.data.metrics["top5_error"] == pytest.approx(ens["models"][res]["top5_error"])
    (e,) = _fixture_children(client, exp, **{"deepimage.stage": "ensemble"})
    assert e.data.metrics["top1_error"] == pytest.approx(ens["ensemble"]["top1_error"])
    (s,) = _fixture_children(client, exp, **{"deepimage.stage": "scaling"})
    eff = client.get_metric_history(s.info.run_id, "scaling_efficiency")
    assert sorted(m.step for m in eff) == [1, 2] and all(m.value > 0 for m in eff)
    assert s.data.metrics["images_per_s"] > 0
    for method in ("butterfly", "horovod", "torch"):
        assert s.data.metrics[f"allreduce_ms_{method}_1MiB"] > 0
    assert s.data.metrics["allreduce_speedup_vs_horovod_1MiB"] > 0
    shards = _fixture_children(client, exp, **{"deepimage.stage": "shard"})
    assert all("skipped_files" in r.data.metrics for r in shards)


def test_parallel_validation_in_training_equals_single_process_evaluation(run):
    """The last epoch's val error, computed by 2 ranks with split FC, equals single-process
    evaluation of the gathered checkpoint on the same (training, centre) crop: the gather and the
    split forward are exact. (The evaluate stage itself sees evaluate.view, the whole image.)"""
    from deepimage.evaluate import evaluate

    workdir, _, _, _ = run
    for res in ("16", "32"):
        train = json.loads((workdir / f"results/train/{res}/metrics.json").read_text())
        _, ev = evaluate(str(workdir / f"results/train/{res}/model.pt"), str(workdir / f"results/shards/{res}/val"),
                         64, "centre")
        assert train["history"]["val_top1_error"][-1] == pytest.approx(ev["top1_error"], abs=1.5 / ev["samples"])
        assert train["history"]["val_top5_error"][-1] == pytest.approx(ev["top5_error"], abs=1.5 / ev["samples"])


def test_rerunning_one_rule_makes_a_new_parent_with_one_child(run):
    workdir, cfg, client, exp = run
    started_ms = time.time() * 1000
    r = snakemake(workdir, "--cores", "2", "--forcerun", "ensemble_models", "--until", "ensemble_models",
                  config=cfg, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    new = [p for p in _parents(client, exp) if p.info.start_time >= started_ms]
    assert len(new) == 1, f"{len(new)} parent runs started by one snakemake invocation"
    ours = json.loads((workdir / tracking.DEFAULT_PARENT_FILE).read_text())["run_id"]
    assert new[0].info.run_id == ours and new[0].info.status == "FINISHED"
    children = _runs(client, exp, **{"mlflow.parentRunId": ours})
    assert [c.data.tags["deepimage.stage"] for c in children] == ["ensemble"]


def test_train_rule_under_torchrun(run):
    """train.launcher: torchrun reruns the train job (its params changed) under torch.distributed."""
    workdir, cfg, client, exp = run
    cfg = {**cfg, "train": {**cfg["train"], "launcher": "torchrun"}}
    r = snakemake(workdir, "--cores", "2", "results/train/16/model.pt", config=cfg, timeout=300)
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{log_tail(workdir)}"
    assert "torch.distributed.run" in (workdir / "logs/train_model/16.log").read_text()
    record = json.loads((workdir / "results/train/16/mlflow_run.json").read_text())
    t = client.get_run(record["run_id"])
    assert t.data.params["launcher"] == "torchrun" and t.data.params["np"] == "2"
    assert len(client.get_metric_history(t.info.run_id, "loss")) == cfg["train"]["epochs"]
