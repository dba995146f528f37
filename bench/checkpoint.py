"""How long an epoch's checkpoint files keep training waiting: written in the loop (best.pt,
last.pt, state.pt, each fsynced) against written in the background (the loop only copies the
state to the CPU), with the row's real training step running beside the background write."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.common import log_nothing, machine, median, resolve_device, row_num_classes, sync
from bench.prepared import prepared_step, synthetic_batches
from kd import rowfiles
from kd.checkpoint import BackgroundWriter
from kd.grid import Row
from kd.models import count_params
from kd.train import snapshot_epoch, train_step, write_epoch_files

# One list per figure, one entry per repeat.
_FIGURES = ("in_loop", "blocking", "background", "during", "step_ratio")


class _Steps:
    """The row's training step on one synthetic batch, as often as asked."""

    def __init__(self, parts: Any, normalize: Callable, batch: tuple, dev: torch.device):
        self.parts, self.normalize, self.batch, self.dev = parts, normalize, batch, dev

    def run(self, at_least: int, busy: Callable[[], bool] = lambda: False) -> tuple[int, float]:
        """(steps, seconds): at least `at_least` steps, and more while `busy()`."""
        images, targets = self.batch
        done, start = 0, time.perf_counter()
        while done < at_least or busy():
            train_step(self.parts, self.normalize(images), targets)
            done += 1
        sync(self.dev)
        return done, time.perf_counter() - start


def _scratch_row(row: Row, parent: Path) -> tuple[Path, Row]:
    """A scratch folder in `parent`, and the row with its output folder there."""
    scratch = Path(tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=parent))
    bench_row = dataclasses.replace(
        row, config=dataclasses.replace(row.config, output_dir=str(scratch))
    )
    bench_row.output_dir.mkdir(parents=True)
    return scratch, bench_row


def _repeat(
    bench_row: Row, files: Callable[..., Any], writer: BackgroundWriter, steps: _Steps
) -> dict[str, float]:
    """One epoch end written in the loop, then one written in the background while training
    steps run; then as many steps timed alone."""
    started = time.perf_counter()
    write_epoch_files(bench_row, files(copy=False))
    in_loop = time.perf_counter() - started
    written: list[float] = []
    started = time.perf_counter()  # what the loop waits for: the copy, then the hand-over
    job = partial(write_epoch_files, bench_row, files(copy=True))
    writer.submit(lambda: (job(), written.append(time.perf_counter())))
    blocking = time.perf_counter() - started
    n, with_write = steps.run(1, busy=lambda: writer.busy)
    writer.wait()
    background = written[0] - started - blocking
    _, alone = steps.run(n)
    return {
        "in_loop": in_loop,
        "blocking": blocking,
        "background": background,
        "during": n,
        "step_ratio": with_write / alone,
    }


def checkpoint_benchmark(
    row: Row,
    *,
    repeats: int = 3,
    batch_size: int = 2,
    folder: str | Path | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Seconds an epoch end keeps training waiting for its checkpoint files, written in the
    loop (as before: best.pt, last.pt, state.pt, each fsynced) and in the background (the
    loop only copies the state to the CPU), alternated `repeats` times, medians.

    The files go to a scratch folder beside the row's output folder (the filesystem its
    checkpoints go to), removed afterwards; `folder` puts it elsewhere. While the background
    write runs, the row's real training step (`batch_size` synthetic images) keeps running;
    the same number of steps is then timed without a write: their time ratio is what the
    write costs training beyond the copy."""
    log = log or log_nothing
    dev = resolve_device(device)
    models, parts, normalize = prepared_step(row, dev, 10, batch_size, log)
    num_classes = row_num_classes(row)
    ((images, targets),) = synthetic_batches(row, dev, batch_size, 1)
    steps = _Steps(parts, normalize, (images, targets), dev)

    log(f"one warm-up step of {batch_size} images (AdamW's moments exist after it)")
    steps.run(1)
    parent = Path(folder) if folder else Path(row.config.output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    scratch, bench_row = _scratch_row(row, parent)
    val = {"acc1": 0.0, "acc5": 0.0, "loss": 0.0}
    files = partial(  # an early epoch: improved, so best.pt is written too
        snapshot_epoch, bench_row, parts, epoch=0, val=val, num_classes=num_classes,
        improved=True, best_acc1=0.0, run_id=None, history=[],
    )  # fmt: skip
    writer = BackgroundWriter()
    figures: dict[str, list[float]] = {name: [] for name in _FIGURES}
    try:
        for r in range(repeats):
            one = _repeat(bench_row, files, writer, steps)
            for name in _FIGURES:
                figures[name].append(one[name])
            log(
                f"repeat {r + 1}/{repeats}: in the loop {one['in_loop']:.2f} s; background: "
                f"{one['blocking']:.2f} s blocking + {one['background']:.2f} s writing; "
                f"{one['during']} steps during the write took {one['step_ratio']:.2f}x their "
                "time alone"
            )
        sizes = {p.name: p.stat().st_size for p in bench_row.output_dir.glob("*.pt")}
    finally:
        writer.finish_quietly()
        shutil.rmtree(scratch, ignore_errors=True)
    setup = {
        "row": row.id,
        "label": row.label,
        "student": row.config.student.model,
        "student_params": count_params(models.student),
        "ema": parts.ema is not None,
        "device": str(dev),
        "folder": str(parent),
        "repeats": repeats,
        "batch_size": batch_size,
    }
    return setup | _checkpoint_figures(sizes, figures)


def _checkpoint_figures(sizes: dict[str, int], f: dict[str, list[float]]) -> dict[str, Any]:
    """Bytes per epoch and the medians of the repeats."""
    return {
        "state_bytes": sizes.get(rowfiles.STATE, 0),
        "model_bytes": sizes.get(rowfiles.LAST, 0),
        "bytes_per_epoch": sum(sizes.values()),  # an improving epoch: best.pt too
        "in_loop_s": median(f["in_loop"]),
        "background_blocking_s": median(f["blocking"]),
        "background_write_s": median(f["background"]),
        "blocking_ratio": median([b / s for b, s in zip(f["blocking"], f["in_loop"], strict=True)]),
        "steps_during_write": median(f["during"]),
        "step_time_ratio_during_write": median(f["step_ratio"]),
        **machine(),
    }


def format_checkpoint(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"row {r['row']} ({r['label']}): {r['student']} ({r['student_params'] / 1e6:.1f} M "
            f"params, EMA {r['ema']}), {r['device']}, load {r['load_avg_1m']}",
            f"  files per epoch  {r['bytes_per_epoch'] / 1e9:7.3f} GB  (state.pt "
            f"{r['state_bytes'] / 1e9:.3f}, best.pt + last.pt {r['model_bytes'] / 1e9:.3f} each) "
            f"in {r['folder']}",
            f"  written in the loop    {r['in_loop_s']:7.3f} s per epoch, training waits",
            f"  in the background      {r['background_blocking_s']:7.3f} s per epoch, training waits "
            f"(the CPU copy); then {r['background_write_s']:.3f} s of writing beside training",
            f"  blocking ratio         {r['blocking_ratio']:7.3f}  (background / in the loop)",
            f"  training steps during the write: {r['steps_during_write']:g} of batch "
            f"{r['batch_size']}, {r['step_time_ratio_during_write']:.2f}x their time alone",
        ]
    )
