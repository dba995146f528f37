"""Strict reading of index files, shared by the layouts: what a layout reads for one split
(`SplitIndex`), and the checks that name the file and line of anything that cannot be used.

Index files are read strictly: a malformed line, a label out of range or a listed image that is
missing raises `DatasetError` naming the file and line, because a silently skipped line would make
a results table wrong without anyone noticing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from kd.data.images import open_rgb
from kd.data.spec import DatasetError


@dataclass
class SplitIndex:
    """What a layout reads for one split, before it becomes a `LabeledImages`."""

    samples: list[tuple[Any, int]]
    classes: list[str]
    loader: Callable[[Any], Image.Image] = open_rgb


def require_files(root: Path, names: Sequence[str], what: str) -> list[str]:
    """One sentence per missing file or folder under `root`."""
    return [
        f"{what}: {root / name} is missing; point the root at the extracted {what} dataset "
        "(the folder that holds it) or re-extract the archive there."
        for name in names
        if not (root / name).exists()
    ]


def require_root(root: str | None, what: str, key: str = "root") -> list[str]:
    """One sentence when `root` (the config key `key`) is not given or is not a folder."""
    if not root:
        return [f"{what}: no {key} given; set it to the folder holding the extracted dataset."]
    if not Path(root).is_dir():
        return [
            f"{what}: root {root} does not exist or is not a folder; "
            f"set `{key}` to the extracted dataset."
        ]
    return []


def index_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; a missing file is a DatasetError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DatasetError(f"{path} is missing; re-extract the dataset archive.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {path}: {err}; re-extract the dataset archive.") from err
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.strip()


def bad_line(path: Path, number: int, line: str, expected: str) -> DatasetError:
    """The error for a line of `path` that is not what `expected` describes."""
    return DatasetError(
        f"{path} line {number}: expected {expected}, got {line!r}; "
        "fix the line or re-extract the file from the dataset archive."
    )


def parse_int(text: str, path: Path, number: int, line: str, expected: str) -> int:
    """`text` as an int, or the `bad_line` error for its line."""
    try:
        return int(text)
    except ValueError:
        raise bad_line(path, number, line, expected) from None


def check_label(label: int, num_classes: int, path: Path, where: str, base: int) -> None:
    """Labels are range-checked where they are read, so a bad one names its file and line."""
    if not base <= label < num_classes + base:
        raise DatasetError(
            f"{path} {where}: label {label} is outside {base}..{num_classes + base - 1} "
            f"({num_classes} classes); fix the index file."
        )


class ExistingFiles:
    """Answers "does this image exist?" with one directory listing per folder, not one stat per
    image: FoodX lists ~120k images in one folder, and stat is slow on cluster filesystems."""

    def __init__(self) -> None:
        self._listed: dict[Path, set[str]] = {}

    def __contains__(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._listed:
            try:
                self._listed[folder] = set(os.listdir(folder))
            except OSError:
                self._listed[folder] = set()
        return path.name in self._listed[folder]


def require_image(files: ExistingFiles, path: Path, index_file: Path, where: str) -> None:
    """The error for an image that `index_file` lists at `where` but that does not exist."""
    if path not in files:
        raise DatasetError(
            f"{index_file} {where} lists image {path}, which does not exist; "
            "re-extract the images or remove the entry from the index."
        )
