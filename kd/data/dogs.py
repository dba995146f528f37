"""Stanford Dogs: its MATLAB split lists read strictly, and small generated copies in its layout.

Images/<synset-breed>/*.jpg, lists/train_list.mat, lists/test_list.mat
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kd.data.index_files import (
    ExistingFiles,
    SplitIndex,
    check_label,
    require_files,
    require_image,
    require_root,
)
from kd.data.spec import DatasetError, DatasetSpec
from kd.data.synthetic import Recipe, plan, synthetic_image

DOGS_LISTS = {"train": "lists/train_list.mat", "test": "lists/test_list.mat"}


def check(spec: DatasetSpec, key: str = "root") -> list[str]:
    """The missing folders and lists of the Dogs root, `spec.root` or `spec.dogs_root` (`key`)."""
    root = spec.dogs_root if key == "dogs_root" else spec.root
    problems = require_root(root, "Stanford Dogs", key)
    if problems:
        return problems
    return require_files(Path(root), ["Images", *DOGS_LISTS.values()], "Stanford Dogs")


def classes_at(root: Path) -> list[str]:
    """Breed folders, sorted: the real lists number them 1..120 in this order."""
    images = root / "Images"
    try:
        return sorted(entry.name for entry in os.scandir(images) if entry.is_dir())
    except OSError as err:
        raise DatasetError(
            f"cannot list {images}: {err}; extract Images.tar into the Stanford Dogs root."
        ) from err


def _mat_field(mat: dict, name: str, path: Path) -> np.ndarray:
    if name not in mat:
        raise DatasetError(
            f"{path} has no '{name}' field (has {sorted(k for k in mat if not k.startswith('__'))}); "
            "re-extract lists.tar from the Stanford Dogs archive."
        )
    return np.asarray(mat[name]).reshape(-1)


def _mat_string(cell: Any) -> str:
    """A MATLAB cell entry as loadmat returns it (array(['a/b.jpg'])) -> 'a/b.jpg'."""
    value = np.asarray(cell).reshape(-1)
    return str(value[0]) if value.size else ""


def _read_list(path: Path) -> list[tuple[str, int]]:
    """(relative path, 1-based label) pairs from a `train_list.mat` / `test_list.mat`."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except FileNotFoundError as err:
        raise DatasetError(f"{path} is missing; extract lists.tar into the root.") from err
    except Exception as err:  # scipy raises several unrelated types for a corrupt .mat
        raise DatasetError(f"cannot read {path} as a MATLAB file: {err}; re-extract it.") from err
    files, labels = _mat_field(mat, "file_list", path), _mat_field(mat, "labels", path)
    if len(files) != len(labels):
        raise DatasetError(
            f"{path}: file_list has {len(files)} entries but labels has {len(labels)}; re-extract it."
        )
    pairs = []
    for number, (cell, label) in enumerate(zip(files, labels, strict=True), start=1):
        relpath = _mat_string(cell)
        if not relpath or float(label) != int(label):
            raise DatasetError(
                f"{path} entry {number}: expected a relative path and an integer label, "
                f"got {relpath!r} and {label!r}; re-extract the file."
            )
        pairs.append((relpath, int(label)))
    return pairs


def samples_at(root: Path, split: str, offset: int = 0) -> tuple[list, list[str]]:
    """(samples, breeds) of one split of the Dogs copy at `root`; labels start at `offset`."""
    classes = classes_at(root)
    list_file = root / DOGS_LISTS[split]
    files = ExistingFiles()
    samples = []
    for number, (relpath, label) in enumerate(_read_list(list_file), start=1):
        check_label(label, len(classes), list_file, f"entry {number}", base=1)
        breed = relpath.split("/", 1)[0]
        if breed != classes[label - 1]:
            raise DatasetError(
                f"{list_file} entry {number}: {relpath} has label {label}, which is breed "
                f"folder {classes[label - 1]!r} under Images/; the list and the folders disagree."
            )
        image = root / "Images" / relpath
        require_image(files, image, list_file, f"entry {number}")
        samples.append((str(image), label - 1 + offset))
    return samples, classes


def read_classes(spec: DatasetSpec) -> list[str]:
    """The breeds, in label order."""
    return classes_at(Path(spec.root))


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split's images and 0-based labels, every entry checked."""
    samples, classes = samples_at(Path(spec.root), split)
    return SplitIndex(samples, classes)


def write(
    root: Path, recipe: Recipe, num_classes: int, rng: np.random.Generator, colour_offset: int = 0
) -> None:
    """Real Stanford Dogs layout, lists as MATLAB cells exactly as `scipy.io.loadmat` reads them."""
    from scipy.io import savemat

    breeds = [f"n{2085620 + i:08d}-Breed_{i + 1}" for i in range(num_classes)]
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for number, (split, label, _) in enumerate(plan(recipe, num_classes), start=1):
        synset = breeds[label].split("-", 1)[0]
        relpath = f"{breeds[label]}/{synset}_{number}.jpg"
        target = root / "Images" / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(label + colour_offset, recipe.image_size, rng).save(target, quality=90)
        lists[split].append((relpath, label + 1))
    (root / "lists").mkdir(parents=True, exist_ok=True)
    for split, entries in lists.items():
        savemat(str(root / DOGS_LISTS[split]), _dogs_mat(entries))


def _dogs_mat(entries: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """N x 1 cell arrays of strings and an N x 1 label column, as in the real lists."""
    files = np.empty((len(entries), 1), dtype=object)
    annotations = np.empty((len(entries), 1), dtype=object)
    for row, (relpath, _) in enumerate(entries):
        files[row, 0] = np.array([relpath])
        annotations[row, 0] = np.array([relpath.rsplit(".", 1)[0]])
    labels = np.array([[label] for _, label in entries], dtype=np.uint8)
    return {"file_list": files, "annotation_list": annotations, "labels": labels}
