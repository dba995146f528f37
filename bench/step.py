"""Throughput of one row's training step against a plain-PyTorch loop doing the same arithmetic.

`step_benchmark` builds the row's models (from scratch: speed does not depend on the weights),
prepares them exactly as `kd.train` does (`bench.prepared`) and times `kd.train.train_step`, the
function the training loop itself calls, on synthetic batches of the row's image size (so data
loading is excluded). Beside it, `bench.plain.PlainLoop` does the same arithmetic on copies of
the same models with the same batch, precision, memory format and compilation. Their ratio is
the loop's overhead. The teacher forward is timed on its own as well (its share of the step),
and one step's FLOPs are counted (`torch.utils.flop_counter.FlopCounterMode`) to give, on CUDA,
the model FLOP utilisation (MFU).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import log_nothing, machine, median, resolve_device, sync
from bench.plain import PlainLoop
from bench.prepared import prepared_step, synthetic_batches
from kd.grid import Row
from kd.train import NAN_CHECK_EVERY, check_finite, mixed_precision, teacher_forward, train_step

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is lower (756)
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU, else None (MFU is then not reported)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _time_steps(step: Callable[[int], Any], n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for `n` steps, the device synchronised."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        step(i)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _count_flops(step: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


class _Loops:
    """The timed loops over the same synthetic batches: the project's step as the training loop
    runs it, the plain loop's step (when there is one) and the teacher's forward alone."""

    def __init__(self, parts: Any, normalize: Callable, batches: list, plain: PlainLoop | None):
        self.parts, self.normalize, self.batches, self.plain_loop = parts, normalize, batches, plain
        self.teacher_inputs = [normalize(images) for images, _ in batches]
        self.sums: dict[str, torch.Tensor] = {}

    def project(self, i: int) -> None:
        # What the loop does per batch: the step, the running sums, the periodic finiteness check.
        images, targets = self.batches[i % len(self.batches)]
        losses = train_step(self.parts, self.normalize(images), targets)
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        if (i + 1) % NAN_CHECK_EVERY == 0:
            check_finite(self.sums, 0, i)

    def plain(self, i: int) -> None:
        self.plain_loop.step(*self.batches[i % len(self.batches)])

    def teacher(self, i: int) -> None:
        parts = self.parts
        inputs = self.teacher_inputs[i % len(self.teacher_inputs)]
        teacher_forward(parts.teacher, inputs, parts.renorm, parts.accelerator)

    def warm_up(self, warmup: int, dev: torch.device) -> None:
        _time_steps(self.project, warmup, dev)
        if self.plain_loop is not None:
            _time_steps(self.plain, warmup, dev)
        if self.parts.teacher is not None:
            _time_steps(self.teacher, max(1, warmup // 2), dev)

    def alternate(
        self, steps: int, repeats: int, dev: torch.device, log: Callable[[str], None]
    ) -> dict[str, list[float]]:
        """Seconds per step of each loop (and CPU seconds), `repeats` times in turn."""
        bs = self.batches[0][0].shape[0]
        t: dict[str, list[float]] = {
            k: [] for k in ("project", "project_cpu", "plain", "plain_cpu", "teacher")
        }
        for r in range(repeats):
            wall, cpu = _time_steps(self.project, steps, dev)
            t["project"].append(wall / steps)
            t["project_cpu"].append(cpu / steps)
            if self.plain_loop is not None:
                wall, cpu = _time_steps(self.plain, steps, dev)
                t["plain"].append(wall / steps)
                t["plain_cpu"].append(cpu / steps)
            if self.parts.teacher is not None:
                t["teacher"].append(_time_steps(self.teacher, steps, dev)[0] / steps)
            log(
                f"repeat {r + 1}/{repeats}: project {bs / t['project'][-1]:.1f} img/s"
                + (f", plain {bs / t['plain'][-1]:.1f} img/s" if t["plain"] else "")
            )
        return t


def _benchmark_row(row: Row, batch_size: int | None, compile: bool | None) -> Row:
    """The row with the benchmark's batch size and compilation, one update per batch."""
    tcfg = row.config.train
    if batch_size is not None:
        tcfg = dataclasses.replace(tcfg, batch_size=batch_size)
    if compile is not None:
        tcfg = dataclasses.replace(tcfg, compile=compile)
    tcfg = dataclasses.replace(tcfg, grad_accum_steps=1)
    return dataclasses.replace(row, config=dataclasses.replace(row.config, train=tcfg))


def step_benchmark(
    row: Row,
    *,
    batch_size: int | None = None,
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
    device: str = "auto",
    compile: bool | None = None,
    plain: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Images/s of the row's step through `kd.train.train_step` and through a plain loop.

    The two loops alternate `repeats` times (so a change in machine load hits both) and each
    figure is the median over the repeats. `compile` overrides the row's `train.compile`.
    """
    log = log or log_nothing
    dev = resolve_device(device)
    row = _benchmark_row(row, batch_size, compile)
    tcfg = row.config.train
    models, parts, normalize = prepared_step(row, dev, max(steps + warmup, 1), tcfg.batch_size, log)
    parts.step_module.train()
    plain_loop = (
        PlainLoop(row, models, parts.mixup, dev, parts.raw_optimizer.param_groups)
        if plain
        else None
    )
    loops = _Loops(parts, normalize, synthetic_batches(row, dev, tcfg.batch_size, 4), plain_loop)
    flops = None
    if plain_loop is not None:  # counted eagerly, before any compilation
        flops = _count_flops(lambda: plain_loop.step(*loops.batches[0]))
        if dev.type == "cuda" and tcfg.compile:
            plain_loop.compile()

    log(f"warm-up: {warmup} steps each")
    loops.warm_up(warmup, dev)
    times = loops.alternate(steps, repeats, dev, log)
    result = _step_setup(row, models, parts, dev) | {
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
    }
    return result | _step_figures(tcfg.batch_size, times, flops, dev)


def _step_setup(row: Row, models: Any, parts: Any, dev: torch.device) -> dict[str, Any]:
    """What was measured: the row, its models and KD terms, batch, precision, device."""
    cfg, tcfg = row.config, row.config.train
    cuda = dev.type == "cuda"
    precision = mixed_precision(tcfg.precision, cuda)
    return {
        "row": row.id,
        "label": row.label,
        "student": cfg.student.model,
        "teacher": models.teacher and (cfg.teacher.model if cfg.teacher else None),
        "kd": dict(models.step_module.kd_loss.weights),
        "batch_size": tcfg.batch_size,
        "img_size": cfg.data.img_size,
        "precision": "fp32" if precision == "no" else precision,
        "device": str(dev),
        "channels_last": parts.channels_last,
        "compile": bool(cuda and tcfg.compile),
    }


def _step_figures(
    bs: int, t: dict[str, list[float]], flops: int | None, dev: torch.device
) -> dict[str, Any]:
    """Throughputs, the plain loop's ratio, the teacher's share and FLOPs from the timings."""
    project_s = median(t["project"])
    result: dict[str, Any] = {
        "project_step_ms": project_s * 1e3,
        "project_img_per_s": bs / project_s,
        "project_img_per_s_repeats": [bs / s for s in t["project"]],
        "project_cpu_ms_per_step": median(t["project_cpu"]) * 1e3,
        **machine(),
    }
    if t["plain"]:
        plain_s = median(t["plain"])
        result |= {
            "plain_step_ms": plain_s * 1e3,
            "plain_img_per_s": bs / plain_s,
            "plain_img_per_s_repeats": [bs / s for s in t["plain"]],
            "plain_cpu_ms_per_step": median(t["plain_cpu"]) * 1e3,
            # Each repeat times both loops back to back: the median of those paired ratios is
            # steadier on a shared machine than the ratio of the medians.
            "ratio": median([p / q for p, q in zip(t["plain"], t["project"], strict=True)]),
            "cpu_ratio": median(
                [p / q for p, q in zip(t["plain_cpu"], t["project_cpu"], strict=True)]
            ),
        }
    if t["teacher"]:
        result["teacher_ms"] = median(t["teacher"]) * 1e3
        result["teacher_share"] = min(1.0, median(t["teacher"]) / project_s)
    else:
        result["teacher_ms"], result["teacher_share"] = 0.0, 0.0
    if flops:
        result["flops_per_step"] = flops
        result["achieved_tflops"] = flops / project_s / 1e12
        if dev.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(dev))
            if peak is not None:
                result["peak_tflops"] = peak
                result["mfu"] = result["achieved_tflops"] / peak
    return result


def format_step(r: dict[str, Any]) -> str:
    lines = [
        f"row {r['row']} ({r['label']}): {r['student']} <- {r['teacher'] or 'no teacher'}, "
        f"kd {r['kd']}",
        f"  batch {r['batch_size']} x {r['img_size']} px, {r['precision']}, {r['device']}, "
        f"channels_last {r['channels_last']}, compile {r['compile']}, "
        f"{r['torch_threads']} torch threads, load {r['load_avg_1m']}",
        f"  project loop  {r['project_img_per_s']:9.1f} img/s  ({r['project_step_ms']:.2f} ms/step)",
    ]
    if "plain_img_per_s" in r:
        lines.append(
            f"  plain loop    {r['plain_img_per_s']:9.1f} img/s  ({r['plain_step_ms']:.2f} ms/step)"
        )
        lines.append(
            f"  ratio         {r['ratio']:9.3f}  (project / plain throughput; "
            f"CPU-time ratio {r['cpu_ratio']:.3f})"
        )
    lines.append(
        f"  teacher       {r['teacher_share'] * 100:8.1f} %  of the step ({r['teacher_ms']:.2f} ms)"
    )
    if "flops_per_step" in r:
        lines.append(
            f"  FLOPs/step    {r['flops_per_step'] / 1e9:9.2f} G   ({r['achieved_tflops']:.3f} TFLOP/s)"
        )
    if "mfu" in r:
        lines.append(f"  MFU           {r['mfu'] * 100:8.1f} %  of {r['peak_tflops']:.0f} TFLOP/s")
    return "\n".join(lines)
