"""The classifier a registered model is: each resolution's network with its test-time
preprocessing, averaged as the paper does, built from a model's weights and JSON alone.

    ens = Ensemble.from_files(json.loads(spec_text), {"model_32px": "artifacts/model.pt", ...})
    probs = ens.posteriors(stack_views([ens.decode(path) for path in paths], len(ens.members)))

Input preprocessing is the evaluation path's: decode_square to the stored size of the shards the
model was trained on, centre crop to what evaluation fed the model (its resolution, or the whole
stored image under evaluate.view: whole), ImageNet normalize.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from deepimage.data.augment import center_crop, normalize
from deepimage.data.decode import BadImage, decode_square, open_file
from deepimage.modelfile import load_checkpoint

TOPK = 5
# What one request to a served model may hold: above these it is refused before any decoding.
MAX_REQUEST_IMAGES = 256
MAX_IMAGE_BYTES = 20 * 2**20
_IN_MEMORY = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # in PIL's error messages


def member_crop(resolution: int, stored_size: int, crop: int | None = None) -> int:
    """The side a member centre-crops its stored image to (None: its resolution); ValueError
    when it is not between the two."""
    crop = int(crop or resolution)
    if not resolution <= crop <= stored_size:
        raise ValueError(f"a {resolution} px model stored at {stored_size} px sees {resolution}..{stored_size} px, "
                         f"not {crop} px")
    return crop


@dataclass
class Member:
    """One resolution's network and its test-time preprocessing: decoded at stored_size (as its
    shards were), centre-cropped to `crop` (None: the resolution it was trained at)."""

    model: torch.nn.Module
    resolution: int
    stored_size: int
    crop: int | None = None

    def __post_init__(self):
        self.crop = member_crop(self.resolution, self.stored_size, self.crop)
        # Channels-last weights and inputs: on CPU, NCHW max-pooling alone took half of a batch's
        # forward (6-16x slower than channels-last); posteriors stay within 1.1e-6 of evaluation's.
        self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def posteriors(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S, 3) decoded at stored_size -> softmax (N, K)."""
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)           # (N, 3, S, S), channels-last strides
        x = normalize(center_crop(x, self.crop))                   # (N, 3, crop, crop) float, same strides
        return torch.softmax(self.model(x.contiguous(memory_format=torch.channels_last)), dim=1)


class Ensemble:
    """Members averaged as the paper does: mean of the softmax posteriors of every resolution."""

    def __init__(self, members: list[Member], classes: list[str], checkpoints: list[str] | None = None):
        self.members, self.classes = members, list(classes)
        self.checkpoints = checkpoints or []  # the model.pt files the members were loaded from

    @classmethod
    def from_files(cls, spec: dict, files: dict[str, str]) -> "Ensemble":
        """spec {classes, members: [{artifact, resolution, stored_size, crop}]}, files {artifact:
        model.pt}: each member's weights read as plain data (load_checkpoint), never as code."""
        members, paths = [], []
        for m in spec["members"]:
            path = files[m["artifact"]]
            model, ckpt = load_checkpoint(path)
            if list(ckpt["classes"]) != list(spec["classes"]) or int(ckpt["resolution"]) != int(m["resolution"]):
                raise ValueError(f"{path}: its classes or resolution differ from the model's description")
            members.append(Member(model, int(m["resolution"]), int(m["stored_size"]), m.get("crop")))
            paths.append(str(path))
        return cls(members, spec["classes"], paths)

    @property
    def stored_sizes(self) -> list[int]:
        return [m.stored_size for m in self.members]

    def decode(self, source: str | bytes) -> list[np.ndarray]:
        """One image (path or encoded bytes) -> its (S_m, S_m, 3) view per member; BadImage."""
        return decode_views(source, self.stored_sizes)

    def posteriors(self, views: list[np.ndarray]) -> np.ndarray:
        """views[m]: uint8 (N, S_m, S_m, 3) -> averaged posteriors (N, K), one forward per member."""
        probs = [m.posteriors(v) for m, v in zip(self.members, views)]   # M x (N, K)
        return torch.stack(probs).mean(dim=0).numpy()                     # (M, N, K) -> (N, K)

    def top(self, probs: np.ndarray, k: int = TOPK) -> list[list[tuple[str, float]]]:
        """Per row, the k best (class name, probability), best first."""
        order = np.argsort(-probs, axis=1)[:, :min(k, probs.shape[1])]   # (N, k)
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order)]

    def frame(self, probs: np.ndarray):
        """The pyfunc answer: one row per image (top-1, top-5 names and probabilities, posteriors)."""
        tops = self.top(probs)
        return pd.DataFrame({"top1_class": [t[0][0] for t in tops],
                             "top1_prob": [t[0][1] for t in tops],
                             "top5_classes": [[c for c, _ in t] for t in tops],
                             "top5_probs": [[p for _, p in t] for t in tops],
                             "posteriors": [row.astype(float).tolist() for row in probs]})

    def answer(self, model_input: pd.DataFrame) -> pd.DataFrame:
        """A served request (an `image` column of encoded bytes) -> frame; ValueError naming the
        row for an undecodable image, and for a request over MAX_REQUEST_IMAGES / MAX_IMAGE_BYTES."""
        if "image" not in getattr(model_input, "columns", []):
            raise ValueError("input needs an 'image' column of encoded image bytes")
        if len(model_input) > MAX_REQUEST_IMAGES:
            raise ValueError(f"{len(model_input)} images in one request, at most {MAX_REQUEST_IMAGES}: "
                             "send them in several requests")
        images = [bytes(data) for data in model_input["image"]]
        for i, data in enumerate(images):
            if len(data) > MAX_IMAGE_BYTES:
                raise ValueError(f"row {i}: {len(data)} bytes, over the {MAX_IMAGE_BYTES} byte limit of one "
                                 "image: send a smaller file")
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(self.decode(data))
            except BadImage as e:
                raise ValueError(f"row {i}: not a decodable image ({e})") from None
        return self.frame(self.posteriors(stack_views(decoded, len(self.members))))


def decode_views(source: str | bytes, stored_sizes: list[int]) -> list[np.ndarray]:
    """The image decoded once per distinct stored size, exactly as the shard stage did (each
    size has its own JPEG draft scale, so one decode cannot serve two sizes exactly). A file is
    read once, through open_file; BadImage when it cannot be read or does not decode."""
    if not isinstance(source, bytes):
        with open_file(source) as f:     # a regular file within the size limit, or BadImage
            source = f.read()
    data = source
    try:
        cache = {s: decode_square(data, s) for s in sorted(set(stored_sizes))}
    except BadImage as e:  # the reason a path would give: without the in-memory file's address
        raise BadImage(_IN_MEMORY.sub("", str(e))) from None
    return [cache[s] for s in stored_sizes]


def stack_views(decoded: list[list[np.ndarray]], members: int) -> list[np.ndarray]:
    """Per-image lists of member views -> per-member batches (N, S_m, S_m, 3)."""
    return [np.stack([d[m] for d in decoded]) for m in range(members)]
