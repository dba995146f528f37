"""Fashion-MNIST in its published IDX format (Debian's `dataset-fashion-mnist` puts it under
/usr/share/datasets/fashion-mnist), its reader, and small generated copies.

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   60,000 images
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    10,000 images

Each file may also be stored uncompressed (without `.gz`). The 28 x 28 grey images stay in
memory as one uint8 array (`ArrayImages`), and are handed to the transforms as RGB, so that
timm models with 3 input channels take them unchanged.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from kd.data.images import ArrayImages
from kd.data.index_files import SplitIndex, check_label, require_root
from kd.data.spec import DatasetError, DatasetSpec
from kd.data.synthetic import Recipe, plan, synthetic_image

CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIDE = 28
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # ubyte data, 3 or 1 dimensions


def _path(root: str, name: str) -> Path | None:
    """The file `name` under `root`, gzipped or not; None when neither exists."""
    for candidate in (Path(root) / f"{name}.gz", Path(root) / name):
        if candidate.is_file():
            return candidate
    return None


def check(spec: DatasetSpec) -> list[str]:
    """The missing IDX files of a Fashion-MNIST root."""
    problems = require_root(spec.root, "Fashion-MNIST")
    if problems:
        return problems
    return [
        f"Fashion-MNIST: {Path(spec.root) / name}.gz (or {name}) is missing; point `root` at "
        "the folder holding the four IDX files (apt-get install dataset-fashion-mnist puts "
        "them in /usr/share/datasets/fashion-mnist)."
        for pair in FILES.values()
        for name in pair
        if _path(spec.root, name) is None
    ]


def read_classes(spec: DatasetSpec) -> list[str]:
    """The dataset's published class names (the format stores none), as many as the labels
    use: all ten for the real data, fewer for a generated copy. Reads the two label files
    (70 kB), not the images."""
    highest = -1
    for split in FILES:
        path = _path(spec.root, FILES[split][1])
        if path is None:
            raise DatasetError("\n".join(check(spec)))
        labels = _read_idx(path, LABELS_MAGIC, 1)
        highest = max(highest, int(labels.max()) if len(labels) else -1)
    if highest >= len(CLASSES):
        raise DatasetError(f"{spec.root}: label {highest} is outside 0..9; reinstall the dataset.")
    return list(CLASSES[: highest + 1])


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """One IDX file as a uint8 array of `dims` dimensions, its header checked."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(f"cannot read {path}: {err}; reinstall or re-download it.") from err
    header = 4 + 4 * dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DatasetError(f"{path} is not an IDX file of {dims}-dimensional uint8 data.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(data) - header != int(np.prod(shape)):
        raise DatasetError(
            f"{path}: the header says {shape} but the file holds {len(data) - header} bytes; "
            "it is truncated: reinstall or re-download it."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split's images (in memory, [N, 28, 28]) and labels, both files checked."""
    images_name, labels_name = FILES[split]
    images_path, labels_path = _path(spec.root, images_name), _path(spec.root, labels_name)
    if images_path is None or labels_path is None:
        raise DatasetError("\n".join(check(spec)))
    images = _read_idx(images_path, IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
            "reinstall the dataset."
        )
    classes = read_classes(spec)
    if len(labels) and int(labels.max()) >= len(classes):
        position = int(np.argmax(labels >= len(classes)))
        check_label(int(labels[position]), len(classes), labels_path, f"entry {position}", 0)
    return SplitIndex(list(enumerate(labels.tolist())), classes, ArrayImages(images))


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def write(root: Path, recipe: Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """The real IDX layout, gzipped, 28 x 28 grey (the format fixes the size: `image_size` is
    ignored); at most 10 classes, the dataset's own."""
    if num_classes > len(CLASSES):
        raise ValueError(f"a Fashion-MNIST copy has at most {len(CLASSES)} classes")
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for split, label, _ in plan(recipe, num_classes):
        rows[split].append((np.asarray(synthetic_image(label, SIDE, rng, grey=True)), label))
    for split, (images_name, labels_name) in FILES.items():
        images = np.stack([image for image, _ in rows[split]])
        labels = np.array([label for _, label in rows[split]], dtype=np.uint8)
        _write_idx(root / f"{images_name}.gz", images, IMAGES_MAGIC)
        _write_idx(root / f"{labels_name}.gz", labels, LABELS_MAGIC)
