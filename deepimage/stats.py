"""The multi-seed statistics of the multi-scale claims: the sample sd over seeds and the paired
gaps per seed with their verdicts against the seed spread (deepimage.bench.multiscale prints them,
deepimage.bench.study renders the recorded study with them).

    gaps = paired({0: {"32": {"top1_error": 0.30}, "64": {"top1_error": 0.20},
                       "ensemble": {"top1_error": 0.15}}, 1: {...}})
    gaps["resolution"]["mean"], gaps["ensemble"]["beats_paired_spread"]
"""
from __future__ import annotations

import statistics


def sample_sd(values: list[float]) -> float:
    """Sample sd over seeds (n - 1), as every multi-seed figure quotes it; 0 for one seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired(per_seed: dict[int, dict]) -> dict:
    """Paired gaps in top-1 error per seed, positive when the claim holds: `ensemble`, best single
    model minus the average; `resolution`, lowest minus highest resolution. Each gap beats the
    spread (a) when every seed's gap is > 0 and the mean gap > 2 sd of the gap, and (b) when the
    mean gap > every single model's sd of its error over the seeds. sd: sample sd (n - 1), 0 for
    one seed. When every seed has the benchmark's `errors`, `ensemble_best_weight` is the ensemble
    gap of the best fixed weight of the two members (picked on val: a bound on what reweighting
    could reach, not a claim), under the same criteria."""
    runs = list(per_seed.values())
    res = sorted((k for k in runs[0] if k.isdigit()), key=int)
    best = [min(r[m]["top1_error"] for m in res) for r in runs]
    gaps = {"ensemble": [b - r["ensemble"]["top1_error"] for b, r in zip(best, runs)],
            "resolution": [r[res[0]]["top1_error"] - r[res[-1]]["top1_error"] for r in runs]}
    if all("best_weight_wrong" in r.get("errors", {}) for r in runs):
        gaps["ensemble_best_weight"] = [b - r["errors"]["best_weight_wrong"] / r["errors"]["val"]
                                        for b, r in zip(best, runs)]
    model_sd = {m: sample_sd([r[m]["top1_error"] for r in runs]) for m in res + ["ensemble"]}
    out = {"model_sd": model_sd}
    for name, g in gaps.items():
        mean = statistics.fmean(g)
        out[name] = {"per_seed": g, "mean": mean, "sd": sample_sd(g),
                     "beats_paired_spread": all(x > 0 for x in g) and mean > 2 * sample_sd(g),
                     "beats_model_spread": all(mean > v for m, v in model_sd.items() if m != "ensemble")}
    return out
