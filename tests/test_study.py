"""The study switches and per-rule resources, planned by a real `snakemake -n`: what runs is
what the config asks for, and each rule asks a scheduler for what the config says."""
from __future__ import annotations

import re

from workflow import snakemake, tiny_config


def _plan(workdir, cfg, *args):
    r = snakemake(workdir, "-n", *args, config=cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = r.stdout.split("Job stats:")[1].split("total")[0]
    jobs = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if line.strip()}
    return jobs, r.stdout


def test_the_default_study_plans_the_ablation_scaling_and_performance_model(tmp_path):
    jobs, _ = _plan(tmp_path, tiny_config(tmp_path))
    assert {"train_without_augmentation", "measure_scaling", "predict_scaling"} <= set(jobs)


def test_study_disabled_plans_the_users_job_only_and_one_worker_runs(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["study"] = {"enabled": False}
    cfg["train"]["np"] = 1
    cfg["scaling"]["np"] = [1]
    jobs, _ = _plan(tmp_path, cfg)
    assert set(jobs) == {"make_dataset", "shard_images", "train_model", "evaluate_model", "ensemble_models",
                         "evaluate_robustness", "write_report", "all"}


def test_each_study_stage_is_its_own_switch(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["study"] = {"ablation": False, "perfmodel": False}
    jobs, out = _plan(tmp_path, cfg, "-p")
    assert "measure_scaling" in jobs
    assert not {"train_without_augmentation", "predict_scaling"} & set(jobs)
    report_cmd = out.split("python -m deepimage.report", 1)[1].splitlines()[0]
    assert "--scaling results/scaling/scaling.json" in report_cmd and "--perfmodel" not in report_cmd


def test_a_performance_model_without_an_all_reduce_stops_before_any_job(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["scaling"]["np"] = [1]
    r = snakemake(tmp_path, "-n", config=cfg)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "study.perfmodel: scaling.np [1] has no worker count above 1" in out
    assert "study.perfmodel: false" in out and "Traceback" not in out


def test_rule_resources_come_from_the_config(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["resources"] = {"default": {"runtime": 11, "mem_mb": 1500},
                        "train_model": {"runtime": 77, "mem_mb": 3000, "cpus_per_task": 1}}
    _, out = _plan(tmp_path, cfg)
    asked = {m.group(1): m.group(2) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)*?    resources: (.*)", out)}
    assert re.search(r"runtime=77, cpus_per_task=1, nodes=1, tasks=2.*mem_mb=3000", asked["train_model"])
    assert re.search(r"runtime=11, cpus_per_task=2, mem_mb=1500", asked["shard_images"])
