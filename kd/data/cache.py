"""The test split's transformed images, kept as uint8 in a shared memory map after the first
evaluation (`cache_split`), and whether the node's temp folder can hold them.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader


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
    fstype = filesystem_type(folder)
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


def filesystem_type(path: str) -> str | None:
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
