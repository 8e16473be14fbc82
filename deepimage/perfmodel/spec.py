"""The performance model's fixed inputs: the models it validates and projects, where the
hardware files are, and its error."""
from __future__ import annotations

from pathlib import Path

# The FC-heavy benchmark model (deepimage.bench.train_step imports it from here): few conv FLOPs,
# 73 MiB of FC gradients, the case where gradient traffic, not compute, sets the step time. It runs
# at the lowest of `resolutions`, the scale training starts at.
FC_HEAVY = {"conv": [[32], [64], [128, 128]], "fc_hidden": [4096, 4096]}
# The paper's widths on our network: a 16-layer VGG-style trunk (Wu et al. 2015, sec. 4: "a basic
# configuration has 16 layers and is similar with VGG's work") and 4096-wide FC layers, 1000 classes.
PAPER = {"conv": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
         "fc_hidden": [4096, 4096], "num_classes": 1000}
HARDWARE_DIR = Path(__file__).resolve().parent.parent / "hardware"
FLOAT_BYTES = 4


class PerfModelError(ValueError):
    """A bad hardware file or missing input (the message names it and the fix)."""
