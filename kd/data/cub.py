"""CUB-200-2011: its index files read strictly, and small generated copies in its layout.

images.txt, image_class_labels.txt, train_test_split.txt (`<image id> <value>` lines),
classes.txt, images/<class>/*.jpg
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd.data.index_files import (
    ExistingFiles,
    SplitIndex,
    bad_line,
    check_label,
    index_lines,
    parse_int,
    require_files,
    require_image,
    require_root,
)
from kd.data.spec import DatasetError, DatasetSpec
from kd.data.synthetic import Recipe, plan, synthetic_image, write_lines

CUB_INDEX = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def check(spec: DatasetSpec) -> list[str]:
    """The missing index files and folders of a CUB root."""
    problems = require_root(spec.root, "CUB-200-2011")
    return problems or require_files(Path(spec.root), [*CUB_INDEX, "images"], "CUB-200-2011")


def _id_lines(path: Path, expected: str) -> dict[int, tuple[str, int]]:
    """`<id> <value>` lines as {id: (value, line number)}; bad or repeated ids name the line."""
    values: dict[int, tuple[str, int]] = {}
    for number, line in index_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise bad_line(path, number, line, expected)
        image_id = parse_int(parts[0], path, number, line, expected)
        if image_id in values:
            raise DatasetError(f"{path} line {number}: id {image_id} is listed twice.")
        values[image_id] = (parts[1], number)
    return values


def _labels(root: Path) -> dict[int, tuple[int, int]]:
    """{image id: (1-based label, line number)} from image_class_labels.txt."""
    path = root / "image_class_labels.txt"
    expected = "'<image id> <class label 1..200>'"
    labels = {}
    for image_id, (text, number) in _id_lines(path, expected).items():
        labels[image_id] = (parse_int(text, path, number, f"{image_id} {text}", expected), number)
    return labels


def read_classes(spec: DatasetSpec) -> list[str]:
    """Names from `classes.txt` when present (it is in the real archive), else numbered names."""
    root = Path(spec.root)
    names_file = root / "classes.txt"
    if names_file.exists():
        names = _id_lines(names_file, "'<class id> <class name>'")
        if sorted(names) != list(range(1, len(names) + 1)):
            raise DatasetError(f"{names_file}: class ids must be 1..{len(names)} with no gaps.")
        return [names[i][0] for i in range(1, len(names) + 1)]
    count = max((label for label, _ in _labels(root).values()), default=0)
    return [f"class_{i:03d}" for i in range(1, count + 1)]


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split's images and 0-based labels, every line checked."""
    root = Path(spec.root)
    classes = read_classes(spec)
    images_file, labels_file = root / "images.txt", root / "image_class_labels.txt"
    split_file = root / "train_test_split.txt"
    paths = _id_lines(images_file, "'<image id> <relative image path>'")
    labels = _labels(root)
    in_train = _id_lines(split_file, "'<image id> <1 for train, 0 for test>'")
    wanted = "1" if split == "train" else "0"
    files = ExistingFiles()
    samples = []
    for image_id, (relpath, number) in paths.items():
        for table, path in ((labels, labels_file), (in_train, split_file)):
            if image_id not in table:
                raise DatasetError(
                    f"{path} has no entry for image id {image_id} ({images_file} line {number}); "
                    "re-extract the index files."
                )
        flag, flag_line = in_train[image_id]
        if flag not in ("0", "1"):
            raise bad_line(split_file, flag_line, f"{image_id} {flag}", "1 (train) or 0 (test)")
        if flag != wanted:
            continue
        label, label_line = labels[image_id]
        check_label(label, len(classes), labels_file, f"line {label_line}", base=1)
        image = root / "images" / relpath
        require_image(files, image, images_file, f"line {number}")
        samples.append((str(image), label - 1))
    return SplitIndex(samples, classes)


def write(root: Path, recipe: Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """Real CUB layout; the first train and test image of each class is greyscale (mode L)."""
    classes = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(num_classes)]
    images, labels, splits = [], [], []
    for image_id, (split, label, i) in enumerate(plan(recipe, num_classes), start=1):
        relpath = f"{classes[label]}/Bird_{label + 1}_{image_id:04d}.jpg"
        target = root / "images" / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(label, recipe.image_size, rng, grey=i == 0).save(target, quality=90)
        images.append(f"{image_id} {relpath}")
        labels.append(f"{image_id} {label + 1}")
        splits.append(f"{image_id} {1 if split == 'train' else 0}")
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", splits)
    write_lines(root / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(classes)])
