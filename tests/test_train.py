"""The training stage's pieces that need no launch: schedule, device choice, step on 1 process."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepimage.config import Config
from deepimage.metrics import topk_error
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.parallelize import is_split, parallelize
from deepimage.parallel.transport import init_transport
from deepimage.train import PHASES, autocast, evaluate, gather_weights, lr_at, pick_device, sgd, step

TRAIN = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "bucket_mib": 1, "lazy_update": True,
         "split_fc": True, "bf16": False}


def test_lr_warms_up_linearly_then_decays_to_zero():
    assert lr_at(0.1, 0.5, 10) == pytest.approx(0.05)
    assert lr_at(0.1, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(0.1, 10.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0.1, 3.0, 10) > lr_at(0.1, 6.0, 10)


def test_device_choice_on_a_cpu_build():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="train.device is 'cuda'"):
            pick_device("cuda")


def _data(n=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, k, (n,), generator=g)


def test_single_process_step_equals_plain_sgd_and_its_evaluation_is_exact():
    """On one process (split FC off by itself) a step is plain SGD on the batch mean loss,
    evaluate() gives the same errors as computing them from the plain model's posteriors, and
    gather_weights() is the plain model's state dict."""
    spec = ModelSpec(5, conv=[[8], [16]], fc_hidden=[16, 16], dropout=0.0)
    x, y = _data()
    cfg = Config.from_dict({"train": TRAIN})
    model, sync = parallelize(build_model(spec, 0), init_transport("local"), cfg, sgd(cfg.train))
    assert not is_split(model)  # one process: nothing to split
    amp = autocast(model, cfg.train)
    plain = build_model(spec, 0)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        sync.set_lr(0.05)
        stats = step(model, sync, x, y, amp)
        loss = F.cross_entropy(plain(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert stats.loss == pytest.approx(loss.item(), rel=1e-5) and stats.count == len(y)
    weights = gather_weights(model, sync)  # flushes the pending lazy updates
    for (name, a), b in zip(weights.items(), plain.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    batches = [(x[i:i + 16], y[i:i + 16], None) for i in range(0, len(y), 16)]
    got = evaluate(model, sync, batches, amp)
    probs = torch.softmax(plain.eval()(x), 1).detach().numpy()
    assert got["val_top1_error"] == pytest.approx(topk_error(probs, y.numpy(), 1))
    assert got["val_top5_error"] == pytest.approx(topk_error(probs, y.numpy(), 5))
    assert got["val_loss"] == pytest.approx(F.cross_entropy(plain(x), y).item(), rel=1e-5)
    assert np.isfinite(got["val_loss"])


def test_step_laps_each_phase_once_in_order_and_the_step_timer_splits_them():
    """The step's timer hook: lap(phase) at the end of each of PHASES; StepTimer adds them up
    into the SPLIT parts, which sum to the step's wall time."""
    import time

    from deepimage.measure import SPLIT, StepTimer

    class Record(StepTimer):
        def __init__(self):
            super().__init__()
            self.phases = []

        def lap(self, phase):
            self.phases.append(phase)
            super().lap(phase)

    spec = ModelSpec(5, conv=[[8]], fc_hidden=[16, 16], dropout=0.0)
    cfg = Config.from_dict({"train": TRAIN})
    model, sync = parallelize(build_model(spec, 0), init_transport("local"), cfg, sgd(cfg.train))
    x, y = _data(8)
    timer = Record()
    t0 = time.perf_counter()
    timer.start()
    step(model, sync, x, y, autocast(model, cfg.train), timer)
    wall = time.perf_counter() - t0
    assert timer.phases == list(PHASES)
    assert set(timer.parts) == set(SPLIT) and timer.parts["compute"] > 0 and timer.parts["comm_wait"] == 0
    assert 0 < sum(timer.parts.values()) <= wall


def test_a_corrupted_shard_stops_every_rank_with_one_line_naming_it(tmp_path):
    """Rank 0 verifies the only shard and names it; rank 1 stops with one line, no traceback."""
    import json
    import subprocess
    import sys

    from data_fixtures import synthetic_source
    from deepimage.shard import ShardParams, build, plan_split

    plan = plan_split(synthetic_source(tmp_path / "syn", classes=3, per_class=4, image_size=32), "train")
    build(plan, tmp_path / "shards", ShardParams(resolution=16))
    shard = tmp_path / "shards" / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = {"seed": 0, "train": {**TRAIN, "epochs": 1, "batch_size": 4, "augment": {}},
           "model": {"conv": [[4]], "fc_hidden": [8, 8], "dropout": 0.0, "norm": "group"}}
    cmd = [sys.executable, "-m", "deepimage.launch", "--launcher", "horovod", "--np", "2", "--threads", "2",
           "deepimage.train", "--resolution", "16", "--train-shards", str(tmp_path / "shards"),
           "--out", str(tmp_path / "out"), "--config-json", json.dumps(cfg),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--parent-file", str(tmp_path / "none.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"{shard}: corrupted shard: expected sha256" in out and "found sha256" in out
    assert "train (rank 1): 1 other rank(s) could not open the data" in out
    assert "Traceback" not in out, out
    assert not (tmp_path / "out" / "model.pt").exists()
