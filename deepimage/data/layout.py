"""The ImageNet folder layout (`<root>/<split>/<class>/*`): which files are samples, in which order.

Rules, shared by the dataset and shard stages so both count the same files:
- class folders are the non-hidden folders directly under `<root>/<split>/`;
- samples are the non-hidden files anywhere below a class folder (hidden = name starts with
  '.', at any level); files directly under `<root>/<split>/` are outside every class and ignored;
- samples are sorted by their path relative to `<root>/<split>/` (POSIX separators); the
  index in that order is the sample id, so it is the same at every resolution;
- a class folder without any sample is an error that names it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad input data or layout; the message names the file or folder and what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One candidate image: its id, label and path relative to the split folder."""

    sample_id: int
    label: int
    relpath: str


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of one split."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder missing (expected ImageNet layout "
                        "<root>/{train,val}/<class>/*)")
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name))


def _class_files(class_dir: Path, split_dir: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]   # prune hidden folders
        for f in filenames:
            p = Path(dirpath) / f
            if not is_hidden(f) and p.is_file():
                out.append(p.relative_to(split_dir).as_posix())
    return out


def list_samples(split_dir: Path, classes: list[str]) -> list[Sample]:
    """Every candidate file of the split in sample-id order; an empty class is an error."""
    rel: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = _class_files(split_dir / name, split_dir)
        if not files:
            raise DataError(f"{split_dir / name}: empty class folder (no image files); "
                            "remove it or add images")
        rel += [(f, label) for f in files]
    rel.sort()
    return [Sample(i, label, path) for i, (path, label) in enumerate(rel)]


def check_layout(root: str | Path) -> tuple[list[str], dict[str, int]]:
    """Class names (sorted) and sample counts per split of an ImageNet-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root}: no {' or '.join(m + '/' for m in missing)} folder "
                        "(expected ImageNet layout <root>/{train,val}/<class>/*)")
    per_split = {s: list_classes(root / s) for s in SPLITS}
    for a, b in (("train", "val"), ("val", "train")):
        only = sorted(set(per_split[a]) - set(per_split[b]))
        if only:
            raise DataError(f"{root}: class folder(s) {only} in {a}/ but missing from {b}/")
    classes = per_split["train"]
    if not classes:
        raise DataError(f"{root}/train: no class folders")
    counts = {s: len(list_samples(root / s, classes)) for s in SPLITS}
    return classes, counts
