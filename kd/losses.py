"""Knowledge-distillation loss terms and their string-keyed registry.

Each grid row names its loss as a mapping of term name to weight; the total loss is the weighted
sum and every term is logged on its own (DESIGN.md section 4). Terms:

- ``ce``: cross-entropy of the class head against the labels (index or mixup/cutmix soft targets).
- ``deit_hard``: DeiT hard distillation, CE of the distillation head against ``argmax(teacher)``.
- ``deit_soft``: DeiT soft distillation, ``tau**2 * KL(softmax(t/tau) || softmax(s/tau))`` on the
  distillation head; ``KDOptions.soft_reduction`` picks ``"batchmean"`` (timm, divide by batch) or
  ``"deit"`` (DeiT's code, divide by batch x classes).
- ``ikd``: instance KD, the same KL (batchmean, times ``tau**2``) on the class head.
- ``rkd_distance`` / ``rkd_angle``: relational KD (Park et al. 2019) on pooled embeddings.
- ``embed_mse``: MSE between student and teacher embeddings, through a learned linear projection
  owned by :class:`KDLoss` when the dimensions differ.

DeiT's recipes written as grid rows (with DeiT's ``a = 0.5``):

- hard distillation: ``{ce: 0.5, deit_hard: 0.5}``
- soft distillation: ``{ce: 0.5, deit_soft: 0.5}``

A student without a distillation token passes its class logits as ``dist_logits`` too, as DeiT
does. Teacher tensors are detached inside every term, so the teacher never receives gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.loss_terms import NEEDS_TEACHER, check_terms, unknown_term_message

__all__ = ["NEEDS_TEACHER", "check_terms"]  # re-exported: the grid checks read them without torch

SOFT_REDUCTIONS = ("batchmean", "deit")
_EPS = 1e-12


# --------------------------------------------------------------------------- loss functions


def ce(logits: Tensor, targets: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy for index targets ``[B]`` or soft targets ``[B, C]`` (mixup/cutmix).

    Label smoothing applies to index targets only: soft targets from mixup/cutmix already carry
    their own smoothing (timm builds them that way), so smoothing them again would double it.
    """
    if targets.dtype.is_floating_point:
        if targets.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}; pass class indices [B] or probabilities [B, C]"
            )
        return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def hard_distillation(dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT hard distillation: CE against the teacher's top-1 class, used as a hard label."""
    return F.cross_entropy(dist_logits, teacher_logits.detach().argmax(dim=-1))


def soft_distillation(
    dist_logits: Tensor, teacher_logits: Tensor, tau: float, reduction: str = "batchmean"
) -> Tensor:
    """``tau**2 * KL(softmax(teacher/tau) || softmax(student/tau))``.

    ``"batchmean"`` divides the summed KL by the batch size (timm, the KL's true per-sample
    value); ``"deit"`` divides by batch x classes exactly as DeiT's code does, which makes the
    term ``num_classes`` times smaller, so weights tuned for one do not carry over to the other.
    """
    if reduction not in SOFT_REDUCTIONS:
        raise ValueError(
            f"unknown soft distillation reduction {reduction!r}; use one of {', '.join(SOFT_REDUCTIONS)}"
        )
    log_p_student = F.log_softmax(dist_logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    kl_sum = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    divisor = dist_logits.shape[0] if reduction == "batchmean" else dist_logits.numel()
    return kl_sum * (tau * tau) / divisor


def ikd(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Instance KD (Hinton et al.) on the class head: batchmean KL times ``tau**2``."""
    return soft_distillation(student_logits, teacher_logits, tau, reduction="batchmean")


def _check_batch(emb: Tensor, side: str) -> None:
    """Relational terms compare samples with each other, so they need a 2-D batch of >= 2."""
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise ValueError(
            f"RKD needs {side} embeddings of shape [B, D] with B >= 2, got {tuple(emb.shape)}; "
            "pass pooled pre-logit features and a batch of at least two samples"
        )


def _normalised_distances(emb: Tensor) -> Tensor:
    """Pairwise Euclidean distances ``[B, B]`` divided by the mean off-diagonal distance.

    The clamp keeps the square root's gradient finite on the zero diagonal (and for duplicates).
    """
    diff = emb.unsqueeze(1) - emb.unsqueeze(0)
    dist = diff.pow(2).sum(dim=-1).clamp_min(_EPS).sqrt()
    off_diagonal = ~torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    dist = dist * off_diagonal
    return dist / dist[off_diagonal].mean().clamp_min(_EPS)


def rkd_distance(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD distance loss (Park et al. 2019): match the batch's normalised distance matrices.

    Normalising each side by its mean distance makes the loss scale-invariant, so student and
    teacher embeddings of different magnitudes (and dimensions) can be compared. Smooth-L1 is
    averaged over the whole ``[B, B]`` matrix, as in the paper's code.
    """
    _check_batch(student_emb, "student")
    _check_batch(teacher_emb, "teacher")
    with torch.no_grad():
        teacher_d = _normalised_distances(teacher_emb.detach())
    return F.smooth_l1_loss(_normalised_distances(student_emb), teacher_d)


def _triplet_cosines(emb: Tensor) -> Tensor:
    """``[B, B, B]`` tensor whose ``[i, j, k]`` is the cosine of the angle j-i-k at anchor i.

    Entries with ``j == i`` or ``k == i`` have a zero vector and are 0 on both sides.
    """
    diff = F.normalize(emb.unsqueeze(0) - emb.unsqueeze(1), p=2, dim=-1)  # [i, j] = e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD angle loss (Park et al. 2019): match the cosines of all triplet angles, smooth-L1.

    Memory grows as ``B**3 * D`` for the difference vectors' products (``B**3`` cosines plus
    ``B**2 * D`` differences per side), so keep the batch it sees moderate (e.g. <= 256).
    """
    _check_batch(student_emb, "student")
    _check_batch(teacher_emb, "teacher")
    with torch.no_grad():
        teacher_cos = _triplet_cosines(teacher_emb.detach())
    return F.smooth_l1_loss(_triplet_cosines(student_emb), teacher_cos)


def embed_mse(
    student_emb: Tensor, teacher_emb: Tensor, projection: nn.Module | None = None
) -> Tensor:
    """MSE between (projected) student embeddings and the teacher's.

    ``projection`` maps the student dimension onto the teacher's; it is trained with the student.
    """
    if projection is not None:
        student_emb = projection(student_emb)
    if student_emb.shape[-1] != teacher_emb.shape[-1]:
        raise ValueError(
            f"embed_mse: student embedding dim {student_emb.shape[-1]} != teacher dim "
            f"{teacher_emb.shape[-1]}; pass a projection (KDLoss builds one when given "
            "student_dim and teacher_dim)"
        )
    return F.mse_loss(student_emb, teacher_emb.detach())


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class KDOptions:
    """Hyper-parameters shared by the terms; recorded in the row config."""

    tau: float = 1.0
    soft_reduction: str = "batchmean"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"KD temperature tau must be a positive number, got {self.tau}")
        if self.soft_reduction not in SOFT_REDUCTIONS:
            raise ValueError(
                f"unknown soft_reduction {self.soft_reduction!r}; use one of "
                f"{', '.join(SOFT_REDUCTIONS)}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class LossInputs:
    """Everything one training step hands to the loss; unused fields may be None.

    ``dist_logits`` is the distillation head's output; a student without a distillation token
    passes ``logits`` here as well.
    """

    logits: Tensor
    dist_logits: Tensor
    targets: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_emb: Tensor | None = None
    teacher_emb: Tensor | None = None


TermFn = Callable[..., Tensor]
"""``fn(inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None) -> Tensor``;
only ``embed_mse`` uses ``projection``."""


@dataclass(frozen=True)
class TermSpec:
    """One registered loss term and what a row must provide for it."""

    name: str
    fn: TermFn
    needs_teacher: bool
    needs_embeddings: bool
    needs_labels: bool
    doc: str


class UnknownTermError(KeyError):
    """A KD term name that is not in :data:`TERMS`."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def _term_ce(inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None) -> Tensor:
    return ce(inputs.logits, inputs.targets, options.label_smoothing)


def _term_deit_hard(
    inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None
) -> Tensor:
    return hard_distillation(inputs.dist_logits, inputs.teacher_logits)


def _term_deit_soft(
    inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None
) -> Tensor:
    return soft_distillation(
        inputs.dist_logits, inputs.teacher_logits, options.tau, options.soft_reduction
    )


def _term_ikd(
    inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None
) -> Tensor:
    return ikd(inputs.logits, inputs.teacher_logits, options.tau)


def _term_rkd_distance(
    inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None
) -> Tensor:
    return rkd_distance(inputs.student_emb, inputs.teacher_emb)


def _term_rkd_angle(
    inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None
) -> Tensor:
    return rkd_angle(inputs.student_emb, inputs.teacher_emb)


def _term_embed_mse(
    inputs: LossInputs, options: KDOptions, projection: nn.Module | None = None
) -> Tensor:
    return embed_mse(inputs.student_emb, inputs.teacher_emb, projection)


def _spec(
    name: str,
    fn: TermFn,
    doc: str,
    *,
    teacher: bool = True,
    emb: bool = False,
    labels: bool = False,
) -> TermSpec:
    """Keyword flags keep the registry table readable."""
    return TermSpec(
        name, fn, needs_teacher=teacher, needs_embeddings=emb, needs_labels=labels, doc=doc
    )


TERMS: dict[str, TermSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "ce", _term_ce, "cross-entropy of the class head vs labels", teacher=False, labels=True
        ),
        _spec("deit_hard", _term_deit_hard, "DeiT: CE of the dist head vs teacher argmax"),
        _spec("deit_soft", _term_deit_soft, "DeiT: tau^2 KL(teacher || dist head)"),
        _spec("ikd", _term_ikd, "instance KD: tau^2 KL(teacher || class head)"),
        _spec("rkd_distance", _term_rkd_distance, "RKD normalised-distance loss", emb=True),
        _spec("rkd_angle", _term_rkd_angle, "RKD triplet-angle loss (B^3 memory)", emb=True),
        _spec("embed_mse", _term_embed_mse, "MSE of (projected) embeddings", emb=True),
    )
}


if {n: t.needs_teacher for n, t in TERMS.items()} != NEEDS_TEACHER:
    raise ImportError("kd.losses.TERMS and kd.loss_terms.NEEDS_TEACHER disagree: update both")


def get_term(name: str) -> TermSpec:
    """Look a term up by its registry name."""
    try:
        return TERMS[name]
    except (KeyError, TypeError):
        raise UnknownTermError(unknown_term_message(name)) from None


# --------------------------------------------------------------------------- composer


_DEFAULT_OPTIONS = KDOptions()


class KDLoss(nn.Module):
    """Weighted sum of named KD terms; returns every term so each can be logged.

    Owns the ``embed_mse`` projection (a submodule, so it is optimised and checkpointed with the
    student) when the student and teacher embedding dimensions differ.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        options: KDOptions = _DEFAULT_OPTIONS,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        problems = check_terms(weights)
        if problems:
            raise ValueError("invalid KD loss weights:\n- " + "\n- ".join(problems))
        self.weights = {name: float(w) for name, w in weights.items() if w != 0}
        self.options = options
        self.specs = [TERMS[name] for name in self.weights]
        self.projection: nn.Module | None = None
        if (
            "embed_mse" in self.weights
            and student_dim is not None
            and teacher_dim is not None
            and student_dim != teacher_dim
        ):
            self.projection = nn.Linear(student_dim, teacher_dim)

    @property
    def needs_teacher(self) -> bool:
        return any(spec.needs_teacher for spec in self.specs)

    @property
    def needs_embeddings(self) -> bool:
        return any(spec.needs_embeddings for spec in self.specs)

    @property
    def needs_labels(self) -> bool:
        return any(spec.needs_labels for spec in self.specs)

    @staticmethod
    def _check_inputs(spec: TermSpec, inputs: LossInputs) -> None:
        """Fail with the term's name rather than deep inside a torch op on None."""
        if spec.needs_labels and inputs.targets is None:
            raise ValueError(f"term {spec.name!r} needs labels but the row has no targets")
        logit_term = spec.needs_teacher and not spec.needs_embeddings
        if logit_term and inputs.teacher_logits is None:
            raise ValueError(f"term {spec.name!r} needs teacher logits but the row has no teacher")
        if spec.needs_embeddings and (inputs.student_emb is None or inputs.teacher_emb is None):
            missing = "student" if inputs.student_emb is None else "teacher"
            raise ValueError(
                f"term {spec.name!r} needs student and teacher embeddings but the {missing} "
                "embedding is missing; return pooled pre-logit features from both models"
            )

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        """Unweighted value of every non-zero-weight term, plus ``"loss"``, their weighted sum."""
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for spec in self.specs:
            self._check_inputs(spec, inputs)
            value = spec.fn(inputs, self.options, self.projection)
            out[spec.name] = value
            weighted = self.weights[spec.name] * value
            total = weighted if total is None else total + weighted
        assert total is not None  # check_terms guarantees a non-zero weight
        out["loss"] = total
        return out
