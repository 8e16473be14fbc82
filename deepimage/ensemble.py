"""Average the softmax posteriors of the models of every resolution; top-1 / top-5 error.

    python -m deepimage.ensemble --posteriors results/evaluate/32/posteriors.npz \
        results/evaluate/64/posteriors.npz --out results/ensemble/metrics.json

Writes {"models": {"<res>": {"top1_error", "top5_error"}}, "ensemble": {...}}, errors in [0, 1].
Posteriors are aligned by sample id (the same source image at every resolution), so the models
may have been evaluated in any order. With --models the ensemble is registered with each member
seeing the crop its posteriors were evaluated on (posteriors.npz `crop`, evaluate.view).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deepimage import tracking
from deepimage.io import write_json
from deepimage.metrics import topk_error
from deepimage.per_class import write_per_class
from deepimage.registry.log import log_ensemble


def load_posteriors(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def align(runs: dict[str, dict]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(sample_ids, labels, {name: probs}) with every model's rows in the same sample order."""
    ref_name, ref = next(iter(runs.items()))
    ids = np.sort(ref["sample_ids"])
    aligned, labels = {}, None
    for name, r in runs.items():
        if list(r["classes"]) != list(ref["classes"]):
            raise ValueError(f"{name}: class names differ from {ref_name}'s")
        if len(r["sample_ids"]) != len(ids) or not np.array_equal(np.sort(r["sample_ids"]), ids):
            raise ValueError(f"{name}: evaluated on different samples than {ref_name} "
                             f"({len(r['sample_ids'])} vs {len(ids)} ids)")
        order = np.argsort(r["sample_ids"])
        aligned[name] = r["probs"][order]  # (N, K), rows in sample-id order
        if labels is None:
            labels = r["labels"][order]
        elif not np.array_equal(labels, r["labels"][order]):
            raise ValueError(f"{name}: labels differ from {ref_name}'s for the same sample ids")
    return ids, labels, aligned


def evaluated_crops(posteriors: list[str], checkpoints: list[str]) -> list[int | None]:
    """Per checkpoint, the crop side its resolution's posteriors were evaluated on (None for
    posteriors written before evaluate recorded it: the training resolution)."""
    from deepimage.modelfile import load_checkpoint

    seen = {}
    for path in posteriors:
        r = load_posteriors(path)
        seen[int(r["resolution"])] = int(r["crop"]) if "crop" in r else None
    crops = []
    for path in checkpoints:
        res = int(load_checkpoint(path)[1]["resolution"])
        if res not in seen:
            raise ValueError(f"{path}: a {res} px model, but no --posteriors file is of {res} px "
                             f"(have {sorted(seen)})")
        crops.append(seen[res])
    return crops


def ensemble(paths: list[str], per_class_dir: str | None = None) -> dict:
    """Errors of each model and of the average of their posteriors (per class in per_class_dir)."""
    runs = {}
    for path in paths:
        r = load_posteriors(path)
        runs[str(int(r["resolution"])) if "resolution" in r else Path(path).parent.name] = r
    if len(runs) != len(paths):
        raise ValueError(f"two posterior files have the same resolution: {paths}")
    _, labels, probs = align(runs)
    mean = np.mean(np.stack(list(probs.values())), axis=0)  # (M, N, K) -> (N, K)
    if per_class_dir:
        classes = [str(c) for c in next(iter(runs.values()))["classes"]]
        write_per_class(mean, labels, classes, per_class_dir, f"average of {len(probs)} models, validation")
    errors = lambda p: {"top1_error": topk_error(p, labels, 1), "top5_error": topk_error(p, labels, 5)}
    return {"models": {name: errors(p) for name, p in sorted(probs.items(), key=lambda kv: int(kv[0]))},
            "ensemble": errors(mean), "samples": int(len(labels))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--posteriors", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="*", default=[], help="model.pt of each resolution: logged "
                   "and registered as one pyfunc model, --registered-name")
    p.add_argument("--registered-name", default=None,
                   help="registered name of the ensemble (default: <experiment>-ensemble)")
    p.add_argument("--shards", nargs="*", default=[], help="val shard folder of each --models entry "
                   "(its stored size is the model's input preprocessing)")
    p.add_argument("--per-class-dir", default=None, help="folder for per_class.tsv and confusion.png")
    tracking.add_args(p)
    args = p.parse_args(argv)
    try:
        with tracking.stage_run(args, "ensemble", {"posteriors": args.posteriors}) as run:
            result = ensemble(args.posteriors, args.per_class_dir)
            crops = evaluated_crops(args.posteriors, args.models) if args.models else []
            # before registering: the champion's error is believed from this run's metric
            flat = {f"{k}_{name}": v for name, m in result["models"].items() for k, v in m.items()}
            run.log_metrics({**flat, **result["ensemble"]})
            if args.models:
                result["registered"] = log_ensemble(run, args.models, args.shards,
                                                           result["ensemble"]["top1_error"], crops,
                                                           args.registered_name)
            write_json(args.out, result)
            for name in ("per_class.tsv", "confusion.png") if args.per_class_dir else ():
                run.log_artifact(Path(args.per_class_dir) / name, "per_class")
            run.log_artifact(args.out)
    except (ValueError, KeyError, OSError) as e:
        sys.exit(f"ensemble: {e}")
    print(f"ensemble: {result}")


if __name__ == "__main__":
    main()
