"""Throughput of one row's data loader: decode + augment + collate through the row's real loader
(`kd.train.build_loaders`) on its dataset or a generated copy, against the step's demand; with
`test`, the test split's two passes as two epochs' evaluations read it (the second cached)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import DATASET_CLASSES, log_nothing, machine
from kd import data as D
from kd import models as M
from kd.grid import Row
from kd.train import build_loaders


def _data_row(
    row: Row,
    workers: int | None,
    generate: int | None,
    image_px: int,
    generate_root: str | Path | None,
    test: bool,
    log: Callable[[str], None],
) -> Row:
    """The row with `workers` loader workers and, with `generate`, reading a generated copy of
    its dataset of about that many training images of `image_px` pixels."""
    cfg = row.config
    data = cfg.data
    if workers is not None:
        data = dataclasses.replace(data, num_workers=workers)
    if generate:
        classes = DATASET_CLASSES.get(data.dataset, 10) if data.dataset != "imagefolder" else 10
        classes = min(classes, max(2, generate // 4))
        root = Path(generate_root or Path(cfg.output_dir) / "bench-data") / data.dataset
        log(f"generating {generate} {image_px}px images of {data.dataset} under {root}")
        spec = D.generate_dataset(
            data.dataset,
            root,
            num_classes=classes,
            train_per_class=max(1, generate // classes),
            test_per_class=max(1, generate // classes // 2) if test else 1,
            image_size=image_px,
        )
        data = dataclasses.replace(data, root=spec.root, dogs_root=spec.dogs_root)
    return dataclasses.replace(row, config=dataclasses.replace(cfg, data=data))


def _row_loaders(row: Row) -> tuple[Any, Any]:
    """The row's training and test loaders, as `kd.train` builds them."""
    data = row.config.data
    spec = D.DatasetSpec(data.dataset, data.root, data.dogs_root)
    num_classes = D.num_classes(spec)
    student = M.build_model(
        row.config.student.model, num_classes=num_classes, img_size=data.img_size, source="scratch"
    )
    return build_loaders(row, spec, M.data_config(student))


def _read_train(
    loader: Any, batches: int, workers: int, seed: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The first batch (worker start-up) timed apart, the rate over the batches after it, and
    the next epoch's first batch."""
    bs = loader.batch_size
    n_batches = min(batches, len(loader))
    if n_batches < 2:
        raise ValueError(
            f"the training split has {len(loader.dataset)} images: fewer than two batches "
            f"of {bs}; use --generate N for a bigger generated copy"
        )
    log(f"reading {n_batches} batches of {bs} with {workers} workers")
    start = time.perf_counter()
    it = iter(loader)
    x, _y = next(it)
    first = time.perf_counter() - start
    batch_dtype, bytes_per_image = str(x.dtype).removeprefix("torch."), x[0].nbytes
    images = 0
    start = time.perf_counter()
    for _ in range(n_batches - 1):
        x, _y = next(it)
        images += x.shape[0]
    elapsed = time.perf_counter() - start
    next_epoch = _next_epoch_first_batch(loader, it, n_batches, seed)
    del it
    return {
        "batches": n_batches,
        "first_batch_s": first,
        "next_epoch_first_batch_s": next_epoch,
        "batch_dtype": batch_dtype,  # normalised on the training device (kd.data.BatchNormalize)
        "bytes_per_image": bytes_per_image,
        "loader_img_per_s": images / elapsed,
    }


def data_benchmark(
    row: Row,
    *,
    workers: int | None = None,
    batches: int = 20,
    generate: int | None = None,
    image_px: int = 500,
    generate_root: str | Path | None = None,
    demand: float | None = None,
    test: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Images/s of decode + augment + collate through the row's training loader.

    `generate` writes a copy of the row's dataset with about that many training images of
    `image_px` pixels (CUB's photos are about 500 x 375) and reads that instead. The first
    batch (worker start-up) is timed apart; the rate is over the batches after it. `test`:
    also the test loader, as each epoch's evaluation reads it: a first pass (decode, resize,
    crop; it fills the transform cache) and a second (from the cache, when the row has one).
    """
    log = log or log_nothing
    row = _data_row(row, workers, generate, image_px, generate_root, test, log)
    cfg, data = row.config, row.config.data
    train_loader, test_loader = _row_loaders(row)
    read = _read_train(train_loader, batches, data.num_workers, cfg.train.seed, log)
    rate = read.pop("loader_img_per_s")
    result: dict[str, Any] = {
        "row": row.id,
        "label": row.label,
        "dataset": data.dataset,
        "root": data.root,
        "images_in_split": len(train_loader.dataset),
        "img_size": data.img_size,
        "batch_size": train_loader.batch_size,
        "workers": data.num_workers,
        "auto_augment": cfg.train.auto_augment,
        **read,
        "loader_img_per_s": rate,
        "per_worker_img_per_s": rate / max(1, data.num_workers),
        **machine(),
    }
    if demand is not None:
        result["demand_img_per_s"] = demand
        result["keeps_up"] = rate >= demand
        result["headroom"] = rate / demand
    if test:
        D.cache_split(test_loader, (3, data.img_size, data.img_size), limit_gb=data.eval_cache_gb)
        result |= _test_passes(test_loader, batches, log)
    return result


def _test_passes(loader: Any, batches: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Two passes over (up to `batches` of) the test loader, as two epochs' evaluations read
    it: the first decodes, resizes and crops (filling the cache), the second reads the cache."""
    n_batches = min(batches, len(loader))
    if n_batches < 2:
        raise ValueError(f"the test split has {len(loader.dataset)} images: under two batches")
    cache = getattr(loader.dataset, "cache", None)
    log(f"reading {n_batches} test batches twice (cache: {'on' if cache else 'off'})")
    rates = []
    for _ in range(2):  # each timed from its first batch on (worker start-up left out)
        images, start = 0, None
        for index, (x, _y) in enumerate(loader):
            if index >= n_batches:
                break
            if start is None:
                start = time.perf_counter()
                continue
            images += x.shape[0]
        rates.append(images / (time.perf_counter() - start))
    return {
        "test_images_in_split": len(loader.dataset),
        "test_batches": n_batches,
        "test_cache": cache is not None,
        "test_cache_gb": cache.nbytes / 2**30 if cache is not None else 0.0,
        "test_first_pass_img_per_s": rates[0],
        "test_second_pass_img_per_s": rates[1],
    }


def _next_epoch_first_batch(
    loader: Any, it: Any, read: int, seed: int, most_images: int = 2048
) -> float | None:
    """Seconds to the next epoch's first batch, as the training loop starts it: the workers
    persist, but the batch is assembled from scratch (a DataLoader does not prefetch across
    epochs). The rest of this epoch is read first (untimed), as the loop does, when that is at
    most `most_images` images; None otherwise. `read`: the batches `it` has given so far."""
    if (len(loader) - read) * loader.batch_size > most_images:
        return None
    for _ in it:
        pass
    loader.dataset.seed_augmentations(seed, 1)
    start = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - start


def format_data(r: dict[str, Any]) -> str:
    lines = [
        f"row {r['row']} ({r['label']}): {r['dataset']} at {r['root']} "
        f"({r['images_in_split']} training images)",
        f"  batch {r['batch_size']} x {r['img_size']} px, {r['workers']} workers, "
        f"RandAugment {r['auto_augment']}, load {r['load_avg_1m']}",
        f"  loader        {r['loader_img_per_s']:9.1f} img/s  ({r['batch_dtype']} images, "
        f"{r['bytes_per_image'] / 1e6:.2f} MB each)",
        f"  first batch   {r['first_batch_s']:9.2f} s      (workers start; next epoch's first "
        + (
            f"batch {r['next_epoch_first_batch_s']:.2f} s)"
            if r["next_epoch_first_batch_s"] is not None
            else "batch not timed: over 2048 images of the epoch were left to read)"
        ),
    ]
    if "test_first_pass_img_per_s" in r:
        cache = f"cached, {r['test_cache_gb']:.2f} GiB" if r["test_cache"] else "not cached"
        lines.append(
            f"  test split    {r['test_first_pass_img_per_s']:9.1f} img/s first pass, "
            f"{r['test_second_pass_img_per_s']:.1f} img/s after ({cache}; "
            f"{r['test_images_in_split']} images)"
        )
    if "demand_img_per_s" in r:
        verdict = "keeps up" if r["keeps_up"] else "does NOT keep up"
        lines.append(
            f"  step demand   {r['demand_img_per_s']:9.1f} img/s  -> the loader {verdict} "
            f"({r['headroom']:.2f}x)"
        )
    return "\n".join(lines)
