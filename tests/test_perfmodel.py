"""The performance model (deepimage/perfmodel/): its parts on synthetic inputs, its validation
against steps measured with real workers, and the predict_scaling stage's output in the tiny run.

    .venv/bin/pytest -q tests/test_perfmodel.py
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from deepimage.config import Config
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.butterfly import PAIR_MIB, PIECE_MIB
from deepimage.perfmodel import projection, stage
from deepimage.perfmodel.costs import (Hardware, Link, Profile, butterfly_counts, butterfly_time, fit_link,
                                       fit_plain, load_hardware, load_profiles, local_hardware, ring_time,
                                       split_fc_time, step_time)
from deepimage.perfmodel.host import _slowest, real_batches
from deepimage.perfmodel.profile import _leaves, counted_profile, head_shape, profile
from deepimage.perfmodel.projection import project, projection_profile
from deepimage.perfmodel.spec import HARDWARE_DIR, PerfModelError
from deepimage.perfmodel.stage import library_allreduce, model_variant, validate
from workflow import snakemake, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# the FC-heavy validation model's resolution under config.yaml: its lowest
FC_HEAVY_RES = min(yaml.safe_load((ROOT / "config.yaml").read_text())["resolutions"])


def test_butterfly_counts_follow_the_butterfly_code():
    """Two ranks and <= PAIR_MIB: one whole-piece message; else 2(N-1) messages per piece,
    2(N-1)/N of the bytes sent."""
    assert butterfly_counts(PAIR_MIB * MIB, 2) == (1.0, PAIR_MIB * MIB)
    big = 4 * PIECE_MIB * MIB
    assert butterfly_counts(big, 2) == (2.0 * 4, big)
    assert butterfly_counts(big, 4) == (2.0 * 3 * 4, 2 * 3 / 4 * big)
    assert butterfly_counts(big, 1) == (0.0, 0.0)


def test_fit_link_recovers_latency_and_bandwidth():
    truth = Link(latency_s=50e-6, bandwidth=5e9)
    sizes = [0.25, 1, 4, 16, 64]
    points = [{"bytes": s * MIB, "seconds": truth.time(*butterfly_counts(s * MIB, 2))} for s in sizes]
    link, rows = fit_link(points, 2)
    assert link.latency_s == pytest.approx(50e-6, rel=1e-6)
    assert link.bandwidth == pytest.approx(5e9, rel=1e-6)
    assert all(abs(r["residual"]) < 1e-9 for r in rows)
    with pytest.raises(PerfModelError, match="scaling.allreduce_mib"):
        fit_link(points[:1], 2)


def _profile(buckets: list[tuple[float, float, float]], fwd=0.1, bwd=0.2) -> Profile:
    """A synthetic profile: buckets as (MiB, ready in backward, first use in forward)."""
    bs = [{"bytes": m * MIB, "ready_s": r, "first_use_s": u} for m, r, u in buckets]
    return Profile(fwd, bwd, 0.0, [], bs, bs, batch=32, resolution=32)


def test_lazy_update_hides_what_the_synchronous_update_waits_for():
    hw = Hardware("test", 1.0, 8, Link(0.0, 1e9), Link(0.0, 1e9))
    # last layer's bucket ready early in backward, an early layer's at its end, used 50 ms into
    # the next forward: more than its 17 ms all-reduce
    prof = _profile([(64, 0.02, 0.09), (16, 0.2, 0.05)])
    lazy = step_time(prof, 2, hw, lazy=True, split_fc=False)
    sync = step_time(prof, 2, hw, lazy=False, split_fc=False)
    flushed = step_time(prof, 2, hw, lazy=True, split_fc=False, flush_each_step=True)
    cost = [butterfly_time(b["bytes"], 2, hw) for b in prof.buckets]
    assert sync.comm_exposed == pytest.approx(sum(cost))
    # the big bucket finishes at 0.1 + 0.02 + cost0 (in backward), the small one right after
    # backward ends (0.3): the flushed step waits for its all-reduce only
    assert flushed.comm_exposed == pytest.approx(max(0.1 + 0.02 + cost[0], 0.3) + cost[1] - 0.3)
    assert lazy.comm_exposed == 0.0  # both finish before the next forward needs them
    assert lazy.total < flushed.total < sync.total
    needed_first = step_time(_profile([(64, 0.02, 0.09), (16, 0.2, 0.0)]), 2, hw, split_fc=False)
    assert needed_first.comm_exposed == pytest.approx(cost[1])  # used at once: nothing hides it
    assert step_time(prof, 1, hw).comm_exposed == 0.0


def test_butterfly_across_nodes_loads_the_node_link_with_every_local_worker():
    link = Link(0.0, 1e9)
    hw = Hardware("test", 1.0, 4, Link(0.0, 1e12), link)
    size, n = 256 * MIB, 16
    ring = ring_time(size, n, hw)
    butterfly = butterfly_time(size, n, hw)
    assert ring == pytest.approx(2 * (n - 1) / n * size / 1e9)
    # each of the 4 workers sends (N - w)/N of the data off the node in each of the 2 phases
    assert butterfly == pytest.approx(2 * 4 * (n - 4) / n * size / 1e9)
    one_node = Hardware("test", 1.0, 16, link, link)
    assert butterfly_time(size, n, one_node) == pytest.approx(ring_time(size, n, one_node))


def test_horovod_fuses_buckets_and_waits_after_backward():
    hw = Hardware("test", 1.0, 8, Link(1e-3, 1e9), Link(1e-3, 1e9))
    prof = _profile([(8, 0.05, 0.09), (8, 0.1, 0.05), (8, 0.2, 0.0)])
    fused = step_time(prof, 2, hw, method="horovod", split_fc=False, fusion_mib=64)
    # one fusion of 24 MiB, launched on the cycle tick after the last bucket, waited for at the end
    assert fused.comm_exposed == pytest.approx(ring_time(24 * MIB, 2, hw), rel=1e-6)


def test_split_fc_moves_activations_instead_of_fc_gradients():
    spec = ModelSpec(num_classes=1000, conv=[[16], [32]], fc_hidden=[4096, 4096], dropout=0.0)
    hw = Hardware("test", 1e12, 8, Link(1e-5, 1e10), Link(1e-5, 1e9))
    prof = counted_profile(spec, 32, 32, 4.0, hw.flops_per_s)
    model = build_model(spec)
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert sum(b["bytes"] for b in prof.buckets) == 4 * sum(p.numel() for p in model.parameters())
    assert sum(b["bytes"] for b in prof.buckets_split) == 4 * trunk
    head = head_shape(spec)
    assert head["features"] == model.head.fc1.in_features
    split = step_time(prof, 8, hw, lazy=False, split_fc=True, head=head)
    plain = step_time(prof, 8, hw, lazy=False, split_fc=False, head=head)
    assert split.split_fc > 0 and split.comm_exposed < plain.comm_exposed


def test_hardware_files_load_and_say_where_their_numbers_come_from():
    for name in Config.from_dict({}).perfmodel.hardware:
        hw = load_hardware(name)
        assert hw.flops_per_s > 0 and hw.workers_per_node >= 1
        assert {"flops_per_s_source", "intra_node_source", "inter_node_source"} <= set(hw.source)
    minwa = load_hardware("minwa")
    assert (minwa.nodes, minwa.workers_per_node) == (36, 4)  # the paper's 144 K40m
    with pytest.raises(PerfModelError, match="known"):
        load_hardware("no_such_machine")


def test_projection_covers_every_variant_and_starts_at_full_efficiency():
    cfg = Config.from_dict({"perfmodel": {"np": [1, 8, 144], "hardware": ["minwa"], "resolutions": [256]}})
    rows = project(cfg, [load_hardware("minwa")])
    assert len(rows) == 10 * 3  # butterfly/ring x lazy x split FC, horovod x split FC; 3 worker counts
    assert all(r["efficiency"] == pytest.approx(1.0) for r in rows if r["np"] == 1)
    assert all(0 < r["efficiency"] <= 1.0 + 1e-9 for r in rows)


def test_a_measured_profile_replaces_counted_compute_where_it_matches(tmp_path, monkeypatch):
    """`perfmodel profile` writes one worker's profile; a hardware file naming it projects with the
    measured compute at that resolution and batch, and counts FLOPs elsewhere."""
    spec = ModelSpec(num_classes=10, conv=[[8], [16]], fc_hidden=[64, 64], dropout=0.0)
    monkeypatch.setattr(projection, "paper_spec", lambda: spec)
    stage.main(["profile", "--device", "cpu", "--resolutions", "32", "--batch", "4", "--steps", "2",
             "--out", str(tmp_path / "prof.json")])
    meta, profiles = load_profiles(tmp_path / "prof.json", "test")
    assert meta["device"] == "cpu" and meta["model"] == spec.to_dict() and set(profiles) == {32}
    prof = profiles[32]
    assert prof.forward_s > 0 and prof.backward_s > 0 and len(prof.layers) == len(_leaves(build_model(spec)))
    yaml_text = (HARDWARE_DIR / "minwa.yaml").read_text() + "\nprofile: prof.json\n"
    (tmp_path / "hw.yaml").write_text(yaml_text)
    hw = load_hardware(str(tmp_path / "hw.yaml"))
    measured, source = projection_profile(hw, spec, 4, 32, meta["bucket_mib"])
    assert source == "measured" and step_time(measured, 1, hw).compute == pytest.approx(prof.compute_s)
    assert projection_profile(hw, spec, 8, 32, meta["bucket_mib"])[1] == "counted"  # another batch
    assert projection_profile(hw, spec, 4, 64, meta["bucket_mib"])[1] == "counted"  # not profiled
    (tmp_path / "bad.yaml").write_text(yaml_text.replace("prof.json", "missing.json"))
    with pytest.raises(PerfModelError, match="missing.json"):
        load_hardware(str(tmp_path / "bad.yaml"))


def test_lazy_profile_puts_the_updates_in_the_forward():
    """profile(lazy=True) runs lazy update: the optimizer's work moves into the next forward."""
    cfg = Config.from_dict({})
    spec = ModelSpec(num_classes=10, conv=[[8], [16]], fc_hidden=[256, 256], dropout=0.0)
    sync = profile(cfg, spec, 4, 32, steps=3, lazy=False)
    lazy = profile(cfg, spec, 4, 32, steps=3, lazy=True)
    assert sync.optimizer_s > 0 and lazy.optimizer_s < sync.optimizer_s
    assert sync.head_update_s == 0 and sync.ranks == 1


def test_a_profile_of_rank_0_of_n_runs_its_split_fc_shard_on_the_global_batch():
    """profile(ranks=4): the head is rank 0's split FC shard (a quarter of the parameters) run on
    the 4 ranks' gathered batch (the same FLOPs as the whole head on one batch), stepped by its
    own optimizer (head_update_s), the trunk's gradients bucketed alone."""
    cfg = Config.from_dict({})
    spec = ModelSpec(num_classes=12, conv=[[8], [16]], fc_hidden=[256, 256], dropout=0.0)
    plain = profile(cfg, spec, 4, 32, steps=3, lazy=True)
    four = profile(cfg, spec, 4, 32, steps=3, lazy=True, ranks=4)
    layers = {(p, l["name"]): l for p, prof in (("plain", plain), ("four", four)) for l in prof.layers}
    for name in ("head.fc1", "head.fc2", "head.classifier"):
        assert layers["four", name]["params"] * 4 == pytest.approx(layers["plain", name]["params"], rel=0.02)
        assert layers["four", name]["flops"] == pytest.approx(layers["plain", name]["flops"], rel=0.02)
    assert four.ranks == 4 and 0 < four.head_update_s <= four.optimizer_s
    assert sum(b["bytes"] for b in four.buckets_split) == sum(b["bytes"] for b in plain.buckets_split)
    hw = Hardware("test", 1.0, 8, Link(0.0, 1e12), Link(0.0, 1e12))
    head = head_shape(spec)
    at_four, at_one = (step_time(four, n, hw, head=head) for n in (4, 1))
    assert at_four.compute == pytest.approx(four.data_s + four.compute_s)  # taken at 4: as measured
    assert at_four.slowest_wait == 0.0  # a profile of 4 concurrent workers is already paced
    # carried to another N: the shard's update scales with the share of the head a rank holds
    assert at_one.compute - at_four.compute == pytest.approx(four.head_update_s * 3)


def test_a_validation_profile_steps_on_the_shards_batches(shards_root):
    """real_batches gives training's loader batches; profile(batches=...) steps on them in turn,
    not on a random batch (whose denormal floats made a CPU step 10-20 % slower than training's).
    The FLOPs, counted from each layer's output, follow the rows of the batches given."""
    cfg = Config.from_dict({"train": {"device": "cpu"}})
    batches = real_batches(shards_root / "64" / "train", cfg, 6, 64, 3)
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (6, 3, 64, 64) and images.dtype == torch.float32 and labels.shape == (6,)
    spec = ModelSpec(num_classes=12, conv=[[8], [16]], fc_hidden=[64, 64], dropout=0.0)
    on_data = profile(cfg, spec, 4, 64, steps=3, batches=batches)
    on_random = profile(cfg, spec, 4, 64, steps=3)
    assert on_data.flops() == pytest.approx(on_random.flops() * 6 / 4, rel=1e-6)


def test_the_fc_heavy_model_runs_at_the_lowest_resolution_and_the_rule_shards_it(tmp_path):
    """The stage validates the FC-heavy model at min(resolutions) and the default one at the
    scaling resolution; predict_scaling asks for exactly those two shard folders."""
    cfg = tiny_config(tmp_path)
    cfg["resolutions"], cfg["scaling"]["resolution"] = [24, 40], 40
    config = Config.from_dict(cfg)
    assert model_variant(config, "fc_heavy")[1] == 24 and model_variant(config, "default")[1] == 40
    r = snakemake(tmp_path, "-n", "results/scaling/perfmodel.json", config=cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    shards = set(re.findall(r"results/shards/(\d+)/train/manifest.json", r.stdout))
    assert shards == {"24", "40"}, r.stdout[-3000:]


def test_the_package_imports_no_other_stage():
    """deepimage.perfmodel calls the training step and parallelize as library functions
    (deepimage.train is imported for them) but no other stage module, the scaling stage included."""
    import subprocess
    import sys

    stages = sorted(f"deepimage.{p.stem}" for p in (ROOT / "rules").glob("*.smk")
                    if (ROOT / "deepimage" / f"{p.stem}.py").exists())
    code = ("import sys, deepimage.perfmodel.stage, deepimage.perfmodel.report; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('deepimage'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = set(r.stdout.split())
    assert "deepimage.scaling" in stages and "deepimage.train" in imported
    assert imported & set(stages) == {"deepimage.train"}, imported & set(stages)


# ---------------------------------------------------------------------------------------------
# Validation with real workers (about a minute on 2 cores)


@pytest.fixture(scope="module")
def shards_root(tmp_path_factory) -> Path:
    """Train shards at the default scaling resolution and at the FC-heavy model's, 12 classes."""
    from data_fixtures import synthetic_source
    from deepimage.shard import ShardParams, build, plan_split

    tmp = tmp_path_factory.mktemp("perfmodel")
    per_class = max(8, 2 * 16 * max(VALIDATION_NP) // 12)  # two global batches of 16 per worker
    plan = plan_split(synthetic_source(tmp / "syn", classes=12, per_class=per_class, image_size=80), "train")
    for res in (64, FC_HEAVY_RES):
        build(plan, tmp / "shards" / str(res) / "train", ShardParams(resolution=res))
    return tmp / "shards"


# Worker counts and launcher of the validation; on a host with more cores, e.g.
#   DEEPIMAGE_VALIDATION_NP="1 2 4 8" DEEPIMAGE_VALIDATION_LAUNCHER=torchrun pytest -m validation ...
VALIDATION_NP = [int(n) for n in os.environ.get("DEEPIMAGE_VALIDATION_NP", "1 2").split()]


@pytest.mark.validation
def test_predicted_step_time_within_tolerance_of_measured(shards_root, tmp_path):
    """8 points: config.yaml's model and the FC-heavy one, np 1 and 2 (DEEPIMAGE_VALIDATION_NP),
    lazy update on and off; one core per worker."""
    from deepimage.scaling import allreduce_sweep

    top = max(VALIDATION_NP)
    assert top <= len(os.sched_getaffinity(0)), f"DEEPIMAGE_VALIDATION_NP up to {top} needs {top} cores"
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    launcher = os.environ.get("DEEPIMAGE_VALIDATION_LAUNCHER") or raw["train"]["launcher"]
    # the CPU's step is what the CPU profile predicts, also on a GPU node
    cfg = Config.from_dict({**raw, "train": {**raw["train"], "launcher": launcher, "device": "cpu"},
                            "scaling": {**raw["scaling"], "resolution": 64, "np": VALIDATION_NP}})
    sweep = allreduce_sweep(cfg, top, top, 5, tmp_path)
    link, _ = fit_link(sweep["points"], sweep["np"])
    shards = {r: shards_root / str(r) / "train" for r in (64, FC_HEAVY_RES)}
    rows = validate(cfg, shards, link, tmp_path, threads_per_worker=1)  # as run_stage
    assert sorted((r["config"], r["np"]) for r in rows) == sorted(
        (f"{m}/{u}", n) for m in ("default", "fc_heavy") for u in ("lazy", "sync") for n in VALIDATION_NP)
    tol = cfg.perfmodel.tolerance
    for r in rows:  # every point's error (pytest -rP shows it for a pass)
        p, m = r["predicted_split"], r["measured_split"]
        print(f"{r['config']} np={r['np']}: measured {r['measured_s'] * 1e3:.1f} ms, predicted "
              f"{r['predicted_s'] * 1e3:.1f} ms ({r['error']:+.1%}); measured compute/comm_wait/data "
              f"{m['compute'] * 1e3:.1f}/{m['comm_wait'] * 1e3:.1f}/{m['data'] * 1e3:.1f} ms, "
              f"predicted compute/split FC/exposed/slowest {p['compute'] * 1e3:.1f}/{p['split_fc'] * 1e3:.1f}/"
              f"{p['comm_exposed'] * 1e3:.1f}/{p['slowest_wait'] * 1e3:.1f} ms")
    outside = [f"{r['config']} np={r['np']}: measured {r['measured_s'] * 1e3:.1f} ms, predicted "
               f"{r['predicted_s'] * 1e3:.1f} ms ({r['error']:+.1%}); measured split {r['measured_split']}, "
               f"predicted {r['predicted_split']}" for r in rows if abs(r["error"]) > tol]
    assert not outside, "\n".join(outside)


# ---------------------------------------------------------------------------------------------
# The stage in the workflow


def test_stage_writes_validation_projection_and_logs_them(tiny_workflow):
    out = json.loads((tiny_workflow.workdir / "results/scaling/perfmodel.json").read_text())
    np_values = tiny_workflow.config["scaling"]["np"]
    assert len(out["validation"]) == 2 * 2 * len(np_values)
    for v in out["validation"]:
        assert {"np", "config", "measured_s", "predicted_s"} <= set(v)
        assert v["measured_s"] > 0 and v["predicted_s"] > 0
    pc = Config.from_dict({}).perfmodel
    keys = {(r["hardware"], r["resolution"], r["np"]) for r in out["projection"]}
    hardware = {load_hardware(h).name for h in pc.hardware}
    assert keys == {(h, r, n) for h in hardware for r in pc.resolutions for n in pc.np}
    for r in out["projection"]:
        assert {"method", "lazy", "split_fc", "step_s", "efficiency"} <= set(r)
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0
    for png in ("perfmodel_efficiency", "perfmodel_projection", "perfmodel_validation"):
        assert (tiny_workflow.workdir / f"results/perfmodel/{png}.png").stat().st_size > 1000
    record = json.loads((tiny_workflow.workdir / "results/perfmodel/mlflow_run.json").read_text())
    client = tiny_workflow.client
    run = client.get_run(record["run_id"])
    assert "validation_max_abs_error" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"perfmodel.json", "perfmodel_efficiency.png", "perfmodel_projection.png"} <= artifacts
    report = (tiny_workflow.workdir / "results/report.md").read_text()
    assert "## Performance model and projection" in report and "PREDICTED" in report and "MEASURED" in report


def test_blocking_allreduces_use_their_own_fit_where_the_sweep_has_one():
    lib = Link(2e-3, 2e9)
    points = [{"bytes": s * MIB, "seconds": lib.time(1, s * MIB)} for s in (0.25, 1, 4, 16)]
    fitted, rows = fit_plain(points)
    assert fitted.latency_s == pytest.approx(2e-3, rel=1e-6) and fitted.bandwidth == pytest.approx(2e9, rel=1e-6)
    sweep = {"sizes_mib": [0.25, 1, 4, 16], "median_s": {"torch": [p["seconds"] for p in points]}}
    assert library_allreduce(sweep)[0] == pytest.approx(fitted)
    fast = Link(1e-5, 1e10)
    head = {"features": 512, "fc_hidden": [256, 256], "classes": 10}
    plain = split_fc_time(16, 2, head, local_hardware(fast, 2))
    with_lib = split_fc_time(16, 2, head, local_hardware(fast, 2, fitted))
    # fc2's forward all-reduce, its copy's backward one and the cross-entropy's two go over the library
    assert with_lib - plain == pytest.approx(4 * 2e-3, rel=0.05)


def test_concurrent_workers_are_paced_segment_by_segment():
    """host_profile's workers meet where the split head's collectives are: each segment of a step
    takes the slowest worker's time, so two workers whose steps take as long but whose segments
    differ are slower together than either alone."""
    a, b = _profile([(1, 0.1, 0.0)]), _profile([(1, 0.1, 0.0)])
    a.step_totals = b.step_totals = [0.4, 0.4]
    a.step_segments, b.step_segments = [[0.3, 0.1], [0.3, 0.1]], [[0.1, 0.3], [0.1, 0.3]]
    paced = _slowest([a, b])
    assert paced.compute_s == pytest.approx(a.compute_s * 0.6 / 0.4)
    b.step_segments = a.step_segments
    assert _slowest([a, b]).compute_s == pytest.approx(a.compute_s)
    # a real split-head profile cuts every step into the four segments, adding up to the step
    cfg = Config.from_dict({})
    spec = ModelSpec(num_classes=12, conv=[[8], [16]], fc_hidden=[256, 256], dropout=0.0)
    two = profile(cfg, spec, 4, 32, steps=3, lazy=True, ranks=2)
    assert all(len(seg) == 4 and min(seg) > 0 and sum(seg) == pytest.approx(total)
               for seg, total in zip(two.step_segments, two.step_totals))
    assert all(len(seg) == 1 for seg in profile(cfg, spec, 4, 32, steps=3).step_segments)


def test_slowest_of_n_workers_sets_the_pace():
    """The expected max of n draws from the profiled steps, less their mean: 0 at one worker or
    without a spread, growing with n."""
    prof = _profile([(1, 0.1, 0.0)])
    prof.step_totals = [0.1, 0.2]
    assert prof.slowest_wait_s(1) == 0.0
    assert prof.slowest_wait_s(2) == pytest.approx(0.75 * 0.2 + 0.25 * 0.1 - 0.15)  # P(max = 0.2) = 3/4
    assert prof.slowest_wait_s(2) < prof.slowest_wait_s(8) < 0.2 - 0.15
    prof.step_totals = [0.1] * 5
    assert prof.slowest_wait_s(4) == pytest.approx(0.0)
    hw = Hardware("test", 1.0, 8, Link(0.0, 1e9), Link(0.0, 1e9))
    prof.step_totals = [0.1, 0.2]
    step = step_time(prof, 2, hw, split_fc=False)
    assert step.total == pytest.approx(step.compute + step.comm_exposed + prof.slowest_wait_s(2))
