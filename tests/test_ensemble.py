"""Ensembling: posteriors aligned by sample id, averaged, errors computed; mismatches named."""
import numpy as np
import pytest

from deepimage.ensemble import ensemble
from deepimage.metrics import topk_error


def _save(path, probs, labels, ids, resolution, classes=("a", "b", "c")):
    np.savez(path, probs=np.asarray(probs, np.float32), labels=np.asarray(labels), sample_ids=np.asarray(ids),
             classes=np.array(classes), resolution=np.array(resolution))
    return str(path)


def test_topk_error_counts_label_outside_top_k():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2])
    assert topk_error(probs, labels, 1) == pytest.approx(2 / 3)
    assert topk_error(probs, labels, 2) == pytest.approx(1 / 3)
    assert topk_error(probs, labels, 5) == 0.0  # k capped at the class count


def test_average_of_complementary_models_beats_each(tmp_path):
    labels = [0, 1, 2, 0]
    # model A is right on samples 0, 1 and confidently wrong elsewhere; B the opposite, weakly wrong.
    a = [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.2, 0.45, 0.35]]
    b = [[0.3, 0.4, 0.3], [0.35, 0.3, 0.35], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]
    pa = _save(tmp_path / "a.npz", a, labels, [10, 11, 12, 13], 32)
    # B evaluated the same samples in another order: rows must be matched by sample id.
    order = [3, 1, 0, 2]
    pb = _save(tmp_path / "b.npz", [b[i] for i in order], [labels[i] for i in order],
               [[10, 11, 12, 13][i] for i in order], 64)
    m = ensemble([pa, pb])
    assert m["models"]["32"]["top1_error"] == 0.5
    assert m["models"]["64"]["top1_error"] == 0.5
    assert m["ensemble"]["top1_error"] == 0.0
    assert set(m["models"]) == {"32", "64"} and m["samples"] == 4


def test_different_samples_are_an_error_naming_the_model(tmp_path):
    pa = _save(tmp_path / "a.npz", np.eye(3), [0, 1, 2], [1, 2, 3], 32)
    pb = _save(tmp_path / "b.npz", np.eye(3), [0, 1, 2], [1, 2, 4], 64)
    with pytest.raises(ValueError, match="64: evaluated on different samples"):
        ensemble([pa, pb])


def test_different_labels_for_same_ids_are_an_error(tmp_path):
    pa = _save(tmp_path / "a.npz", np.eye(3), [0, 1, 2], [1, 2, 3], 32)
    pb = _save(tmp_path / "b.npz", np.eye(3), [0, 2, 1], [1, 2, 3], 64)
    with pytest.raises(ValueError, match="labels differ"):
        ensemble([pa, pb])
