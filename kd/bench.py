"""Throughput of one row: its training step against a plain-PyTorch loop, and its data loader.

`step_benchmark` builds the row's models (from scratch: speed does not depend on the weights),
prepares them exactly as `kd.train` does (`prepare_step`) and times `kd.train.train_step`, the
function the training loop itself calls, on synthetic batches of the row's image size (so data
loading is excluded). Beside it, a minimal plain-PyTorch loop does the same arithmetic on
copies of the same models with the same batch, precision, memory format and compilation: the
teacher forward in inference mode, the student forward, every KD term of the row computed
inline, backward, optimizer step. Their ratio is the loop's overhead. The teacher forward is
timed on its own as well (its share of the step), and on CUDA one step's FLOPs are counted
(`torch.utils.flop_counter.FlopCounterMode`) to give the model FLOP utilisation (MFU).

`data_benchmark` times decode + augment + collate through the row's real loader
(`kd.train.build_loaders`) on its dataset or a generated copy, against the step's demand.

`launch/bench.py` is the command line; `slurm/bench.py` benchmarks launching a grid.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kd.grid import Row

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
# Class counts of the real datasets, for benchmarks run where the dataset is absent.
DATASET_CLASSES = {"cub": 200, "dogs": 120, "cub_dogs": 320, "foodx": 251, "cifar10": 10}


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


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU, else None (MFU is then not reported)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def row_num_classes(row: Row) -> int:
    """The row's class count from its dataset's files, or the real dataset's count."""
    from kd import data as D

    cfg = row.config.data
    try:
        return D.num_classes(D.DatasetSpec(cfg.dataset, cfg.root, cfg.dogs_root))
    except (D.DatasetError, OSError, ValueError):
        return DATASET_CLASSES.get(cfg.dataset, 1000)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# --------------------------------------------------------------------------------------------
# The plain-PyTorch loop: the same arithmetic, nothing else
# --------------------------------------------------------------------------------------------


def _plain_outputs(model: torch.nn.Module, x: torch.Tensor, need_emb: bool):
    """(logits, dist_logits, embedding) of a timm model without hooks or wrappers."""
    if need_emb:
        feats = model.forward_features(x)
        emb = model.forward_head(feats, pre_logits=True)
        out = model.forward_head(feats)
    else:
        out, emb = model(x), None
    logits, dist = out if isinstance(out, (tuple, list)) else (out, out)
    return logits, dist, emb


def _plain_terms(
    weights: dict[str, float],
    options: Any,
    projection: torch.nn.Module | None,
    logits: torch.Tensor,
    dist: torch.Tensor,
    targets: torch.Tensor,
    t_logits: torch.Tensor | None,
    s_emb: torch.Tensor | None,
    t_emb: torch.Tensor | None,
) -> torch.Tensor:
    """The row's weighted KD terms written out inline (DESIGN.md section 4)."""
    from kd import losses as L

    tau = options.tau
    total = logits.new_zeros(())
    for name, w in weights.items():
        if name == "ce":
            if targets.dtype.is_floating_point:
                value = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            else:
                value = F.cross_entropy(logits, targets, label_smoothing=options.label_smoothing)
        elif name == "deit_hard":
            value = F.cross_entropy(dist, t_logits.argmax(dim=-1))
        elif name in ("deit_soft", "ikd"):
            s = dist if name == "deit_soft" else logits
            kl = F.kl_div(
                F.log_softmax(s / tau, dim=-1),
                F.log_softmax(t_logits / tau, dim=-1),
                reduction="sum",
                log_target=True,
            )
            per = s.numel() if name == "deit_soft" and options.soft_reduction == "deit" else len(s)
            value = kl * (tau * tau) / per
        elif name == "rkd_distance":
            value = L.rkd_distance(s_emb, t_emb)
        elif name == "rkd_angle":
            value = L.rkd_angle(s_emb, t_emb)
        elif name == "embed_mse":
            value = F.mse_loss(projection(s_emb) if projection is not None else s_emb, t_emb)
        else:  # a term added to kd.losses but not here
            raise NotImplementedError(f"the plain loop has no inline version of term {name!r}")
        total = total + w * value
    return total


class PlainLoop:
    """The row's step in a dozen lines of plain PyTorch, on copies of the same models."""

    def __init__(
        self,
        row: Row,
        models: Any,
        mixup: Callable | None,
        device: torch.device,
        groups: list[dict[str, Any]],
    ):
        """`groups` are the project optimizer's parameter groups: the plain AdamW gets the same
        groups (weight decay off for norms and biases, layer-decayed learning rates) over the
        copies' parameters, so both optimizers do the same arithmetic."""
        from kd.train import mixed_precision

        cfg = row.config
        tcfg = cfg.train
        cuda = device.type == "cuda"
        kd_loss = models.step_module.kd_loss
        self.student = copy.deepcopy(models.student).to(device)
        self.teacher = copy.deepcopy(models.teacher).to(device) if models.teacher else None
        self.projection = (
            copy.deepcopy(kd_loss.projection).to(device) if kd_loss.projection else None
        )
        self.weights, self.options = dict(kd_loss.weights), kd_loss.options
        self.need_emb = kd_loss.needs_embeddings
        self.feature_layer = cfg.student.feature_layer
        self.renorm = (
            tuple(t.to(device) for t in models.teacher_renorm) if models.teacher_renorm else None
        )
        self.mixup = mixup
        normal = models.student_data  # uint8 batches in, as the loader gives them
        self.mean = torch.tensor(normal["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(normal["std"], device=device).view(1, 3, 1, 1) * 255
        self.erase = None
        if tcfg.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(tcfg.re_prob, mode="pixel", device=device)
        self.channels_last = cuda and tcfg.channels_last
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        originals = list(models.student.parameters())
        params = list(self.student.parameters())
        if self.projection is not None:
            originals += list(kd_loss.projection.parameters())
            params += list(self.projection.parameters())
        index = {id(p): i for i, p in enumerate(originals)}
        plain_groups = [
            {
                "params": [params[index[id(p)]] for p in g["params"]],
                "lr": g["lr"],
                "weight_decay": g["weight_decay"],
            }
            for g in groups
        ]
        extra = {"fused": True} if cuda and tcfg.opt.lower() in ("adamw", "adam") else {}
        self.optimizer = torch.optim.AdamW(plain_groups, lr=tcfg.lr, **extra)
        self.params = params
        self.clip_grad = tcfg.clip_grad
        precision = mixed_precision(tcfg.precision, cuda)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype))
            if dtype is not None
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.student.train()
        if self.teacher is not None:
            self.teacher.eval()
        self.compiled = False

    def compile(self) -> None:
        self.student = torch.compile(self.student)
        if self.teacher is not None:
            self.teacher = torch.compile(self.teacher)
        self.compiled = True

    def teacher_forward(self, images: torch.Tensor):
        with torch.inference_mode(), self.autocast():
            x = images * self.renorm[0] + self.renorm[1] if self.renorm is not None else images
            t_logits, _, t_emb = _plain_outputs(self.teacher, x, self.need_emb)
        return t_logits.clone(), (t_emb.clone() if t_emb is not None else None)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        if self.erase is not None:
            images = self.erase(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        t_logits = t_emb = None
        if self.teacher is not None:
            t_logits, t_emb = self.teacher_forward(images)
        with self.autocast():
            if self.feature_layer is not None:  # a hooked layer: the project's helper
                from kd.models import forward_with_embedding

                out = forward_with_embedding(self.student, images, feature_layer=self.feature_layer)
                logits, dist, s_emb = out.logits, out.dist_logits, out.embedding
            else:
                logits, dist, s_emb = _plain_outputs(self.student, images, self.need_emb)
            loss = _plain_terms(
                self.weights,
                self.options,
                self.projection,
                logits,
                dist,
                targets,
                t_logits,
                s_emb,
                t_emb,
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# --------------------------------------------------------------------------------------------
# The step benchmark
# --------------------------------------------------------------------------------------------


def _time_steps(step: Callable[[int], Any], n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for `n` steps, the device synchronised."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        step(i)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _count_flops(step: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def prepared_step(
    row: Row, dev: torch.device, updates: int, batch_size: int, log: Callable[[str], None]
):
    """The row's models (random weights: speed does not depend on them, and no downloads or
    teacher checkpoints are needed) prepared by `kd.train.prepare_step` as the loop prepares
    them, with a schedule of `updates` updates, for batches of `batch_size`. Returns (models,
    parts, normalize): `normalize` turns the loader's uint8 batches into the student's input."""
    from accelerate import Accelerator

    from kd import data as D
    from kd import train as T

    cfg, tcfg = row.config, row.config.train
    num_classes = row_num_classes(row)
    mixup = D.build_mixup(num_classes, tcfg.mixup, tcfg.cutmix, tcfg.label_smoothing)
    if mixup is not None and batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch size, got {batch_size}")
    torch.manual_seed(tcfg.seed)
    log(f"building {cfg.student.model} + {cfg.teacher.model if cfg.teacher else 'no teacher'}")
    models = T.build_models(row, num_classes, weights=False)
    precision = T.mixed_precision(tcfg.precision, dev.type == "cuda")
    accelerator = Accelerator(cpu=dev.type != "cuda", mixed_precision=precision)
    # uint8 images, as the loader hands them over; both loops normalise them on the device
    normalize, test_normalize = T.batch_normalizers(row.config, models.student_data)
    built = T.Built(
        student=models.student,
        teacher=models.teacher,
        step_module=models.step_module,
        train_loader=None,
        test_loader=None,
        loader_generator=torch.Generator(),
        mixup=mixup,
        teacher_renorm=models.teacher_renorm,
        num_classes=num_classes,
        train_normalize=normalize,
        test_normalize=test_normalize,
    )
    parts = T.prepare_step(tcfg, accelerator, built)
    parts.scheduler = T.build_scheduler(tcfg, parts.raw_optimizer, updates)
    return models, parts, normalize


def synthetic_batches(
    row: Row, dev: torch.device, batch_size: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of random uint8 images of the row's size (as the loader hands them
    over) and random targets, on `dev`; the same ones every call."""
    size, num_classes = row.config.data.img_size, row_num_classes(row)
    shape = (batch_size, 3, size, size)
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(dev),
            torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev),
        )
        for _ in range(count)
    ]


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
    import dataclasses

    from kd import train as T

    log = log or (lambda _m: None)
    dev = _resolve_device(device)
    cuda = dev.type == "cuda"
    cfg = row.config
    tcfg = cfg.train
    if batch_size is not None:
        tcfg = dataclasses.replace(tcfg, batch_size=batch_size)
    if compile is not None:
        tcfg = dataclasses.replace(tcfg, compile=compile)
    tcfg = dataclasses.replace(tcfg, grad_accum_steps=1)
    row = dataclasses.replace(row, config=dataclasses.replace(cfg, train=tcfg))
    bs, size = tcfg.batch_size, cfg.data.img_size
    precision = T.mixed_precision(tcfg.precision, cuda)

    models, parts, normalize = prepared_step(row, dev, max(steps + warmup, 1), bs, log)
    accelerator, mixup = parts.accelerator, parts.mixup
    parts.step_module.train()
    plain_loop = (
        PlainLoop(row, models, mixup, dev, parts.raw_optimizer.param_groups) if plain else None
    )

    batches = synthetic_batches(row, dev, bs, 4)
    teacher_inputs = [normalize(images) for images, _ in batches]

    flops = None
    if plain_loop is not None:  # counted eagerly, before any compilation
        flops = _count_flops(lambda: plain_loop.step(*batches[0]))
        if cuda and tcfg.compile:
            plain_loop.compile()

    sums: dict[str, torch.Tensor] = {}

    def project_step(i: int) -> None:
        # What the loop does per batch: the step, the running sums, the periodic finiteness check.
        images, targets = batches[i % len(batches)]
        losses = T.train_step(parts, normalize(images), targets)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value
        if (i + 1) % T.NAN_CHECK_EVERY == 0:
            T.check_finite(sums, 0, i)

    def plain_step(i: int) -> None:
        plain_loop.step(*batches[i % len(batches)])

    def teacher_step(i: int) -> None:
        T.teacher_forward(
            parts.teacher, teacher_inputs[i % len(teacher_inputs)], parts.renorm, accelerator
        )

    log(f"warm-up: {warmup} steps each")
    _time_steps(project_step, warmup, dev)
    if plain_loop is not None:
        _time_steps(plain_step, warmup, dev)
    if parts.teacher is not None:
        _time_steps(teacher_step, max(1, warmup // 2), dev)
    project, plain_t, teacher_t, project_cpu, plain_cpu = [], [], [], [], []
    for r in range(repeats):
        wall, cpu = _time_steps(project_step, steps, dev)
        project.append(wall / steps)
        project_cpu.append(cpu / steps)
        if plain_loop is not None:
            wall, cpu = _time_steps(plain_step, steps, dev)
            plain_t.append(wall / steps)
            plain_cpu.append(cpu / steps)
        if parts.teacher is not None:
            teacher_t.append(_time_steps(teacher_step, steps, dev)[0] / steps)
        log(
            f"repeat {r + 1}/{repeats}: project {bs / project[-1]:.1f} img/s"
            + (f", plain {bs / plain_t[-1]:.1f} img/s" if plain_t else "")
        )
    project_s = _median(project)
    result: dict[str, Any] = {
        "row": row.id,
        "label": row.label,
        "student": cfg.student.model,
        "teacher": models.teacher and (cfg.teacher.model if cfg.teacher else None),
        "kd": dict(models.step_module.kd_loss.weights),
        "batch_size": bs,
        "img_size": size,
        "precision": "fp32" if precision == "no" else precision,
        "device": str(dev),
        "channels_last": parts.channels_last,
        "compile": bool(cuda and tcfg.compile),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "project_step_ms": project_s * 1e3,
        "project_img_per_s": bs / project_s,
        "project_img_per_s_repeats": [bs / t for t in project],
        "project_cpu_ms_per_step": _median(project_cpu) * 1e3,
        **machine(),
    }
    if plain_t:
        plain_s = _median(plain_t)
        result |= {
            "plain_step_ms": plain_s * 1e3,
            "plain_img_per_s": bs / plain_s,
            "plain_img_per_s_repeats": [bs / t for t in plain_t],
            "plain_cpu_ms_per_step": _median(plain_cpu) * 1e3,
            # Each repeat times both loops back to back: the median of those paired ratios is
            # steadier on a shared machine than the ratio of the medians.
            "ratio": _median([p / q for p, q in zip(plain_t, project, strict=True)]),
            "cpu_ratio": _median([p / q for p, q in zip(plain_cpu, project_cpu, strict=True)]),
        }
    if teacher_t:
        result["teacher_ms"] = _median(teacher_t) * 1e3
        result["teacher_share"] = min(1.0, _median(teacher_t) / project_s)
    else:
        result["teacher_ms"], result["teacher_share"] = 0.0, 0.0
    if flops:
        result["flops_per_step"] = flops
        result["achieved_tflops"] = flops / project_s / 1e12
        if cuda:
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


# --------------------------------------------------------------------------------------------
# The checkpoint benchmark
# --------------------------------------------------------------------------------------------


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
    import dataclasses
    import shutil
    import tempfile
    from functools import partial

    from kd import checkpoint as K
    from kd import train as T
    from kd.models import count_params

    log = log or (lambda _m: None)
    dev = _resolve_device(device)
    models, parts, normalize = prepared_step(row, dev, 10, batch_size, log)
    num_classes = row_num_classes(row)
    ((images, targets),) = synthetic_batches(row, dev, batch_size, 1)

    def steps(at_least: int, busy: Callable[[], bool] = lambda: False) -> tuple[int, float]:
        done, start = 0, time.perf_counter()
        while done < at_least or busy():
            T.train_step(parts, normalize(images), targets)
            done += 1
        _sync(dev)
        return done, time.perf_counter() - start

    log(f"one warm-up step of {batch_size} images (AdamW's moments exist after it)")
    steps(1)
    parent = Path(folder) if folder else Path(row.config.output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=parent))
    bench_row = dataclasses.replace(
        row, config=dataclasses.replace(row.config, output_dir=str(scratch))
    )
    bench_row.output_dir.mkdir(parents=True)
    val = {"acc1": 0.0, "acc5": 0.0, "loss": 0.0}

    def files(copy: bool) -> T.EpochFiles:  # an early epoch: improved, so best.pt is written too
        return T.snapshot_epoch(
            bench_row, parts, epoch=0, val=val, num_classes=num_classes,
            improved=True, best_acc1=0.0, run_id=None, history=[], copy=copy,
        )  # fmt: skip

    writer = K.BackgroundWriter()
    in_loop, blocking, background, step_ratio, during = [], [], [], [], []
    try:
        for r in range(repeats):
            started = time.perf_counter()
            T.write_epoch_files(bench_row, files(copy=False))
            in_loop.append(time.perf_counter() - started)
            written: list[float] = []
            started = time.perf_counter()  # what the loop waits for: the copy, then the hand-over
            job = partial(T.write_epoch_files, bench_row, files(copy=True))
            writer.submit(
                lambda job=job, written=written: (job(), written.append(time.perf_counter()))
            )
            blocking.append(time.perf_counter() - started)
            n, with_write = steps(1, busy=lambda: writer.busy)
            writer.wait()
            background.append(written[0] - started - blocking[-1])
            _, alone = steps(n)
            during.append(n)
            step_ratio.append(with_write / alone)
            log(
                f"repeat {r + 1}/{repeats}: in the loop {in_loop[-1]:.2f} s; background: "
                f"{blocking[-1]:.2f} s blocking + {background[-1]:.2f} s writing; {n} steps "
                f"during the write took {with_write / alone:.2f}x their time alone"
            )
        sizes = {p.name: p.stat().st_size for p in bench_row.output_dir.glob("*.pt")}
    finally:
        writer.finish_quietly()
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "row": row.id,
        "label": row.label,
        "student": row.config.student.model,
        "student_params": count_params(models.student),
        "ema": parts.ema is not None,
        "device": str(dev),
        "folder": str(parent),
        "repeats": repeats,
        "batch_size": batch_size,
        "state_bytes": sizes.get(T.STATE_FILE, 0),
        "model_bytes": sizes.get(T.LAST_FILE, 0),
        "bytes_per_epoch": sum(sizes.values()),  # an improving epoch: best.pt too
        "in_loop_s": _median(in_loop),
        "background_blocking_s": _median(blocking),
        "background_write_s": _median(background),
        "blocking_ratio": _median([b / s for b, s in zip(blocking, in_loop, strict=True)]),
        "steps_during_write": _median(during),
        "step_time_ratio_during_write": _median(step_ratio),
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


# --------------------------------------------------------------------------------------------
# The data benchmark
# --------------------------------------------------------------------------------------------


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
    import dataclasses

    from kd import data as D
    from kd import models as M
    from kd import train as T

    log = log or (lambda _m: None)
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
    row = dataclasses.replace(row, config=dataclasses.replace(cfg, data=data))
    spec = D.DatasetSpec(data.dataset, data.root, data.dogs_root)
    num_classes = D.num_classes(spec)
    student = M.build_model(
        cfg.student.model, num_classes=num_classes, img_size=data.img_size, source="scratch"
    )
    train_loader, test_loader = T.build_loaders(row, spec, M.data_config(student))
    del student
    bs = train_loader.batch_size
    n_batches = min(batches, len(train_loader))
    if n_batches < 2:
        raise ValueError(
            f"the training split has {len(train_loader.dataset)} images: fewer than two batches "
            f"of {bs}; use --generate N for a bigger generated copy"
        )
    log(f"reading {n_batches} batches of {bs} with {data.num_workers} workers")
    start = time.perf_counter()
    it = iter(train_loader)
    x, _y = next(it)
    first = time.perf_counter() - start
    batch_dtype, bytes_per_image = str(x.dtype).removeprefix("torch."), x[0].nbytes
    images = 0
    start = time.perf_counter()
    for _ in range(n_batches - 1):
        x, _y = next(it)
        images += x.shape[0]
    elapsed = time.perf_counter() - start
    next_epoch = _next_epoch_first_batch(train_loader, it, n_batches, cfg.train.seed)
    del it
    rate = images / elapsed
    result: dict[str, Any] = {
        "row": row.id,
        "label": row.label,
        "dataset": data.dataset,
        "root": data.root,
        "images_in_split": len(train_loader.dataset),
        "img_size": data.img_size,
        "batch_size": bs,
        "workers": data.num_workers,
        "auto_augment": cfg.train.auto_augment,
        "batches": n_batches,
        "first_batch_s": first,
        "next_epoch_first_batch_s": next_epoch,
        "batch_dtype": batch_dtype,  # normalised on the training device (kd.data.BatchNormalize)
        "bytes_per_image": bytes_per_image,
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
