"""Where a dataset copy lives (`DatasetSpec`), its splits, and the error every reader raises.

Light (no torch, PIL or numpy), so that code which only names or validates datasets can use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


class DatasetError(ValueError):
    """A dataset root, index file or image that cannot be used as it is."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset lives. `dogs_root` is only for `cub_dogs` (then `root` is the CUB root)."""

    name: str
    root: str
    dogs_root: str | None = None
