"""The training and evaluation data as PyTorch sees it: each split as a Dataset of (image,
label) pairs (`load_split`, `LabeledImages`), and reproducible DataLoaders over it.

A split's images may be read by loader worker processes, by one training process of several
(Accelerate shards the loader), and again after a resume: what each image becomes (its seeded
augmentations), which corrupt images were skipped (`data.skip_corrupt`) and the shuffle are
kept the same across all of these.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info

from kd.data.cache import TransformCache
from kd.data.images import open_rgb
from kd.data.layouts import checked_layout
from kd.data.spec import SPLITS, DatasetError, DatasetSpec, Split

LEFT_OUT = -1  # the label of an image that stands in for a corrupt test image: not scored


class LabeledImages(Dataset):
    """(image, label) pairs; images are RGB PIL images, passed through `transform` when given.

    A corrupt image raises `DatasetError` naming the file, unless `skip_corrupt`: then it is
    left out, the next image of the split takes its place (so batches keep their size, and
    mixup its even batches) with its label, or, on a split that is scored (`substitute=False`:
    the test split), with label `LEFT_OUT` (-1), so that `kd.evaluate` leaves it out instead
    of scoring the next image twice; it is flagged in `corrupt`, a tensor in shared memory, so that
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
        substitute: bool = True,
    ) -> None:
        self.samples = samples
        self.substitute = substitute
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
    def _training_rngs_kept(self) -> Iterator[None]:
        """In the training process itself (no workers) its own `random`, numpy and torch
        streams are restored afterwards, so that mixup and random erasing draw what they would
        have drawn. Saving and restoring them costs about 10 % of a small model's step on
        one CPU, so a batch (`__getitems__`) does it once, not once per image."""
        seeded = bool(self.augment_seed[0])
        if not seeded or get_worker_info() is not None:
            yield
            return
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def _seed_image(self, index: int) -> None:
        """`random`, numpy and torch seeded for this image (what timm's transforms draw from),
        from (seed, epoch, index) alone, once `seed_augmentations` was called."""
        seeded, seed, epoch = self.augment_seed.tolist()
        if not seeded:
            return
        words = np.random.SeedSequence((seed, epoch, index)).generate_state(2)
        mixed = int(words[0]) << 32 | int(words[1])
        random.seed(mixed)
        np.random.seed(int(words[0]))
        torch.default_generator.manual_seed(mixed)  # the CPU's; the GPU's streams are not touched

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with self._training_rngs_kept():
            return self._seeded_item(index)

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        """A batch, for the DataLoader's fetcher: the same pairs as `__getitem__` one by one."""
        with self._training_rngs_kept():
            return [self._seeded_item(index) for index in indices]

    def _seeded_item(self, index: int) -> tuple[Any, int]:
        if self.cache is not None and (cached := self.cache.get(index)) is not None:
            return cached
        self._seed_image(index)
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
            if position != index and not self.substitute:
                label = LEFT_OUT  # the image takes the place, not the score, of the corrupt one
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


def load_split(
    spec: DatasetSpec,
    split: Split,
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    skip_corrupt: bool = False,
    per_class: int | None = None,
    subset_seed: int = 0,
) -> LabeledImages:
    """One split as a Dataset of (image, 0-based label); index files are validated here.
    `skip_corrupt`: see `LabeledImages` (the grid's `data.skip_corrupt`); on the test split a
    corrupt image is left out of the scores, not replaced in them. `per_class`: keep
    that many images of each class (`per_class_subset`; the grid's `data.train_per_class`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    index = checked_layout(spec).index(spec, split)
    samples = index.samples
    if per_class is not None:
        samples = per_class_subset(samples, per_class, subset_seed)
    return LabeledImages(
        samples,
        index.classes,
        index.loader,
        transform,
        skip_corrupt,
        substitute=split == "train",
    )


def per_class_subset(
    samples: list[tuple[Any, int]], per_class: int, seed: int
) -> list[tuple[Any, int]]:
    """The first `per_class` samples of each class in a random order drawn from `seed` (all of
    a class with fewer), kept in the split's own order: the same subset for the same seed on
    every machine (numpy's PCG64), and a larger `per_class` keeps the smaller one's images."""
    order = np.random.default_rng(seed).permutation(len(samples))
    taken: dict[int, int] = {}
    keep = []
    for position in order.tolist():
        label = samples[position][1]
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(position)
    return [samples[position] for position in sorted(keep)]


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
