"""Each dataset name's on-disk layout reader (`LAYOUTS`), and the checks of a copy built on them.

A `Layout` says how to check a root cheaply, how to read its class list and its index files, and
how to write a small learnable copy in the same layout (so that tests and `--smoke` runs exercise
the exact code that reads the real data). The facts about each name (classes, description, roots)
are in `kd.data.registry`; this module adds the code that reads and writes copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.data import cifar10, cub, cub_dogs, dogs, fashion_mnist, foodx, imagefolder
from kd.data.index_files import SplitIndex
from kd.data.registry import DATASETS, TEXT_INDEXED, TWO_ROOT_DATASETS, unknown_name_message
from kd.data.spec import SPLITS, DatasetError, DatasetSpec
from kd.data.synthetic import Recipe

CopyWriter = Callable[[Path, Recipe, np.random.Generator], None]


@dataclass(frozen=True)
class Layout:
    """The code that reads and writes one dataset name's on-disk layout."""

    check: Callable[[DatasetSpec], list[str]]
    classes: Callable[[DatasetSpec], list[str]]
    index: Callable[[DatasetSpec, str], SplitIndex]
    write: CopyWriter  # a generated copy into a folder (its roots: the registry's `copy_roots`)


def _whole_copy(writer: Callable) -> CopyWriter:
    """A single-root layout's writer, writing all of the recipe's classes into the folder."""

    def write(folder: Path, recipe: Recipe, rng: np.random.Generator) -> None:
        writer(folder, recipe, recipe.num_classes, rng)

    return write


LAYOUTS: dict[str, Layout] = {
    "cub": Layout(cub.check, cub.read_classes, cub.read_index, _whole_copy(cub.write)),
    "dogs": Layout(dogs.check, dogs.read_classes, dogs.read_index, _whole_copy(dogs.write)),
    "cub_dogs": Layout(
        cub_dogs.check, cub_dogs.read_classes, cub_dogs.read_index, cub_dogs.write_copy
    ),
    "foodx": Layout(foodx.check, foodx.read_classes, foodx.read_index, _whole_copy(foodx.write)),
    "cifar10": Layout(
        cifar10.check, cifar10.read_classes, cifar10.read_index, _whole_copy(cifar10.write)
    ),
    "fashion_mnist": Layout(
        fashion_mnist.check,
        fashion_mnist.read_classes,
        fashion_mnist.read_index,
        _whole_copy(fashion_mnist.write),
    ),
    "imagefolder": Layout(
        imagefolder.check,
        imagefolder.read_classes,
        imagefolder.read_index,
        _whole_copy(imagefolder.write),
    ),
}
if LAYOUTS.keys() != DATASETS.keys():  # the registry names a dataset no layout reads, or back
    raise ImportError(f"kd.data: layouts {sorted(LAYOUTS)} != registry {sorted(DATASETS)}")


def get_layout(name: str) -> Layout:
    """The layout of `name`; an unknown name lists the valid ones."""
    if name not in LAYOUTS:
        raise DatasetError(unknown_name_message(name))
    return LAYOUTS[name]


def check_dataset(spec: DatasetSpec, *, index: bool = False) -> list[str]:
    """Every problem with `spec` that can be seen without opening images; [] when usable.

    Cheap, so the grid validator can run it for every dataset copy before submitting anything.
    Without `index`, only existence checks. With `index`, the class list and both splits' index
    files are also parsed exactly as training will read them (a malformed line, a label out of
    range, a listed image that is missing: named by file and line), still without decoding an
    image: the index of CUB-200-2011 (11,788 images) is checked in well under a second. Never
    raises.
    """
    if spec.name not in LAYOUTS:
        return [unknown_name_message(spec.name)]
    problems = []
    if spec.dogs_root is not None and not DATASETS[spec.name].needs_dogs_root:
        problems.append(
            f"dataset {spec.name!r} does not use dogs_root ({spec.dogs_root}); "
            f"remove it or use the dataset {' or '.join(map(repr, TWO_ROOT_DATASETS))}."
        )
    layout = LAYOUTS[spec.name]
    try:
        problems += layout.check(spec)
        if index and not problems:
            layout.classes(spec)
            if spec.name in TEXT_INDEXED:
                for split in SPLITS:
                    layout.index(spec, split)
    except DatasetError as err:
        problems.append(str(err))
    except Exception as err:  # e.g. permission denied: report it, the validator must go on
        problems.append(f"{spec.name}: cannot inspect {spec.root}: {err!r}; check the path.")
    return problems


def checked_layout(spec: DatasetSpec) -> Layout:
    """The layout of a usable `spec`; a `DatasetError` listing every problem otherwise."""
    problems = check_dataset(spec)
    if problems:
        raise DatasetError("\n".join(problems))
    return LAYOUTS[spec.name]


def num_classes(spec: DatasetSpec) -> int:
    """Number of classes from the class list or index files, without decoding any image."""
    return len(checked_layout(spec).classes(spec))
