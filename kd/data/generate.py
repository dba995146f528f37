"""Small learnable copies of a dataset in its real on-disk layout (`generate_dataset`), for tests
and `--smoke` runs, written so that a copy is never half there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kd.data.layouts import get_layout
from kd.data.registry import DATASETS
from kd.data.spec import DatasetError, DatasetSpec
from kd.data.synthetic import Recipe

MARKER = ".kdgrid_generated.json"


def generate_dataset(
    name: str,
    root: str | Path,
    *,
    num_classes: int = 4,
    train_per_class: int = 6,
    test_per_class: int = 3,
    image_size: int = 48,
    seed: int = 0,
) -> DatasetSpec:
    """Write a small learnable copy of `name` in its real on-disk layout under `root`.

    Tests and `--smoke` runs read it through the same code as the real data. Idempotent: a
    marker written last records the parameters, and a complete copy with the same parameters is
    reused. The copy is built in a temporary sibling folder and renamed into place, so an
    interrupted or concurrent run never leaves a half-written copy behind a marker. For
    `cub_dogs`, `num_classes` is split between a CUB copy in `root/cub` and a Dogs copy in
    `root/dogs`.
    """
    layout = get_layout(name)
    info = DATASETS[name]
    minimum = 2 if info.needs_dogs_root else 1  # a class in each root at least
    if num_classes < minimum or min(train_per_class, test_per_class) < 1 or image_size < 8:
        raise ValueError(
            f"generate_dataset({name!r}) needs num_classes >= {minimum}, at least one image "
            "per class and split, and image_size >= 8."
        )
    recipe = Recipe(name, num_classes, train_per_class, test_per_class, image_size, seed)
    root = Path(root).absolute()
    if _marker(root) == asdict(recipe):
        return _generated_spec(root)
    _refuse_foreign(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the copy may be shared with other users
    try:
        layout.write(staging, recipe, np.random.default_rng(seed))
        marker = {"recipe": asdict(recipe), "roots": list(info.copy_roots)}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        _move_into_place(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if _marker(root) != asdict(recipe):
        raise DatasetError(f"another process wrote a different generated copy into {root}.")
    return _generated_spec(root)


def _marker(root: Path) -> dict | None:
    """The parameters of the generated copy at `root`, or None when there is none."""
    try:
        return json.loads((root / MARKER).read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _generated_spec(root: Path) -> DatasetSpec:
    marker = json.loads((root / MARKER).read_text())
    main, dogs = marker["roots"]
    return DatasetSpec(
        marker["recipe"]["name"],
        str((root / main).resolve()),
        str((root / dogs).resolve()) if dogs else None,
    )


def _refuse_foreign(root: Path) -> None:
    """Only our own copies (with a marker) are replaced: never delete a user's folder."""
    if root.is_dir() and any(root.iterdir()) and _marker(root) is None:
        raise DatasetError(
            f"{root} is not empty and holds no generated copy ({MARKER}); "
            "choose an empty or new folder for generate_dataset."
        )


def _move_into_place(staging: Path, root: Path) -> None:
    """Swap the staged copy in; when another process won the race, keep theirs."""
    if _marker(root) is not None:
        shutil.rmtree(root)  # our own copy with other parameters
    elif root.is_dir():
        root.rmdir()  # empty, as _refuse_foreign checked
    try:
        staging.rename(root)
    except OSError:
        if _marker(root) is None:
            raise
