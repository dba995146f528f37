"""What a row trains with: student, frozen teacher, KD loss, loaders (not yet wrapped by
Accelerate). `weights=False` builds the same shapes from scratch, for benchmarks."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from kd import config as C
from kd import data as D
from kd import models as M
from kd import provenance
from kd.evaluate import eval_transform
from kd.grid import Row, dependency_checkpoint
from kd.losses import KDLoss, KDOptions, LossInputs


@dataclass
class Built:
    """Everything a row trains with, before Accelerate wraps it."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    step_module: torch.nn.Module
    train_loader: Any
    test_loader: Any
    loader_generator: torch.Generator
    mixup: Callable | None
    teacher_renorm: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int
    # The loaders give uint8 batches; these make them the student's input on the device.
    train_normalize: Callable[[torch.Tensor], torch.Tensor]
    test_normalize: Callable[[torch.Tensor], torch.Tensor]
    # Dependency row id -> the MLflow run whose checkpoint the teacher or init was read from.
    dependency_runs: dict[str, str] = field(default_factory=dict)


class DistillationStep(torch.nn.Module):
    """Student + KD loss in one module, so DDP sees every trainable parameter (the student and
    the embed_mse projection) in one forward and synchronises all their gradients."""

    def __init__(
        self, student: torch.nn.Module, kd_loss: torch.nn.Module, feature_layer: str | None
    ):
        super().__init__()
        self.student = student
        self.kd_loss = kd_loss
        self.feature_layer = feature_layer

    def forward(
        self, images, targets, teacher_logits=None, teacher_emb=None
    ) -> dict[str, torch.Tensor]:
        out = M.forward_with_embedding(self.student, images, feature_layer=self.feature_layer)
        inputs = LossInputs(
            logits=out.logits,
            dist_logits=out.dist_logits,
            targets=targets,
            teacher_logits=teacher_logits,
            student_emb=out.embedding,
            teacher_emb=teacher_emb,
        )
        return self.kd_loss(inputs)


def loss_reads_class_head(cfg: C.RowConfig) -> bool:
    """Does a term of the row's loss read the student's class head (`ce`, `ikd`)? Without one,
    some student parameters get no gradient: the class head of a distilled DeiT trained by
    `deit_hard`/`deit_soft` alone, every head (and, with `feature_layer`, the layers after it)
    when only embedding terms train. Under several processes DDP must then look for unused
    parameters at every step (a graph traversal; left off otherwise), or the second step fails."""
    return any(cfg.kd.get(term, 0) > 0 for term in ("ce", "ikd"))


def mixed_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def resolve_weights(
    row: Row, ref: C.InitConfig | C.TeacherConfig, pretrained_ok: bool
) -> dict[str, Any]:
    """`build_model` arguments for where a student's or teacher's weights come from."""
    if getattr(ref, "row", None):
        path = dependency_checkpoint(row, ref.row)
        if not path.is_file():
            raise FileNotFoundError(
                f"row '{row.id}': needs the best checkpoint of row '{ref.row}' at {path}, which does not "
                f"exist; run row '{ref.row}' first (launch/grid.py runs dependencies before dependents)"
            )
        return {"source": "row", "checkpoint": path, "trusted_checkpoint": True}
    if getattr(ref, "file", None):
        return {"source": "file", "checkpoint": ref.file}
    if isinstance(ref, C.InitConfig):
        if ref.source == "pretrained":
            return {"source": "pretrained", "pretrained_tag": ref.tag}
        return {"source": "scratch"}
    return {"source": "pretrained" if pretrained_ok else "scratch"}


@dataclass
class Models:
    """A row's models: what `build_models` returns."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None  # None when no term with a weight needs it
    step_module: DistillationStep
    teacher_renorm: tuple[torch.Tensor, torch.Tensor] | None
    student_data: dict[str, Any]  # input size and normalisation the student expects
    dependency_runs: dict[str, str]  # dependency row id -> run that wrote the checkpoint read


def build_models(row: Row, num_classes: int, *, weights: bool = True) -> Models:
    """Student, frozen teacher, KD loss and the step module of a row.

    `weights=False` builds every model from scratch: the speed of a step does not depend on
    the weights, so benchmarks need neither downloads nor the checkpoints of other rows.
    """
    cfg = row.config
    where = f"row '{row.id}' ({row.grid_file})"
    scratch = {"source": "scratch"}
    # Read before the weights: which run wrote each dependency checkpoint about to be loaded.
    dependency_runs = provenance.dependency_runs(row) if weights else {}
    student = M.build_model(
        cfg.student.model,
        num_classes=num_classes,
        img_size=cfg.data.img_size,
        drop_path_rate=cfg.student.drop_path,
        where=where,
        **(resolve_weights(row, cfg.init, pretrained_ok=True) if weights else scratch),
    )
    if M.is_distilled(student):
        # Two heads in training only when a term trains the distillation head; otherwise timm
        # returns the mean of both heads, so both learn the labels and evaluation (the mean of
        # the heads) scores a trained classifier.
        uses_dist_head = any(cfg.kd.get(t, 0) > 0 for t in ("deit_hard", "deit_soft"))
        student.set_distilled_training(uses_dist_head)
    if cfg.train.trainable == "head":
        freeze_backbone(student)
    teacher = None
    if cfg.teacher is not None:
        teacher = M.build_model(
            cfg.teacher.model,
            num_classes=num_classes,
            img_size=cfg.data.img_size,
            where=where + " teacher",
            **(
                resolve_weights(row, cfg.teacher, pretrained_ok=cfg.teacher.pretrained)
                if weights
                else scratch
            ),
        )
        M.freeze_teacher(teacher)
        teacher.kdgrid_feature_layer = cfg.teacher.feature_layer  # read by teacher_forward
    kd_loss = KDLoss(
        cfg.kd,
        KDOptions(
            tau=cfg.kd_options.tau,
            soft_reduction=cfg.kd_options.soft_reduction,
            label_smoothing=cfg.train.label_smoothing,
        ),
        student_dim=M.embedding_dim(student, feature_layer=cfg.student.feature_layer),
        teacher_dim=(
            M.embedding_dim(teacher, feature_layer=cfg.teacher.feature_layer)
            if teacher is not None
            else None
        ),
    )
    if teacher is not None and not kd_loss.needs_teacher:
        teacher = None  # only used for terms with weight 0: don't pay for its forward pass
    student_data = M.data_config(student)
    renorm = None
    if teacher is not None:
        teacher_data = M.data_config(teacher)
        if tuple(teacher_data["mean"]) != tuple(student_data["mean"]) or tuple(
            teacher_data["std"]
        ) != tuple(student_data["std"]):
            renorm = renorm_tensors(student_data, teacher_data)
    step_module = DistillationStep(student, kd_loss, cfg.student.feature_layer)
    return Models(student, teacher, step_module, renorm, student_data, dependency_runs)


def build(row: Row, accelerator: Any) -> Built:
    """Models, loss, data and loaders for a row (not yet wrapped by Accelerate)."""
    cfg = row.config
    spec = D.DatasetSpec(cfg.data.dataset, cfg.data.root, cfg.data.dogs_root)
    num_classes = D.num_classes(spec)
    models = build_models(row, num_classes)
    train_loader, test_loader = build_loaders(row, spec, models.student_data)
    generator = getattr(train_loader.sampler, "generator", None) or torch.Generator()
    mixup = D.build_mixup(num_classes, cfg.train.mixup, cfg.train.cutmix, cfg.train.label_smoothing)
    train_normalize, test_normalize = batch_normalizers(cfg, models.student_data)
    return Built(
        student=models.student,
        teacher=models.teacher,
        step_module=models.step_module,
        train_loader=train_loader,
        test_loader=test_loader,
        loader_generator=generator,
        mixup=mixup,
        teacher_renorm=models.teacher_renorm,
        num_classes=num_classes,
        train_normalize=train_normalize,
        test_normalize=test_normalize,
        dependency_runs=models.dependency_runs,
    )


def batch_normalizers(cfg: C.RowConfig, student_data: dict[str, Any]) -> tuple[Any, Any]:
    """(train, test): what the uint8 batches of `build_loaders` go through once on the device,
    the student's normalisation and, for training, the recipe's random erasing."""
    mean, std = student_data["mean"], student_data["std"]
    return D.BatchNormalize(mean, std, re_prob=cfg.train.re_prob), D.BatchNormalize(mean, std)


def build_loaders(
    row: Row, spec: Any, student_data: dict[str, Any]
) -> tuple[DataLoader, DataLoader]:
    """The training and test loaders of a row. Their batches are uint8 images: normalisation
    and random erasing happen on the device (`batch_normalizers`)."""
    cfg = row.config
    train_tf = D.build_transforms(
        train=True,
        img_size=cfg.data.img_size,
        mean=student_data["mean"],
        std=student_data["std"],
        auto_augment=cfg.train.auto_augment,
        hflip=cfg.train.hflip,
        scale_min=cfg.train.crop_scale_min,
        interpolation=student_data.get("interpolation", "bicubic"),
        uint8=True,
    )
    transforms = {"train": train_tf, "test": eval_transform(cfg, student_data, uint8=True)}
    datasets = {  # both splits are read before either loader is built
        split: D.load_split(
            spec,
            split,
            transform=tf,
            skip_corrupt=cfg.data.skip_corrupt,
            per_class=cfg.data.train_per_class if split == "train" else None,
            subset_seed=cfg.data.subset_seed,
        )
        for split, tf in transforms.items()
    }
    train_loader, test_loader = (
        D.build_loader(
            datasets[split],
            batch_size=cfg.train.batch_size,
            train=split == "train",
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
        )
        for split in ("train", "test")
    )
    # epoch 0 for whoever reads the loader before the loop seeds each epoch (bench.py data)
    datasets["train"].seed_augmentations(cfg.train.seed, 0)
    return train_loader, test_loader


def freeze_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """`train.trainable: head`: only the classifier head(s) learn (a linear probe).

    Every other parameter stops requiring gradients (timm's optimizer factory leaves such
    parameters out), and the backbone stays in eval mode whatever `.train()` says, so its
    BatchNorm statistics, dropout and stochastic depth do not move either. The override is a
    bound method, so copies of the model (EMA, clustering) keep the behaviour for themselves.
    """
    heads = model.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    head_params = {id(p) for head in heads for p in head.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in head_params)

    def train_head_only(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        torch.nn.Module.train(self, False)
        self.training = mode
        classifier = self.get_classifier()
        for head in classifier if isinstance(classifier, (tuple, list)) else [classifier]:
            head.train(mode)
        return self

    model.train = types.MethodType(train_head_only, model)
    return model.train(model.training)


def renorm_tensors(student_data: dict, teacher_data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift that turn the student's normalised batch into the teacher's:
    x_t = (x_s * std_s + mean_s - mean_t) / std_t = x_s * a + b."""
    ms, ss = torch.tensor(student_data["mean"]), torch.tensor(student_data["std"])
    mt, st = torch.tensor(teacher_data["mean"]), torch.tensor(teacher_data["std"])
    a = (ss / st).view(1, 3, 1, 1)
    b = ((ms - mt) / st).view(1, 3, 1, 1)
    return a, b
