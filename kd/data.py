"""Datasets in their real on-disk layouts, small generated copies of them, timm transforms, loaders.

Each dataset name maps to a `Layout` in `DATASETS`: how to check a root cheaply, how to read its
class list and its index files, and how to write a small learnable copy in the same layout (so that
tests and `--smoke` runs exercise the exact code that reads the real data).

Index files are read strictly: a malformed line, a label out of range or a listed image that is
missing raises `DatasetError` naming the file and line, because a silently skipped line would make
a results table wrong without anyone noticing.
"""

from __future__ import annotations

import colorsys
import contextlib
import difflib
import json
import math
import mmap
import os
import pickle
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MARKER = ".kdgrid_generated.json"

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_SIDE = 32


def _posterize_at_least_one_bit(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize, with the bit count clamped to Pillow's 1..8.

    timm 1.0.31's RandAugment with magnitude noise (`mstd`) can ask for 0 bits, which Pillow 13
    refuses ("bits must be between or equal to 1 and 8"): about 1 image in 700 would crash a real
    training run. 0 bits would mean a black image anyway; 1 bit is the strongest valid setting.
    """
    return _timm_posterize(img, max(1, int(bits_to_keep)), **kwargs)


def _patch_timm_posterize() -> None:
    import timm.data.auto_augment as auto_augment

    global _timm_posterize
    _timm_posterize = auto_augment.posterize
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_at_least_one_bit


_timm_posterize: Callable[..., Any]
_patch_timm_posterize()


class DatasetError(ValueError):
    """A dataset root, index file or image that cannot be used as it is."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset lives. `dogs_root` is only for `cub_dogs` (then `root` is the CUB root)."""

    name: str
    root: str
    dogs_root: str | None = None


# --------------------------------------------------------------------------------------------
# The dataset every layout returns
# --------------------------------------------------------------------------------------------


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image fully and convert it to RGB (CUB has greyscale, CMYK and palette images)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot decode image {path}: {err}. The file is corrupt or truncated; "
            "replace it from the original archive (or re-extract the dataset), or set "
            "`data.skip_corrupt: true` to leave such images out (they are counted)."
        ) from err


class ArrayImages:
    """Picklable loader for datasets kept in memory as a uint8 [N, H, W, 3] array (CIFAR)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.array[index])  # uint8 [H, W, 3] reads as RGB


class TransformCache:
    """Each image's transformed tensor, kept once computed, for a split whose transform is
    deterministic: the test split (resize + centre crop to a uint8 tensor), read every epoch.

    Decoding and resizing a 500 x 375 test image to 384 px costs a loader worker as much as a
    training image (6.8 vs 6.6 ms); read back from here it is a copy of 0.44 MB. It holds the
    images one process reads (`indices`: its shard of the split). They live in a file in the
    node's temp folder (TMPDIR), reserved in full up front (so a full disk fails here, not as a
    SIGBUS mid-epoch), mapped shared and unlinked at once: loader workers forked later write
    and read the same pages, and nothing is left behind however the process ends. Use
    `cache_split`, which decides whether a cache is possible and worth it.
    """

    def __init__(
        self, indices: Sequence[int], size: int, shape: tuple[int, ...], folder: str | None = None
    ) -> None:
        held = sorted(set(indices))
        self.shape = tuple(shape)
        self.nbytes = len(held) * math.prod(self.shape)
        # index in the split -> slot here (-1: another process's); read-only once made
        self.slots = torch.full((size,), -1, dtype=torch.int64)
        self.slots[torch.tensor(held, dtype=torch.int64)] = torch.arange(len(held))
        fd, path = tempfile.mkstemp(prefix="kdgrid-transform-cache-", dir=folder)
        try:
            os.unlink(path)
            os.posix_fallocate(fd, 0, self.nbytes)
            self._map = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.images = torch.frombuffer(self._map, dtype=torch.uint8).view(len(held), *self.shape)
        self.labels = torch.zeros(len(held), dtype=torch.int64).share_memory_()
        self.filled = torch.zeros(len(held), dtype=torch.uint8).share_memory_()

    def get(self, index: int) -> tuple[torch.Tensor, int] | None:
        slot = int(self.slots[index])
        if slot < 0 or not self.filled[slot]:
            return None
        return self.images[slot].clone(), int(self.labels[slot])  # never a view of the cache

    def put(self, index: int, image: Any, label: int) -> None:
        """Keep `image` if it is one of this process's and a uint8 tensor of the cache's shape
        (anything else is not cached: the transform then runs every time)."""
        slot = int(self.slots[index])
        if (
            slot >= 0
            and isinstance(image, torch.Tensor)
            and image.dtype == torch.uint8
            and tuple(image.shape) == self.shape
        ):
            self.images[slot].copy_(image)
            self.labels[slot] = label
            self.filled[slot] = 1  # last: a reader that sees the flag sees the image


def cache_split(
    loader: DataLoader, shape: tuple[int, ...], *, limit_gb: float, folder: str | None = None
) -> TransformCache | None:
    """Give the loader's dataset a `TransformCache` for the indices this loader reads (with
    Accelerate, this process's shard), before its workers start. None when it is off
    (`limit_gb` 0) or not possible, with a line on stderr saying why: over `limit_gb`, not
    enough free space in the temp folder (1 GiB is kept free), a temp folder in memory (tmpfs:
    the pages would count against the job's memory and could not be reclaimed), workers that
    are not forked (spawn, forkserver: they would not share the map), no posix_fallocate."""
    dataset = loader.dataset
    if limit_gb <= 0 or len(dataset) == 0:
        return None
    batches = loader.batch_sampler if loader.batch_sampler is not None else [range(len(dataset))]
    indices = sorted({int(i) for batch in batches for i in batch})
    nbytes = len(indices) * math.prod(shape)
    folder = folder or tempfile.gettempdir()
    start = loader.multiprocessing_context or torch.multiprocessing.get_start_method()
    start = start if isinstance(start, str) else start.get_start_method()
    fstype = _filesystem_type(folder)
    why = None
    if nbytes > limit_gb * 2**30:
        why = f"{nbytes / 2**30:.1f} GiB, over data.eval_cache_gb={limit_gb:g}"
    elif loader.num_workers > 0 and start != "fork":
        why = f"its loader workers start by {start!r}, not 'fork', and would not share it"
    elif not hasattr(os, "posix_fallocate"):
        why = "this system has no posix_fallocate to reserve its file"
    elif fstype in ("tmpfs", "ramfs"):
        why = f"{folder} is in memory ({fstype}); set TMPDIR to local disk"
    elif nbytes + 2**30 > shutil.disk_usage(folder).free:
        why = f"{nbytes / 2**30:.1f} GiB do not fit in {folder}; set TMPDIR to a larger folder"
    if why is None:
        try:
            dataset.cache = TransformCache(indices, len(dataset), shape, folder)
            return dataset.cache
        except OSError as exc:
            why = f"{nbytes / 2**30:.1f} GiB could not be reserved in {folder}: {exc}"
    print(f"kd.data: the test split is not cached: {why}", file=sys.stderr, flush=True)
    return None


def _filesystem_type(path: str) -> str | None:
    """The type of the filesystem `path` is on (Linux: from /proc/self/mountinfo)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real, best, kind = os.path.realpath(path), "", None
    for line in lines:
        fields = line.split()
        mount, fstype = fields[4], fields[fields.index("-") + 1]
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


class LabeledImages(Dataset):
    """(image, label) pairs; images are RGB PIL images, passed through `transform` when given.

    A corrupt image raises `DatasetError` naming the file, unless `skip_corrupt`: then it is
    left out, the next image of the split takes its place (so batches keep their size, and
    mixup its even batches), and it is flagged in `corrupt`, a tensor in shared memory, so that
    what loader worker processes skipped is seen by the training process (`skipped`).

    With a `cache` (`TransformCache`, for a deterministic transform: the test split) an image
    is loaded and transformed once, then read back from the cache.

    After `seed_augmentations(seed, epoch)` each image's random augmentations depend only on
    (seed, epoch, index): not on which worker process reads it, how many there are, or what
    that worker read before. So loader workers can persist from epoch to epoch and a resumed
    run still augments exactly as the uninterrupted one.
    """

    def __init__(
        self,
        samples: list[tuple[Any, int]],
        classes: list[str],
        loader: Callable[[Any], Image.Image] = open_rgb,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.num_classes = len(classes)
        self.loader = loader
        self.transform = transform
        self.corrupt = (
            torch.zeros(len(samples), dtype=torch.uint8).share_memory_() if skip_corrupt else None
        )
        # (seeded?, seed, epoch), in shared memory from the start: workers forked before the
        # first `seed_augmentations` still see it
        self.augment_seed = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.cache: TransformCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["cache"] = None  # a memory map does not travel by pickle (spawned workers)
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def seed_augmentations(self, seed: int, epoch: int) -> None:
        """Seed every image's augmentations from (seed, epoch, its index) from now on.

        The pair lives in shared memory: call this once before the loader's worker processes
        start, then before each epoch; persistent workers read the epoch it last set. (Not
        named `set_epoch`: Accelerate calls a dataset's `set_epoch` with its own counter.)
        """
        self.augment_seed[1], self.augment_seed[2] = seed % 2**63, epoch  # SeedSequence: >= 0
        self.augment_seed[0] = 1

    @contextlib.contextmanager
    def _seeded(self, index: int) -> Iterator[None]:
        """`random`, numpy and torch seeded for this image (what timm's transforms draw from).
        In the training process itself (no workers) its own streams are restored afterwards,
        so mixup and random erasing draw what they would have drawn."""
        seeded, seed, epoch = self.augment_seed.tolist()
        if not seeded:
            yield
            return
        words = np.random.SeedSequence((seed, epoch, index)).generate_state(2)
        mixed = int(words[0]) << 32 | int(words[1])
        in_worker = get_worker_info() is not None
        saved = (
            None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        )
        random.seed(mixed)
        np.random.seed(int(words[0]))
        torch.default_generator.manual_seed(mixed)  # the CPU's; the GPU's streams are not touched
        try:
            yield
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.cache is not None and (cached := self.cache.get(index)) is not None:
            return cached
        with self._seeded(index):
            image, label = self._item(index)
        if self.cache is not None:
            self.cache.put(index, image, label)
        return image, label

    def _item(self, index: int) -> tuple[Any, int]:
        if self.corrupt is None:
            source, label = self.samples[index]
            image = self.loader(source)
            return (self.transform(image) if self.transform is not None else image), label
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            if self.corrupt[position]:
                continue
            source, label = self.samples[position]
            try:
                image = self.loader(source)
            except DatasetError as err:
                self.corrupt[position] = 1
                print(f"kd.data: skipped (data.skip_corrupt): {err}", file=sys.stderr, flush=True)
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise DatasetError(
            f"all {len(self.samples)} images of the split are corrupt (first: "
            f"{self.samples[0][0] if self.samples else '-'}); re-extract the dataset."
        )

    @property
    def skipped(self) -> list[str]:
        """The images left out as corrupt so far (by any process that shares `corrupt`)."""
        if self.corrupt is None:
            return []
        return [str(self.samples[i][0]) for i in self.corrupt.nonzero().flatten().tolist()]

    @property
    def targets(self) -> list[int]:
        """Labels in sample order (the torchvision name, used by samplers and class counts)."""
        return [label for _, label in self.samples]


@dataclass
class _Index:
    """What a layout reads for one split, before it becomes a `LabeledImages`."""

    samples: list[tuple[Any, int]]
    classes: list[str]
    loader: Callable[[Any], Image.Image] = open_rgb


# --------------------------------------------------------------------------------------------
# Small helpers shared by the layouts
# --------------------------------------------------------------------------------------------


def _require_files(root: Path, names: Sequence[str], what: str) -> list[str]:
    """One sentence per missing file or folder under `root`."""
    return [
        f"{what}: {root / name} is missing; point the root at the extracted {what} dataset "
        "(the folder that holds it) or re-extract the archive there."
        for name in names
        if not (root / name).exists()
    ]


def _require_root(root: str | None, what: str, key: str = "root") -> list[str]:
    if not root:
        return [f"{what}: no {key} given; set it to the folder holding the extracted dataset."]
    if not Path(root).is_dir():
        return [
            f"{what}: root {root} does not exist or is not a folder; "
            f"set `{key}` to the extracted dataset."
        ]
    return []


def _lines(path: Path) -> Iterator[tuple[int, str]]:
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


def _bad_line(path: Path, number: int, line: str, expected: str) -> DatasetError:
    return DatasetError(
        f"{path} line {number}: expected {expected}, got {line!r}; "
        "fix the line or re-extract the file from the dataset archive."
    )


def _parse_int(text: str, path: Path, number: int, line: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad_line(path, number, line, expected) from None


def _check_label(label: int, num_classes: int, path: Path, where: str, base: int) -> None:
    """Labels are range-checked where they are read, so a bad one names its file and line."""
    if not base <= label < num_classes + base:
        raise DatasetError(
            f"{path} {where}: label {label} is outside {base}..{num_classes + base - 1} "
            f"({num_classes} classes); fix the index file."
        )


class _ExistingFiles:
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


def _require_image(files: _ExistingFiles, path: Path, index_file: Path, where: str) -> None:
    if path not in files:
        raise DatasetError(
            f"{index_file} {where} lists image {path}, which does not exist; "
            "re-extract the images or remove the entry from the index."
        )


# --------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------

CUB_INDEX = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def _cub_check(spec: DatasetSpec) -> list[str]:
    problems = _require_root(spec.root, "CUB-200-2011")
    return problems or _require_files(Path(spec.root), [*CUB_INDEX, "images"], "CUB-200-2011")


def _id_lines(path: Path, expected: str) -> dict[int, tuple[str, int]]:
    """`<id> <value>` lines as {id: (value, line number)}; bad or repeated ids name the line."""
    values: dict[int, tuple[str, int]] = {}
    for number, line in _lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise _bad_line(path, number, line, expected)
        image_id = _parse_int(parts[0], path, number, line, expected)
        if image_id in values:
            raise DatasetError(f"{path} line {number}: id {image_id} is listed twice.")
        values[image_id] = (parts[1], number)
    return values


def _cub_labels(root: Path) -> dict[int, tuple[int, int]]:
    """{image id: (1-based label, line number)} from image_class_labels.txt."""
    path = root / "image_class_labels.txt"
    expected = "'<image id> <class label 1..200>'"
    labels = {}
    for image_id, (text, number) in _id_lines(path, expected).items():
        labels[image_id] = (_parse_int(text, path, number, f"{image_id} {text}", expected), number)
    return labels


def _cub_classes(spec: DatasetSpec) -> list[str]:
    """Names from `classes.txt` when present (it is in the real archive), else numbered names."""
    root = Path(spec.root)
    names_file = root / "classes.txt"
    if names_file.exists():
        names = _id_lines(names_file, "'<class id> <class name>'")
        if sorted(names) != list(range(1, len(names) + 1)):
            raise DatasetError(f"{names_file}: class ids must be 1..{len(names)} with no gaps.")
        return [names[i][0] for i in range(1, len(names) + 1)]
    count = max((label for label, _ in _cub_labels(root).values()), default=0)
    return [f"class_{i:03d}" for i in range(1, count + 1)]


def _cub_index(spec: DatasetSpec, split: str) -> _Index:
    root = Path(spec.root)
    classes = _cub_classes(spec)
    images_file, labels_file = root / "images.txt", root / "image_class_labels.txt"
    split_file = root / "train_test_split.txt"
    paths = _id_lines(images_file, "'<image id> <relative image path>'")
    labels = _cub_labels(root)
    in_train = _id_lines(split_file, "'<image id> <1 for train, 0 for test>'")
    wanted = "1" if split == "train" else "0"
    files = _ExistingFiles()
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
            raise _bad_line(split_file, flag_line, f"{image_id} {flag}", "1 (train) or 0 (test)")
        if flag != wanted:
            continue
        label, label_line = labels[image_id]
        _check_label(label, len(classes), labels_file, f"line {label_line}", base=1)
        image = root / "images" / relpath
        _require_image(files, image, images_file, f"line {number}")
        samples.append((str(image), label - 1))
    return _Index(samples, classes)


# --------------------------------------------------------------------------------------------
# Stanford Dogs
# --------------------------------------------------------------------------------------------

DOGS_LISTS = {"train": "lists/train_list.mat", "test": "lists/test_list.mat"}


def _dogs_check(spec: DatasetSpec, key: str = "root") -> list[str]:
    root = spec.dogs_root if key == "dogs_root" else spec.root
    problems = _require_root(root, "Stanford Dogs", key)
    if problems:
        return problems
    return _require_files(Path(root), ["Images", *DOGS_LISTS.values()], "Stanford Dogs")


def _dogs_classes_at(root: Path) -> list[str]:
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


def _dogs_list(path: Path) -> list[tuple[str, int]]:
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


def _dogs_samples(root: Path, split: str, offset: int = 0) -> tuple[list, list[str]]:
    classes = _dogs_classes_at(root)
    list_file = root / DOGS_LISTS[split]
    files = _ExistingFiles()
    samples = []
    for number, (relpath, label) in enumerate(_dogs_list(list_file), start=1):
        _check_label(label, len(classes), list_file, f"entry {number}", base=1)
        breed = relpath.split("/", 1)[0]
        if breed != classes[label - 1]:
            raise DatasetError(
                f"{list_file} entry {number}: {relpath} has label {label}, which is breed "
                f"folder {classes[label - 1]!r} under Images/; the list and the folders disagree."
            )
        image = root / "Images" / relpath
        _require_image(files, image, list_file, f"entry {number}")
        samples.append((str(image), label - 1 + offset))
    return samples, classes


def _dogs_classes(spec: DatasetSpec) -> list[str]:
    return _dogs_classes_at(Path(spec.root))


def _dogs_index(spec: DatasetSpec, split: str) -> _Index:
    samples, classes = _dogs_samples(Path(spec.root), split)
    return _Index(samples, classes)


# --------------------------------------------------------------------------------------------
# CUB + Dogs: CUB classes first, then the dog breeds
# --------------------------------------------------------------------------------------------


def _cub_dogs_check(spec: DatasetSpec) -> list[str]:
    return _cub_check(spec) + _dogs_check(spec, key="dogs_root")


def _cub_dogs_classes(spec: DatasetSpec) -> list[str]:
    return _cub_classes(spec) + _dogs_classes_at(Path(str(spec.dogs_root)))


def _cub_dogs_index(spec: DatasetSpec, split: str) -> _Index:
    cub = _cub_index(spec, split)
    dogs, dog_classes = _dogs_samples(Path(str(spec.dogs_root)), split, offset=len(cub.classes))
    return _Index(cub.samples + dogs, cub.classes + dog_classes)


# --------------------------------------------------------------------------------------------
# FoodX-251
# --------------------------------------------------------------------------------------------

FOODX_SPLITS = {
    "train": ("train_set", "annot/train_info.csv"),
    "test": ("val_set", "annot/val_info.csv"),
}


def _foodx_check(spec: DatasetSpec) -> list[str]:
    problems = _require_root(spec.root, "FoodX-251")
    if problems:
        return problems
    needed = ["annot/class_list.txt", *(n for pair in FOODX_SPLITS.values() for n in pair)]
    return _require_files(Path(spec.root), needed, "FoodX-251")


def _foodx_classes(spec: DatasetSpec) -> list[str]:
    path = Path(spec.root) / "annot" / "class_list.txt"
    names = []
    for number, line in _lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or parts[0] != str(len(names)):
            raise _bad_line(path, number, line, f"'{len(names)} <class name>' (labels 0, 1, ...)")
        names.append(parts[1])
    return names


def _foodx_index(spec: DatasetSpec, split: str) -> _Index:
    root = Path(spec.root)
    classes = _foodx_classes(spec)
    folder, csv_name = FOODX_SPLITS[split]
    csv_path = root / csv_name
    files = _ExistingFiles()
    samples = []
    for number, line in _lines(csv_path):
        parts = line.split(",")
        expected = "'<image file name>,<label 0..250>'"
        if len(parts) != 2 or not parts[0]:
            raise _bad_line(csv_path, number, line, expected)
        label = _parse_int(parts[1], csv_path, number, line, expected)
        _check_label(label, len(classes), csv_path, f"line {number}", base=0)
        image = root / folder / parts[0]
        _require_image(files, image, csv_path, f"line {number}")
        samples.append((str(image), label))
    return _Index(samples, classes)


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# --------------------------------------------------------------------------------------------


def _cifar_dir(root: str) -> Path:
    """Accept the folder that contains `cifar-10-batches-py` or that folder itself."""
    nested = Path(root) / CIFAR_DIR
    return nested if nested.is_dir() else Path(root)


def _cifar_check(spec: DatasetSpec) -> list[str]:
    problems = _require_root(spec.root, "CIFAR-10")
    if problems:
        return problems
    folder = _cifar_dir(spec.root)
    needed = ["batches.meta", *CIFAR_TRAIN_BATCHES, "test_batch"]
    if not any((folder / name).exists() for name in needed):
        return [
            f"CIFAR-10: neither {Path(spec.root) / CIFAR_DIR} nor {spec.root} holds the python "
            "batches; extract cifar-10-python.tar.gz and point `root` at it."
        ]
    return _require_files(folder, needed, "CIFAR-10")


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


def _cifar_classes(spec: DatasetSpec) -> list[str]:
    path = _cifar_dir(spec.root) / "batches.meta"
    names = _field(_unpickle(path), "label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
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
        _check_label(label, num_classes, path, f"entry {number}", base=0)
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return images, labels


def _cifar_index(spec: DatasetSpec, split: str) -> _Index:
    folder = _cifar_dir(spec.root)
    classes = _cifar_classes(spec)
    names = CIFAR_TRAIN_BATCHES if split == "train" else ("test_batch",)
    batches = [_cifar_batch(folder / name, len(classes)) for name in names]
    images = np.ascontiguousarray(np.concatenate([b[0] for b in batches]))
    labels = [label for b in batches for label in b[1]]
    return _Index(list(enumerate(labels)), classes, ArrayImages(images))


# --------------------------------------------------------------------------------------------
# ImageFolder: <root>/train/<class>/*, <root>/test/<class>/* (or val/)
# --------------------------------------------------------------------------------------------


def _imagefolder_split_dir(root: Path, split: str) -> Path:
    if split == "train":
        return root / "train"
    return root / "test" if (root / "test").is_dir() else root / "val"


def _imagefolder_check(spec: DatasetSpec) -> list[str]:
    problems = _require_root(spec.root, "ImageFolder")
    if problems:
        return problems
    root = Path(spec.root)
    if not (root / "train").is_dir():
        problems.append(
            f"ImageFolder: {root / 'train'} is missing; put one folder per class there."
        )
    if not (root / "test").is_dir() and not (root / "val").is_dir():
        problems.append(
            f"ImageFolder: neither {root / 'test'} nor {root / 'val'} exists; "
            "put the evaluation images there, one folder per class."
        )
    return problems


def _class_dirs(folder: Path) -> list[str]:
    try:
        return sorted(
            e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
        )
    except OSError as err:
        raise DatasetError(f"cannot list {folder}: {err}; check the dataset root.") from err


def _imagefolder_classes(spec: DatasetSpec) -> list[str]:
    """Classes are the train split's folders, so train and test share one label numbering."""
    classes = _class_dirs(Path(spec.root) / "train")
    if not classes:
        raise DatasetError(f"{Path(spec.root) / 'train'} has no class folders; add one per class.")
    return classes


def _imagefolder_index(spec: DatasetSpec, split: str) -> _Index:
    classes = _imagefolder_classes(spec)
    folder = _imagefolder_split_dir(Path(spec.root), split)
    label_of = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in _class_dirs(folder):
        if name not in label_of:
            raise DatasetError(
                f"{folder / name} is a class that {Path(spec.root) / 'train'} does not have; "
                "every evaluation class needs a training folder of the same name."
            )
        for entry in sorted(os.scandir(folder / name), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                samples.append((entry.path, label_of[name]))
    if not samples:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return _Index(samples, classes)


# --------------------------------------------------------------------------------------------
# Generated copies: learnable images in each real layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Recipe:
    """The parameters of a generated copy; saved in the marker to make generation idempotent."""

    name: str
    num_classes: int
    train_per_class: int
    test_per_class: int
    image_size: int
    seed: int

    def per_split(self) -> dict[str, int]:
        return {"train": self.train_per_class, "test": self.test_per_class}


def _class_colour(label: int) -> np.ndarray:
    """Well-spread hues (golden-ratio steps) so that classes differ by colour."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.8, 0.9)
    return np.array([r, g, b]) * 255.0


def _synthetic_image(
    label: int, size: int, rng: np.random.Generator, grey: bool = False
) -> Image.Image:
    """A class colour times class-specific stripes, plus noise: a tiny model separates the classes
    in one epoch, also from greyscale copies (the stripes carry the class as well)."""
    axis = np.arange(size) / size
    frequency, vertical = 1 + label % 4, (label // 4) % 2 == 1
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * axis + rng.uniform(0, 0.5))
    stripes = np.tile(
        wave[None, :] if vertical else wave[:, None], (size, 1) if vertical else (1, size)
    )
    pixels = stripes[..., None] * _class_colour(label)[None, None, :] * 0.8 + 30.0
    pixels += rng.normal(0.0, 12.0, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("L") if grey else image


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _plan(recipe: _Recipe, num_classes: int) -> Iterator[tuple[str, int, int]]:
    """(split, class, index within class) for every image of a generated copy."""
    for split, count in recipe.per_split().items():
        for label in range(num_classes):
            for i in range(count):
                yield split, label, i


def _write_cub(root: Path, recipe: _Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """Real CUB layout; the first train and test image of each class is greyscale (mode L)."""
    classes = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(num_classes)]
    images, labels, splits = [], [], []
    for image_id, (split, label, i) in enumerate(_plan(recipe, num_classes), start=1):
        relpath = f"{classes[label]}/Bird_{label + 1}_{image_id:04d}.jpg"
        target = root / "images" / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        _synthetic_image(label, recipe.image_size, rng, grey=i == 0).save(target, quality=90)
        images.append(f"{image_id} {relpath}")
        labels.append(f"{image_id} {label + 1}")
        splits.append(f"{image_id} {1 if split == 'train' else 0}")
    _write_lines(root / "images.txt", images)
    _write_lines(root / "image_class_labels.txt", labels)
    _write_lines(root / "train_test_split.txt", splits)
    _write_lines(root / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(classes)])


def _write_dogs(
    root: Path, recipe: _Recipe, num_classes: int, rng: np.random.Generator, colour_offset: int = 0
) -> None:
    """Real Stanford Dogs layout, lists as MATLAB cells exactly as `scipy.io.loadmat` reads them."""
    from scipy.io import savemat

    breeds = [f"n{2085620 + i:08d}-Breed_{i + 1}" for i in range(num_classes)]
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for number, (split, label, _) in enumerate(_plan(recipe, num_classes), start=1):
        synset = breeds[label].split("-", 1)[0]
        relpath = f"{breeds[label]}/{synset}_{number}.jpg"
        target = root / "Images" / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        _synthetic_image(label + colour_offset, recipe.image_size, rng).save(target, quality=90)
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


def _write_foodx(root: Path, recipe: _Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """Real FoodX-251 layout: flat image folders and headerless `<file>,<label>` CSVs."""
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for split, label, _ in _plan(recipe, num_classes):
        folder, _csv = FOODX_SPLITS[split]
        prefix = folder.split("_")[0]
        name = f"{prefix}_{len(rows[split]):06d}.jpg"
        target = root / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _synthetic_image(label, recipe.image_size, rng).save(target, quality=90)
        rows[split].append(f"{name},{label}")
    for split, lines in rows.items():
        _write_lines(root / FOODX_SPLITS[split][1], lines)
    _write_lines(root / "annot" / "class_list.txt", [f"{i} food_{i}" for i in range(num_classes)])


def _write_cifar(root: Path, recipe: _Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """Real CIFAR-10 python layout (always 32 x 32: the format fixes it; `image_size` is ignored)."""
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for split, label, _ in _plan(recipe, num_classes):
        pixels = np.asarray(_synthetic_image(label, CIFAR_SIDE, rng))
        rows[split].append((pixels.transpose(2, 0, 1).reshape(-1), label))
    train_parts = [
        rows["train"][i :: len(CIFAR_TRAIN_BATCHES)] for i in range(len(CIFAR_TRAIN_BATCHES))
    ]
    for name, part in [
        *zip(CIFAR_TRAIN_BATCHES, train_parts, strict=True),
        ("test_batch", rows["test"]),
    ]:
        _pickle(folder / name, _cifar_batch_dict(name, part))
    meta = {
        b"num_cases_per_batch": len(train_parts[0]),
        b"label_names": [f"thing_{i}".encode() for i in range(num_classes)],
        b"num_vis": 3 * CIFAR_SIDE * CIFAR_SIDE,
    }
    _pickle(folder / "batches.meta", meta)


def _cifar_batch_dict(name: str, rows: list[tuple[np.ndarray, int]]) -> dict[bytes, Any]:
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


def _write_imagefolder(
    root: Path, recipe: _Recipe, num_classes: int, rng: np.random.Generator
) -> None:
    """`train/<class>/*.png` and `test/<class>/*.png` (PNG, so both codecs are exercised)."""
    for split, label, i in _plan(recipe, num_classes):
        target = root / split / f"class_{label}" / f"{split}_{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        _synthetic_image(label, recipe.image_size, rng).save(target)


CUB_DOGS_PARTS = ("cub", "dogs")
Roots = tuple[str, str | None]  # a generated copy's root (and dogs_root), relative to its folder


def _write_single(writer: Callable) -> Callable[[Path, _Recipe, np.random.Generator], Roots]:
    def write(folder: Path, recipe: _Recipe, rng: np.random.Generator) -> Roots:
        writer(folder, recipe, recipe.num_classes, rng)
        return ".", None

    return write


def _write_cub_dogs(folder: Path, recipe: _Recipe, rng: np.random.Generator) -> Roots:
    """Splits `num_classes` between `cub/` (the larger half) and `dogs/` beside it."""
    cub_classes = (recipe.num_classes + 1) // 2
    cub, dogs = CUB_DOGS_PARTS
    _write_cub(folder / cub, recipe, cub_classes, rng)
    _write_dogs(folder / dogs, recipe, recipe.num_classes - cub_classes, rng, cub_classes)
    return cub, dogs


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Everything the module knows about one dataset name."""

    description: str
    check: Callable[[DatasetSpec], list[str]]
    classes: Callable[[DatasetSpec], list[str]]
    index: Callable[[DatasetSpec, str], _Index]
    write: Callable[[Path, _Recipe, np.random.Generator], Roots]


DATASETS: dict[str, Layout] = {
    "cub": Layout(
        "CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, images/",
        _cub_check,
        _cub_classes,
        _cub_index,
        _write_single(_write_cub),
    ),
    "dogs": Layout(
        "Stanford Dogs: Images/<synset-breed>/*.jpg, lists/train_list.mat, lists/test_list.mat",
        _dogs_check,
        _dogs_classes,
        _dogs_index,
        _write_single(_write_dogs),
    ),
    "cub_dogs": Layout(
        "CUB-200-2011 (root) + Stanford Dogs (dogs_root); dog labels follow the CUB labels",
        _cub_dogs_check,
        _cub_dogs_classes,
        _cub_dogs_index,
        _write_cub_dogs,
    ),
    "foodx": Layout(
        "FoodX-251: train_set/, val_set/, annot/*.csv; the val split is the test split "
        "(the official test labels are not public)",
        _foodx_check,
        _foodx_classes,
        _foodx_index,
        _write_single(_write_foodx),
    ),
    "cifar10": Layout(
        "CIFAR-10 python batches (root is cifar-10-batches-py or the folder holding it)",
        _cifar_check,
        _cifar_classes,
        _cifar_index,
        _write_single(_write_cifar),
    ),
    "imagefolder": Layout(
        "<root>/train/<class>/*, <root>/test/<class>/* (or val/)",
        _imagefolder_check,
        _imagefolder_classes,
        _imagefolder_index,
        _write_single(_write_imagefolder),
    ),
}


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return f"unknown dataset {name!r}{hint} Valid names: {', '.join(sorted(DATASETS))}."


def get_layout(name: str) -> Layout:
    """The registry entry for `name`; an unknown name lists the valid ones."""
    if name not in DATASETS:
        raise DatasetError(_unknown_name_message(name))
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


# Layouts whose index is small text/MATLAB files: `check_dataset(index=True)` parses them. A
# CIFAR-10 "index" is the pixel data itself (180 MB of pickles): only its class list is read.
TEXT_INDEXED = ("cub", "dogs", "cub_dogs", "foodx", "imagefolder")


def check_dataset(spec: DatasetSpec, *, index: bool = False) -> list[str]:
    """Every problem with `spec` that can be seen without opening images; [] when usable.

    Cheap, so the grid validator can run it for every dataset copy before submitting anything.
    Without `index`, only existence checks. With `index`, the class list and both splits' index
    files are also parsed exactly as training will read them (a malformed line, a label out of
    range, a listed image that is missing: named by file and line), still without decoding an
    image: the index of CUB-200-2011 (11,788 images) is checked in well under a second. Never
    raises.
    """
    if spec.name not in DATASETS:
        return [_unknown_name_message(spec.name)]
    problems = []
    if spec.dogs_root is not None and spec.name != "cub_dogs":
        problems.append(
            f"dataset {spec.name!r} does not use dogs_root ({spec.dogs_root}); "
            "remove it or use the dataset 'cub_dogs'."
        )
    layout = DATASETS[spec.name]
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


def _checked(spec: DatasetSpec) -> Layout:
    problems = check_dataset(spec)
    if problems:
        raise DatasetError("\n".join(problems))
    return DATASETS[spec.name]


def num_classes(spec: DatasetSpec) -> int:
    """Number of classes from the class list or index files, without decoding any image."""
    return len(_checked(spec).classes(spec))


def load_split(
    spec: DatasetSpec,
    split: Split,
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    skip_corrupt: bool = False,
) -> LabeledImages:
    """One split as a Dataset of (image, 0-based label); index files are validated here.
    `skip_corrupt`: see `LabeledImages` (the grid's `data.skip_corrupt`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    index = _checked(spec).index(spec, split)
    return LabeledImages(index.samples, index.classes, index.loader, transform, skip_corrupt)


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
    minimum = 2 if name == "cub_dogs" else 1
    if num_classes < minimum or min(train_per_class, test_per_class) < 1 or image_size < 8:
        raise ValueError(
            f"generate_dataset({name!r}) needs num_classes >= {minimum}, at least one image "
            "per class and split, and image_size >= 8."
        )
    recipe = _Recipe(name, num_classes, train_per_class, test_per_class, image_size, seed)
    root = Path(root).absolute()
    if _marker(root) == asdict(recipe):
        return _generated_spec(root)
    _refuse_foreign(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the copy may be shared with other users
    try:
        roots = layout.write(staging, recipe, np.random.default_rng(seed))
        marker = {"recipe": asdict(recipe), "roots": list(roots)}
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


# --------------------------------------------------------------------------------------------
# Transforms, mixup, loaders
# --------------------------------------------------------------------------------------------


def build_transforms(
    *,
    train: bool,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    hflip: float = 0.5,
    re_prob: float = 0.0,
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
    uint8: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's DeiT-style pipeline, so our numbers match the papers' recipes.

    Train: random resized crop, horizontal flip, RandAugment, optional random erasing.
    Eval: resize the short side to img_size / crop_pct then centre crop; with crop_mode='squash'
    both sides are resized to img_size / crop_pct (aspect ratio not kept) before the crop, so with
    crop_pct=1.0 the whole image is seen (what ConvNeXt uses at >= 384 px).

    `uint8`: stop at the uint8 [3, H, W] tensor and leave normalisation and random erasing to
    `BatchNormalize`, on the training device (what timm's prefetcher does).
    """
    if uint8 and re_prob > 0:
        raise ValueError(
            "build_transforms(uint8=True) leaves random erasing to BatchNormalize(re_prob=...); "
            "pass re_prob there, not here."
        )
    from timm.data import create_transform

    if crop_mode not in ("center", "squash", "border"):
        raise ValueError(f"crop_mode must be 'center', 'squash' or 'border', got {crop_mode!r}.")
    return create_transform(
        input_size=(3, img_size, img_size),
        is_training=train,
        auto_augment=auto_augment if train else None,
        hflip=hflip,
        re_prob=re_prob,
        re_mode="pixel",  # DeiT's random erasing fills with per-pixel noise
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        use_prefetcher=uint8,
    )


class BatchNormalize:
    """A uint8 batch from the loader -> the model's normalised float input, on the batch's own
    device, followed for training batches by DeiT's random erasing (per-pixel noise).

    Loader workers that stop at uint8 images (`build_transforms(uint8=True)`) skip the float
    conversion, normalisation and erasing (about 1 ms of ~10 per 384 px image on one core) and
    hand over a quarter of the bytes to collate, pin and copy to the GPU (0.44 MB per image
    instead of 1.77 MB); the GPU does the arithmetic in microseconds. Same values as
    `ToTensor` + `Normalize` up to float rounding: (x / 255 - mean) / std = (x - 255 mean) /
    (255 std). Random erasing draws from the training process's RNGs, which `seed_epoch`
    seeds, so a resumed run erases what the uninterrupted run erased.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float = 0.0) -> None:
        self.mean = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(1, 3, 1, 1)
        self.re_prob = re_prob
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, Any]] = {}

    def _for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if device not in self._on_device:
            from timm.data.random_erasing import RandomErasing

            erase = (
                RandomErasing(self.re_prob, mode="pixel", device=device)
                if self.re_prob > 0
                else None
            )
            self._on_device[device] = (self.mean.to(device), self.std.to(device), erase)
        return self._on_device[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(
                f"BatchNormalize expects the uint8 batches of build_transforms(uint8=True), "
                f"got {images.dtype}."
            )
        mean, std, erase = self._for(images.device)
        batch = images.float().sub_(mean).div_(std)
        return erase(batch) if erase is not None else batch


class NormalizedBatches:
    """A loader of (uint8 images, targets) seen as one of normalised float images: each batch
    goes through `normalize` once it has reached its device. Everything else (len, dataset,
    batch_size, ...) is the wrapped loader's."""

    def __init__(self, loader: Any, normalize: BatchNormalize) -> None:
        self.loader = loader
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, targets in self.loader:
            yield self.normalize(images), targets

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "normalize"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


def build_mixup(
    num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """timm Mixup/CutMix on a batch (needs an even batch size; returns soft targets).

    None when both alphas are 0: then label smoothing, if any, belongs in the loss instead.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def seed_worker(worker_id: int) -> None:
    """Give each loader worker its own numpy seed: torch seeds `random` and torch per worker,
    but forked workers would otherwise share numpy's state and repeat the same augmentations."""
    np.random.seed(torch.initial_seed() % 2**32)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader with a reproducible shuffle for training and none for evaluation.

    The shuffle has a generator of its own (`loader.sampler.generator`, which the training loop
    re-seeds every epoch): the loader's `generator` is drawn from whenever worker processes
    start, which persistent workers do once per run, or once per resumed run.
    """
    drop_last = train if drop_last is None else drop_last
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"the split has {len(dataset)} images, fewer than batch_size={batch_size}; with "
            "drop_last no batch would be produced. Lower the batch size."
        )
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        if train
        else None,
        generator=torch.Generator().manual_seed(seed) if train else None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers,
        prefetch_factor=2 if workers else None,
        worker_init_fn=seed_worker if workers else None,
    )
