"""The loader and decode benchmarks' source: ImageNet-like JPEG photographs of 300-500 px made
from the synthetic dataset, in ImageNet layout, and the source description the shard stage reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from deepimage import synthetic
from deepimage.config import defaults

PACKAGES = ["torch", "torchvision", "numpy", "pillow", "simplejpeg", "pyarrow"]  # versions in the JSON
CROP_MARGIN = defaults().shard.crop_margin
SEED = 0


def _source_image(job: tuple[str, int, int]) -> None:
    """One ImageNet-like JPEG: a synthetic image scaled to a random 300-500 px frame, plus grain."""
    root, split_index, total = job
    spec = synthetic.SyntheticSpec(seed=SEED, classes=12, train_per_class=max(1, total // 12),
                                   val_per_class=1)
    pixels, label = synthetic.render(spec, "train", split_index)
    rng = np.random.default_rng(split_index)
    w, h = (int(v) for v in rng.integers(300, 501, size=2))
    img = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    img += rng.normal(0, 4, img.shape)                                   # sensor grain at full size
    out = Path(root) / "train" / synthetic.class_names(12)[label] / f"{split_index:06d}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=90)


def make_source(root: Path, images: int, workers: int) -> None:
    """`images` JPEGs in <root>/train/<class>/ (only a train split: that is what is timed)."""
    per_class = max(1, images // 12)
    jobs = [(str(root), i, per_class * 12) for i in range(per_class * 12)]
    from multiprocessing import get_context

    with get_context("spawn").Pool(workers) as pool:
        pool.map(_source_image, jobs, chunksize=16)


def source_json(work: Path, images: int, workers: int) -> Path:
    """The source folder under <work>/source and the source description the shard stage reads."""
    make_source(work / "source", images, workers)
    out = work / "source.json"
    out.write_text(json.dumps({"root": str(work / "source"), "classes": synthetic.class_names(12)}))
    return out
