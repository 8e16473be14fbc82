"""The pipeline a PyTorch user would write: torchvision's ImageFolder + transforms.v2 in a
DataLoader, the baseline of deepimage.bench.loader.

    dl = torchvision_loader(folder_dataset(split_dir, resolution=256, stored=288), 64, workers=2)
    n = torchvision_epoch(dl)                                     # images delivered

The paper's augmentations by their nearest transforms.v2 equivalents, in the tensor pipeline
the torchvision documentation recommends (ToImage first, uint8 until the dtype conversion):
- stored square + random crop: Resize(stored) (shorter side, antialiased) + RandomCrop(res);
- flip: RandomHorizontalFlip(); rotation: RandomRotation(train.augment.rotation_deg, bilinear);
- colour cast (up to 20 levels per channel): ColorJitter(brightness=0.15, saturation=0.15);
- vignetting, lens distortion: nothing in transforms.v2, so this pipeline does less work;
then ToDtype(float32, scale=True) and Normalize(ImageNet mean, std). ImageFolder opens each
file with PIL; the DataLoader batches with its default collate, one thread per worker, and keeps its
workers from epoch to epoch (persistent_workers).
"""
from __future__ import annotations

import sys

import torch

from deepimage.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

_OPS = []   # keeps the stand-in operator schemas registered (see import_torchvision)


def import_torchvision():
    """torchvision, also where its C++ operators cannot load.

    PyPI's torchvision wheel is built against CUDA torch; next to the CPU build of the same
    torch its C++ extension does not load, and `import torchvision` then stops while
    registering fake kernels for the detection operators nms and qnms. Datasets and
    transforms.v2 need none of the C++ operators, so where that happens the two operator
    schemas are declared (without kernels) and the import is retried. torchvision.io's decoders
    stay unavailable there.
    """
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _OPS.append(lib)
    import torchvision
    return torchvision


def transform(resolution: int, stored: int, augment: AugmentConfig | None = None):
    """The transforms.v2 pipeline: a PIL image -> float32 (3, res, res), normalized."""
    import_torchvision()
    from torchvision.transforms import InterpolationMode, v2

    cfg = augment or AugmentConfig()
    return v2.Compose([
        v2.ToImage(),                                               # PIL -> uint8 (3, H, W)
        v2.Resize(stored, antialias=True),                          # shorter side -> stored
        v2.RandomCrop(resolution),                                  # -> (3, res, res)
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(cfg.rotation_deg, interpolation=InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=0.15, saturation=0.15),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])


def folder_dataset(split_dir, resolution: int, stored: int):
    """torchvision.datasets.ImageFolder over an ImageNet-layout split, with `transform`."""
    import_torchvision()
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(split_dir), transform=transform(resolution, stored))


def torchvision_loader(ds, batch: int, workers: int):
    """A plain shuffling DataLoader; its workers persist across epochs, as the Arrow loader's do."""
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def torchvision_epoch(dl, _epoch: int = 0) -> int:
    """One epoch; returns the images delivered."""
    return sum(len(labels) for _, labels in dl)
