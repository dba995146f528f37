"""FoodX-251: its class list and CSV indexes read strictly, and small generated copies.

    train_set/, val_set/ (flat image folders), annot/class_list.txt,
    annot/train_info.csv, annot/val_info.csv (headerless `<file>,<label>`)

The val split is the test split (the official test labels are not public).
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
from kd.data.spec import DatasetSpec
from kd.data.synthetic import Recipe, plan, synthetic_image, write_lines

FOODX_SPLITS = {
    "train": ("train_set", "annot/train_info.csv"),
    "test": ("val_set", "annot/val_info.csv"),
}


def check(spec: DatasetSpec) -> list[str]:
    """The missing folders and index files of a FoodX root."""
    problems = require_root(spec.root, "FoodX-251")
    if problems:
        return problems
    needed = ["annot/class_list.txt", *(n for pair in FOODX_SPLITS.values() for n in pair)]
    return require_files(Path(spec.root), needed, "FoodX-251")


def read_classes(spec: DatasetSpec) -> list[str]:
    """The names of `annot/class_list.txt`, whose labels must run 0, 1, ..."""
    path = Path(spec.root) / "annot" / "class_list.txt"
    names = []
    for number, line in index_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or parts[0] != str(len(names)):
            raise bad_line(path, number, line, f"'{len(names)} <class name>' (labels 0, 1, ...)")
        names.append(parts[1])
    return names


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split's images and labels, every CSV line checked."""
    root = Path(spec.root)
    classes = read_classes(spec)
    folder, csv_name = FOODX_SPLITS[split]
    csv_path = root / csv_name
    files = ExistingFiles()
    samples = []
    for number, line in index_lines(csv_path):
        parts = line.split(",")
        expected = "'<image file name>,<label 0..250>'"
        if len(parts) != 2 or not parts[0]:
            raise bad_line(csv_path, number, line, expected)
        label = parse_int(parts[1], csv_path, number, line, expected)
        check_label(label, len(classes), csv_path, f"line {number}", base=0)
        image = root / folder / parts[0]
        require_image(files, image, csv_path, f"line {number}")
        samples.append((str(image), label))
    return SplitIndex(samples, classes)


def write(root: Path, recipe: Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """Real FoodX-251 layout: flat image folders and headerless `<file>,<label>` CSVs."""
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for split, label, _ in plan(recipe, num_classes):
        folder, _csv = FOODX_SPLITS[split]
        prefix = folder.split("_")[0]
        name = f"{prefix}_{len(rows[split]):06d}.jpg"
        target = root / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(label, recipe.image_size, rng).save(target, quality=90)
        rows[split].append(f"{name},{label}")
    for split, lines in rows.items():
        write_lines(root / FOODX_SPLITS[split][1], lines)
    write_lines(root / "annot" / "class_list.txt", [f"{i} food_{i}" for i in range(num_classes)])
