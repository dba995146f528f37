"""The datasets kdgrid knows, by name: the one place their facts are written down.

The config schema (`data.dataset`, `evaluate.cluster`), the readers of each on-disk layout, the
generated copies of `--smoke` and the benchmarks all take the names and facts from here, so a
dataset is added or changed here and nowhere else. Light on purpose (no torch, PIL or numpy):
`kd.config`, which the light commands import, reads it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about one dataset name without reading any copy of it."""

    description: str  # the on-disk layout a root must hold
    num_classes: int | None  # classes of the real dataset; None: whatever the copy holds
    clusterable: bool  # `evaluate.cluster` can embed and cluster its test split (one root)
    # The index is small text/MATLAB files, so `check_dataset(index=True)` parses them. A CIFAR-10
    # "index" is the pixel data itself (180 MB of pickles): only its class list is read.
    text_indexed: bool
    needs_dogs_root: bool = False  # a second root, `data.dogs_root`: the Stanford Dogs copy
    # Where a generated copy (`generate_dataset`, `--smoke`) puts its root and its dogs_root,
    # relative to the copy's folder.
    copy_roots: tuple[str, str | None] = (".", None)

    def roots_in(self, folder: Path) -> tuple[str, str | None]:
        """(root, dogs_root) of a generated copy in `folder`."""
        main, dogs = self.copy_roots
        return str(folder / main), str(folder / dogs) if dogs else None


DATASETS: dict[str, DatasetInfo] = {
    "cub": DatasetInfo(
        "CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, images/",
        num_classes=200,
        clusterable=True,
        text_indexed=True,
    ),
    "dogs": DatasetInfo(
        "Stanford Dogs: Images/<synset-breed>/*.jpg, lists/train_list.mat, lists/test_list.mat",
        num_classes=120,
        clusterable=True,
        text_indexed=True,
    ),
    "cub_dogs": DatasetInfo(
        "CUB-200-2011 (root) + Stanford Dogs (dogs_root); dog labels follow the CUB labels",
        num_classes=320,
        clusterable=False,  # needs two roots: cluster cub and dogs instead
        text_indexed=True,
        needs_dogs_root=True,
        copy_roots=("cub", "dogs"),
    ),
    "foodx": DatasetInfo(
        "FoodX-251: train_set/, val_set/, annot/*.csv; the val split is the test split "
        "(the official test labels are not public)",
        num_classes=251,
        clusterable=True,
        text_indexed=True,
    ),
    "cifar10": DatasetInfo(
        "CIFAR-10 python batches (root is cifar-10-batches-py or the folder holding it)",
        num_classes=10,
        clusterable=True,
        text_indexed=False,
    ),
    "fashion_mnist": DatasetInfo(
        "Fashion-MNIST IDX files: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or uncompressed); 28x28 grey, "
        "read as RGB (apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)",
        num_classes=10,
        clusterable=True,
        text_indexed=False,
    ),
    "imagefolder": DatasetInfo(
        "<root>/train/<class>/*, <root>/test/<class>/* (or val/)",
        num_classes=None,
        clusterable=True,
        text_indexed=True,
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
# Datasets whose test split `evaluate.cluster` can cluster.
CLUSTER_DATASETS: tuple[str, ...] = tuple(n for n, d in DATASETS.items() if d.clusterable)
TEXT_INDEXED: tuple[str, ...] = tuple(n for n, d in DATASETS.items() if d.text_indexed)
TWO_ROOT_DATASETS: tuple[str, ...] = tuple(n for n, d in DATASETS.items() if d.needs_dogs_root)


def unknown_name_message(name: str) -> str:
    """What is wrong with a dataset name that is not in `DATASETS`, with the closest valid one."""
    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return f"unknown dataset {name!r}{hint} Valid names: {', '.join(sorted(DATASETS))}."
