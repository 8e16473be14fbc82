"""Checkpoint files: atomic writes, the newest `keep` kept, a truncated or unreadable newest one
skipped with one line naming it, and the config check that refuses another model.

    .venv/bin/pytest -q tests/test_checkpoint.py
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest
import torch

from deepimage import checkpoint
from deepimage.config import Config


def payload(step: int, mib: float = 0.01) -> dict:
    return {"model": {"w": torch.full((int(mib * 2**18),), float(step))}, "global_step": step,
            "rng": [b"\x00\x01"], "config": {"train": {"lr": 0.1}}, "run_id": "abc"}


def test_write_keeps_the_newest_n_and_leaves_no_temporary_file(tmp_path):
    for step in (3, 10, 7, 12):
        checkpoint.write(tmp_path, payload(step), step, keep=2)
    assert [p.name for p in checkpoint.listing(tmp_path)] == ["ckpt-000000012.pt", "ckpt-000000010.pt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000010.pt", "ckpt-000000012.pt"]
    loaded, path = checkpoint.load_latest(tmp_path)
    assert path.name == "ckpt-000000012.pt" and loaded["global_step"] == 12
    assert loaded["rng"] == [b"\x00\x01"] and torch.equal(loaded["model"]["w"], payload(12)["model"]["w"])


def _write_forever(folder: str) -> None:
    step = 1
    while True:
        checkpoint.write(folder, payload(step, mib=8), step, keep=2)
        step += 1


def test_a_writer_killed_at_any_moment_leaves_only_complete_checkpoints(tmp_path):
    """A process writing 8 MiB checkpoints in a loop is SIGKILLed mid-write: every file under a
    checkpoint name loads (the temporary file is the only partial one), and the newest loads."""
    proc = mp.get_context("spawn").Process(target=_write_forever, args=(str(tmp_path),))
    proc.start()
    try:
        while len(checkpoint.listing(tmp_path)) < 2:
            proc.join(0.05)
            assert proc.is_alive()
        proc.join(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    names = checkpoint.listing(tmp_path)
    assert names and all(checkpoint.load(p)["global_step"] == int(p.stem[5:]) for p in names)
    assert checkpoint.load_latest(tmp_path)[1] == names[0]


def test_a_truncated_newest_checkpoint_is_skipped_with_one_line_and_the_previous_used(tmp_path):
    for step in (5, 9):
        checkpoint.write(tmp_path, payload(step), step, keep=3)
    newest = checkpoint.path_for(tmp_path, 9)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    lines = []
    loaded, path = checkpoint.load_latest(tmp_path, lines.append)
    assert path.name == "ckpt-000000005.pt" and loaded["global_step"] == 5
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint: skipping {newest} (unreadable: ")
    assert lines[0].endswith("; using ckpt-000000005.pt")


def test_an_unreadable_only_checkpoint_means_starting_over(tmp_path):
    checkpoint.path_for(tmp_path, 4).write_bytes(b"not a checkpoint")
    lines = []
    assert checkpoint.load_latest(tmp_path, lines.append) is None
    assert len(lines) == 1 and lines[0].endswith("none left: starting over")
    assert checkpoint.load_latest(tmp_path / "missing") is None


def test_config_check_names_the_differing_keys_and_allows_worker_count_and_epochs():
    saved = checkpoint.run_config(Config.from_dict({"train": {"np": 2}}), 64)
    same = checkpoint.run_config(Config.from_dict({"train": {"np": 3, "epochs": 9, "launcher": "torchrun",
                                                             "checkpoint": {"keep": 5}}}), 64)
    checkpoint.check_compatible(saved, same, "x.pt")  # nothing refused
    other = checkpoint.run_config(Config.from_dict({"seed": 1, "train": {"batch_size": 64},
                                                    "model": {"fc_hidden": [128, 128]}}), 64)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.check_compatible(saved, other, "x.pt")
    assert str(e.value).startswith("x.pt was made with another config: model.fc_hidden ([256, 256] -> "
                                   "[128, 128]), seed (0 -> 1), train.batch_size (32 -> 64)")


def test_the_model_of_another_resolution_does_not_count():
    """model.per_resolution entries of other resolutions do not refuse this one's checkpoint."""
    a = checkpoint.run_config(Config.from_dict({}), 32)
    b = checkpoint.run_config(Config.from_dict({"model": {"per_resolution": {"64": {"conv": [[8]]}}}}), 32)
    assert checkpoint.differing_keys(a, b) == []
    assert checkpoint.differing_keys(checkpoint.run_config(Config.from_dict({}), 64),
                                     checkpoint.run_config(Config.from_dict(
                                         {"model": {"per_resolution": {"64": {"conv": [[8]]}}}}), 64))


def test_saver_only_checkpoints_its_cadence_from_train_checkpoint_and_leaves_signals_alone(tmp_path):
    """Saver takes explicit paths and settings; making one installs no signal handler (the
    training loop owns stopping), and its cadence is train.checkpoint's: every_minutes and
    on_signal_min_age_s on rank 0's clock, every_epochs."""
    import time
    from types import SimpleNamespace

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cfg = Config.from_dict({"train": {"checkpoint": {"every_minutes": 1, "every_epochs": 2,
                                                     "on_signal_min_age_s": 30}}})

    def saver(rank: int) -> checkpoint.Saver:
        return checkpoint.Saver(tmp_path / "checkpoints", cfg.train.checkpoint, checkpoint.run_config(cfg, 32),
                                cfg.seed, SimpleNamespace(rank=rank, size=2), ["a", "b"], 4, "", fresh=True)

    s = saver(0)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert s.due() and s.old_enough()  # nothing written by this job yet
    s.last_write = time.monotonic() - 45
    assert not s.due() and s.old_enough()
    s.last_write = time.monotonic() - 61
    assert s.due()
    assert [e for e in range(1, 7) if s.epoch_due(e)] == [2, 4, 6]
    assert not saver(1).due() and not saver(1).old_enough()  # rank 0's clock decides
    assert not (tmp_path / "checkpoints").exists()
