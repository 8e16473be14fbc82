"""The recorded multi-seed study (deepimage/bench/recipes/measured.yaml, written from
deepimage.bench.multiscale's output) beside the paper, as Markdown lines for a results page.

    python -m deepimage.bench.study            # prints the table and the verdicts
    lines = study_lines(yaml.safe_load(MEASURED.read_text()))
"""
from __future__ import annotations

import statistics
from pathlib import Path

import yaml

from deepimage.report import PAPER, pct
from deepimage.stats import paired, sample_sd

# The multi-seed study's recorded per-seed errors (README: Multi-scale).
MEASURED = Path(__file__).resolve().parent / "recipes" / "measured.yaml"


def _claim(gap: dict, n: int) -> str:
    """One claim on one set: reproduced or not, by how much, against both spread criteria."""
    wins = sum(g > 0 for g in gap["per_seed"])
    both = gap["beats_paired_spread"] and gap["beats_model_spread"]
    verdict = ("reproduced" if both else "not reproduced" if gap["mean"] <= 0 or wins < n / 2
               else "in the paper's direction but not beyond the seed spread")
    return (f"{verdict}: {100 * gap['mean']:+.2f} points (sd {100 * gap['sd']:.2f}), in {wins} of {n} seeds; "
            f"beats the paired spread: {'yes' if gap['beats_paired_spread'] else 'no'}, each model's spread: "
            f"{'yes' if gap['beats_model_spread'] else 'no'}")


def _control(c: dict, res: list[str]) -> str:
    """One set's seed-pair control (deepimage.bench.multiscale.seed_control) in one sentence: the
    two-resolution average against the better resolution's average of two training seeds (and,
    with 4+ seeds, two models per resolution against four of the better resolution). "Lower" or
    "higher" only when the means differ by more than the sd of the seed averages they are held
    against; otherwise "within the spread of"."""
    mean = lambda key: statistics.fmean(c[key])

    def against(mine: str, other: str) -> str:
        diff, sd = mean(other) - mean(mine), sample_sd(c[other])
        word = "lower than" if diff > sd else "higher than" if diff < -sd else "within the spread of"
        return f"{pct(mean(mine))}, {word} {pct(mean(other))} (sd {100 * sd:.2f}, {len(c[other])} averages)"
    lo, hi = res[0], res[-1]
    best = min(lo, hi, key=lambda r: mean(f"same_{r}"))
    text = (f"the average of {lo} and {hi} px ({len(c['mixed'])} seeds) {against('mixed', f'same_{best}')} "
            f"of two {best} px models of different training seeds")
    if "mixed_x2" in c:
        best4 = min(lo, hi, key=lambda r: mean(f"same_{r}_x4"))
        gain = c["mixed_x2_gain"]
        text += (f"; two models of each resolution {against('mixed_x2', f'same_{best4}_x4')} of four {best4} px "
                 f"models, and beat their best member by {100 * statistics.fmean(gain):+.2f} points "
                 f"(sd {100 * sample_sd(gain):.2f})")
    return text


def study_lines(measured: dict) -> list[str]:
    """The multi-seed study beside the paper: one column per dataset (mean top-1 (sd); top-5 over
    the seeds) and, per claim and dataset, one sentence saying whether it was reproduced."""
    sets = measured["sets"]
    runs = [{int(k): {m: {"top1_error": v[0], "top5_error": v[1]} for m, v in r.items()}
             for k, r in st["per_seed"].items()} for st in sets]
    res = sorted((k for k in next(iter(runs[0].values())) if k != "ensemble"), key=int)
    head = " | ".join(f"{st['name']} ({st['val_images']} val, {len(r)} seeds)" for st, r in zip(sets, runs))
    rows = [f"| model | {head} | paper, top-5 (ImageNet) |", "| --- " * (len(sets) + 2) + "|"]
    for model, role in ((res[0], "low"), (res[-1], "high"), ("ensemble", "ensemble")):
        cells = []
        for r in runs:
            t1, t5 = ([x[model][m] for x in r.values()] for m in ("top1_error", "top5_error"))
            sd = sample_sd(t1)
            cells.append(f"{pct(statistics.fmean(t1))} (sd {100 * sd:.2f}); top-5 {pct(statistics.fmean(t5))}")
        name = "average of both" if model == "ensemble" else f"{model} x {model}"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {PAPER[role][0]}: {pct(PAPER[role][1])} |")
    claims = []
    for key, text in (("resolution", f"Higher resolution beats lower (paper: {pct(PAPER['low'][1])} -> "
                                     f"{pct(PAPER['high'][1])} top-5)"),
                      ("ensemble", f"The average beats every single model (paper: {pct(PAPER['high'][1])} -> "
                                   f"{pct(PAPER['ensemble'][1])})")):
        claims.append(f"- {text}:")
        claims += [f"  - {st['name']}: {_claim(paired(r)[key], len(r))}"
                   + (f" ({st['note']})." if st.get("note") else ".") for st, r in zip(sets, runs)]
    controls = [f"  - {st['name']}: {_control(st['seed_control'], res)}." for st in sets if st.get("seed_control")]
    if controls:  # a second model of any kind also helps: is the gain the resolutions' own?
        claims += ["- Control for the average (the same set and models; pairs share seeds, so their spread "
                   "is not that of independent runs):", *controls]
    return ["## Multi-scale over seeds (python -m deepimage.bench.multiscale)", "",
            f"Top-1 error, mean over seeds (sample sd); {measured['recipe']}. Per-seed errors and commands: "
            f"`deepimage/bench/recipes/measured.yaml` (README, Multi-scale recipes). Gaps are paired per seed, "
            "in points, positive when the claim holds; beyond the spread means every seed's gap > 0 and the "
            "mean > 2 sd of the gap (paired), and the mean > each single model's sd over seeds.", "",
            *rows, "", *claims, ""]


def main() -> None:
    print("\n".join(study_lines(yaml.safe_load(MEASURED.read_text()))))


if __name__ == "__main__":
    main()
