"""What every benchmark shares: the machine the figures were measured on, the device, medians,
and the class count of a row's dataset (that of the real dataset where its files are absent)."""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch

from kd import data as D
from kd.grid import Row

# Class counts of the real datasets, for benchmarks run where the dataset is absent.
DATASET_CLASSES = {"cub": 200, "dogs": 120, "cub_dogs": 320, "foodx": 251, "cifar10": 10}


def log_nothing(_message: str) -> None:
    """The default progress log: silent."""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def row_num_classes(row: Row) -> int:
    """The row's class count from its dataset's files, or the real dataset's count."""
    cfg = row.config.data
    try:
        return D.num_classes(D.DatasetSpec(cfg.dataset, cfg.root, cfg.dogs_root))
    except (D.DatasetError, OSError, ValueError):
        return DATASET_CLASSES.get(cfg.dataset, 1000)


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu` or `cuda` as a torch device; `cuda` where there is none is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it means done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values))
