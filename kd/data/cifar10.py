"""CIFAR-10 (python pickles): its batches read and checked, and small generated copies.

    cifar-10-batches-py/ batches.meta, data_batch_1..5, test_batch

The images stay in memory as one uint8 array (`ArrayImages`); the root may be the
`cifar-10-batches-py` folder or the folder holding it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kd.data.images import ArrayImages
from kd.data.index_files import SplitIndex, check_label, require_files, require_root
from kd.data.spec import DatasetError, DatasetSpec
from kd.data.synthetic import Recipe, plan, synthetic_image

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_SIDE = 32


def _cifar_dir(root: str) -> Path:
    """Accept the folder that contains `cifar-10-batches-py` or that folder itself."""
    nested = Path(root) / CIFAR_DIR
    return nested if nested.is_dir() else Path(root)


def check(spec: DatasetSpec) -> list[str]:
    """The missing batches of a CIFAR-10 root."""
    problems = require_root(spec.root, "CIFAR-10")
    if problems:
        return problems
    folder = _cifar_dir(spec.root)
    needed = ["batches.meta", *CIFAR_TRAIN_BATCHES, "test_batch"]
    if not any((folder / name).exists() for name in needed):
        return [
            f"CIFAR-10: neither {Path(spec.root) / CIFAR_DIR} nor {spec.root} holds the python "
            "batches; extract cifar-10-python.tar.gz and point `root` at it."
        ]
    return require_files(folder, needed, "CIFAR-10")


def _unpickle(path: Path) -> dict:
    """The real batches were pickled by Python 2: bytes keys, hence encoding='bytes'."""
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
    except FileNotFoundError as err:
        raise DatasetError(f"{path} is missing; re-extract cifar-10-python.tar.gz.") from err
    except Exception as err:  # unpickling a damaged file raises almost any type
        raise DatasetError(f"cannot unpickle {path}: {err}; re-extract it.") from err
    if not isinstance(content, dict):
        raise DatasetError(f"{path} does not hold a CIFAR batch dict; re-extract it.")
    return content


def _field(batch: dict, key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DatasetError(f"{path} has no '{key}' entry; it is not a CIFAR-10 python batch.")


def read_classes(spec: DatasetSpec) -> list[str]:
    """The label names of `batches.meta`."""
    path = _cifar_dir(spec.root) / "batches.meta"
    names = _field(_unpickle(path), "label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    batch = _unpickle(path)
    data = np.asarray(_field(batch, "data", path))
    labels = [int(v) for v in _field(batch, "labels", path)]
    row = 3 * CIFAR_SIDE * CIFAR_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row or len(data) != len(labels):
        raise DatasetError(
            f"{path}: expected uint8 data [N, {row}] with N labels, got {data.dtype} "
            f"{list(data.shape)} with {len(labels)} labels; re-extract it."
        )
    for number, label in enumerate(labels, start=1):
        check_label(label, num_classes, path, f"entry {number}", base=0)
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return images, labels


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split's images (in memory) and labels, every batch checked."""
    folder = _cifar_dir(spec.root)
    classes = read_classes(spec)
    names = CIFAR_TRAIN_BATCHES if split == "train" else ("test_batch",)
    batches = [_read_batch(folder / name, len(classes)) for name in names]
    images = np.ascontiguousarray(np.concatenate([b[0] for b in batches]))
    labels = [label for b in batches for label in b[1]]
    return SplitIndex(list(enumerate(labels)), classes, ArrayImages(images))


def write(root: Path, recipe: Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """Real CIFAR-10 python layout (always 32 x 32: the format fixes it; `image_size` is ignored)."""
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for split, label, _ in plan(recipe, num_classes):
        pixels = np.asarray(synthetic_image(label, CIFAR_SIDE, rng))
        rows[split].append((pixels.transpose(2, 0, 1).reshape(-1), label))
    train_parts = [
        rows["train"][i :: len(CIFAR_TRAIN_BATCHES)] for i in range(len(CIFAR_TRAIN_BATCHES))
    ]
    for name, part in [
        *zip(CIFAR_TRAIN_BATCHES, train_parts, strict=True),
        ("test_batch", rows["test"]),
    ]:
        _pickle(folder / name, _batch_dict(name, part))
    meta = {
        b"num_cases_per_batch": len(train_parts[0]),
        b"label_names": [f"thing_{i}".encode() for i in range(num_classes)],
        b"num_vis": 3 * CIFAR_SIDE * CIFAR_SIDE,
    }
    _pickle(folder / "batches.meta", meta)


def _batch_dict(name: str, rows: list[tuple[np.ndarray, int]]) -> dict[bytes, Any]:
    row = 3 * CIFAR_SIDE * CIFAR_SIDE
    data = np.stack([r for r, _ in rows]) if rows else np.zeros((0, row), dtype=np.uint8)
    return {
        b"batch_label": name.encode(),
        b"labels": [label for _, label in rows],
        b"data": data.astype(np.uint8),
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(rows))],
    }


def _pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)
