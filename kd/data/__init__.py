"""Datasets in their real on-disk layouts, small generated copies of them, timm transforms, loaders.

    registry     the dataset names and their facts (classes, roots, layout); no torch
    spec         DatasetSpec, DatasetError, the splits; no torch
    index_files  strict reading of index files, shared by the layouts
    cub, dogs, cub_dogs, foodx, cifar10, imagefolder
                 one on-disk layout each: its checks, its readers, its generated copies
    layouts      the layout of each name; check_dataset, num_classes
    images       decoding one image to RGB
    synthetic    the parameters and learnable images of generated copies
    generate     generate_dataset: the small copies of tests and --smoke
    loaders      load_split (LabeledImages: seeded augmentations, skip_corrupt), build_loader
    cache        the test split's uint8 cache (cache_split)
    transforms   train/eval transforms, BatchNormalize, mixup/CutMix

Importing `kd.data` is light: the registry and the spec are imported at once, every other name
below on first use (`from kd.data import load_split` imports torch then), so that the config and
the light commands can name datasets without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kd.data.registry import (
    CLUSTER_DATASETS,
    DATASET_NAMES,
    DATASETS,
    TEXT_INDEXED,
    DatasetInfo,
)
from kd.data.spec import SPLITS, DatasetError, DatasetSpec, Split

if TYPE_CHECKING:
    from kd.data.cache import TransformCache, cache_split
    from kd.data.generate import MARKER, generate_dataset
    from kd.data.images import ArrayImages, open_rgb
    from kd.data.layouts import LAYOUTS, Layout, check_dataset, get_layout, num_classes
    from kd.data.loaders import LabeledImages, build_loader, load_split, seed_worker
    from kd.data.transforms import BatchNormalize, NormalizedBatches, build_mixup, build_transforms

# name -> the submodule it is imported from on first use
LAZY_EXPORTS = {
    "TransformCache": "cache",
    "cache_split": "cache",
    "MARKER": "generate",
    "generate_dataset": "generate",
    "ArrayImages": "images",
    "open_rgb": "images",
    "LAYOUTS": "layouts",
    "Layout": "layouts",
    "check_dataset": "layouts",
    "get_layout": "layouts",
    "num_classes": "layouts",
    "LabeledImages": "loaders",
    "build_loader": "loaders",
    "load_split": "loaders",
    "seed_worker": "loaders",
    "BatchNormalize": "transforms",
    "NormalizedBatches": "transforms",
    "build_mixup": "transforms",
    "build_transforms": "transforms",
}

__all__ = [
    "CLUSTER_DATASETS",
    "DATASETS",
    "DATASET_NAMES",
    "SPLITS",
    "TEXT_INDEXED",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "Split",
    "TransformCache",
    "cache_split",
    "MARKER",
    "generate_dataset",
    "ArrayImages",
    "open_rgb",
    "LAYOUTS",
    "Layout",
    "check_dataset",
    "get_layout",
    "num_classes",
    "LabeledImages",
    "build_loader",
    "load_split",
    "seed_worker",
    "BatchNormalize",
    "NormalizedBatches",
    "build_mixup",
    "build_transforms",
]


def __getattr__(name: str) -> Any:
    """Import a name of `LAZY_EXPORTS` from its submodule the first time it is asked for."""
    if name not in LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{LAZY_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *LAZY_EXPORTS})
