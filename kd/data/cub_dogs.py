"""CUB + Stanford Dogs as one dataset: CUB classes first, then the dog breeds.

`root` is the CUB copy and `dogs_root` the Dogs copy; a generated copy holds both side by side
(the registry's `copy_roots`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd.data import cub, dogs
from kd.data.index_files import SplitIndex
from kd.data.registry import DATASETS
from kd.data.spec import DatasetSpec
from kd.data.synthetic import Recipe


def check(spec: DatasetSpec) -> list[str]:
    """The problems of both roots."""
    return cub.check(spec) + dogs.check(spec, key="dogs_root")


def read_classes(spec: DatasetSpec) -> list[str]:
    """CUB's classes, then the breeds."""
    return cub.read_classes(spec) + dogs.classes_at(Path(str(spec.dogs_root)))


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split of both copies; dog labels follow the CUB labels."""
    cub_split = cub.read_index(spec, split)
    dog_samples, dog_classes = dogs.samples_at(
        Path(str(spec.dogs_root)), split, offset=len(cub_split.classes)
    )
    return SplitIndex(cub_split.samples + dog_samples, cub_split.classes + dog_classes)


def write_copy(folder: Path, recipe: Recipe, rng: np.random.Generator) -> None:
    """Splits `num_classes` between the CUB copy (the larger half) and the Dogs copy beside it."""
    cub_classes = (recipe.num_classes + 1) // 2
    cub_part, dogs_part = DATASETS["cub_dogs"].copy_roots
    cub.write(folder / cub_part, recipe, cub_classes, rng)
    dogs.write(folder / str(dogs_part), recipe, recipe.num_classes - cub_classes, rng, cub_classes)
