"""Loss terms against values computed by hand with plain Python math (no torch loss functions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd.losses import (
    TERMS,
    KDLoss,
    KDOptions,
    LossInputs,
    UnknownTermError,
    ce,
    check_terms,
    embed_mse,
    get_term,
    hard_distillation,
    ikd,
    rkd_angle,
    rkd_distance,
    soft_distillation,
)

LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
TEACHER = [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]


def t(rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    scaled = [x / tau for x in row]
    log_z = math.log(sum(math.exp(x) for x in scaled))
    return [x - log_z for x in scaled]


def smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def kl_sum(student: list[list[float]], teacher: list[list[float]], tau: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        log_ps, log_pt = log_softmax(s_row, tau), log_softmax(t_row, tau)
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_ps, log_pt, strict=True))
    return total


# --------------------------------------------------------------------------- functions


def test_ce_index_targets():
    expected = -(log_softmax(LOGITS[0])[2] + log_softmax(LOGITS[1])[0]) / 2
    assert ce(t(LOGITS), torch.tensor([2, 0])).item() == pytest.approx(expected)


def test_ce_label_smoothing():
    eps, n_cls = 0.1, 3
    expected = 0.0
    for row, y in zip(LOGITS, [2, 0], strict=True):
        lp = log_softmax(row)
        q = [eps / n_cls + (1 - eps) * (k == y) for k in range(n_cls)]
        expected -= sum(qk * lk for qk, lk in zip(q, lp, strict=True)) / 2
    assert ce(t(LOGITS), torch.tensor([2, 0]), smoothing=eps).item() == pytest.approx(expected)


def test_ce_soft_targets():
    q = [[0.7, 0.0, 0.3], [0.2, 0.2, 0.6]]
    expected = 0.0
    for q_row, row in zip(q, LOGITS, strict=True):
        expected -= sum(qk * lk for qk, lk in zip(q_row, log_softmax(row), strict=True)) / 2
    assert ce(t(LOGITS), t(q)).item() == pytest.approx(expected)


def test_ce_soft_targets_bad_shape():
    with pytest.raises(ValueError, match="soft targets"):
        ce(t(LOGITS), t([[1.0, 0.0], [0.0, 1.0]]))


def test_hard_distillation():
    # teacher argmax = [0, 1]
    expected = -(log_softmax(LOGITS[0])[0] + log_softmax(LOGITS[1])[1]) / 2
    assert hard_distillation(t(LOGITS), t(TEACHER)).item() == pytest.approx(expected)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_distillation_reductions(tau):
    summed = kl_sum(LOGITS, TEACHER, tau) * tau * tau
    batchmean = soft_distillation(t(LOGITS), t(TEACHER), tau).item()
    deit = soft_distillation(t(LOGITS), t(TEACHER), tau, reduction="deit").item()
    assert batchmean == pytest.approx(summed / 2)
    assert deit == pytest.approx(summed / 6)
    assert deit == pytest.approx(batchmean / 3)  # DeiT = batchmean / num_classes


def test_soft_distillation_bad_reduction():
    with pytest.raises(ValueError, match="batchmean, deit"):
        soft_distillation(t(LOGITS), t(TEACHER), 1.0, reduction="mean")


def test_ikd_is_batchmean_kl():
    tau = 4.0
    expected = kl_sum(LOGITS, TEACHER, tau) * tau * tau / 2
    assert ikd(t(LOGITS), t(TEACHER), tau).item() == pytest.approx(expected)


def test_rkd_distance_hand_value():
    # student: 3-4-5 triangle, mean 4 -> (d01, d02, d12) = (0.75, 1, 1.25)
    # teacher: collinear 0, 1, 2, mean 4/3 -> (0.75, 1.5, 0.75)
    student = t([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    teacher = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    expected = 2 * (smooth_l1(0.0) + smooth_l1(-0.5) + smooth_l1(0.5)) / 9  # full 3x3 mean
    assert expected == pytest.approx(1 / 18)
    assert rkd_distance(student, teacher).item() == pytest.approx(expected)


def test_rkd_distance_invariances():
    student = t([[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [3.0, 0.0, 0.0], [0.2, 0.2, 0.2]])
    assert rkd_distance(student, student.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_distance(student, 2 * student).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_needs_a_batch():
    with pytest.raises(ValueError, match="B >= 2"):
        rkd_distance(t([[1.0, 2.0]]), t([[1.0, 2.0]]))


def test_rkd_angle_hand_value():
    # student: right angle at point 0; teacher: the same points made collinear.
    # anchor 0: cos(1-0-2) 0 vs 1          -> two entries of smooth_l1(1)   = 0.5 each
    # anchor 1: cos(0-1-2) 1/sqrt2 vs -1   -> two entries of smooth_l1(1+1/sqrt2)
    # anchor 2: cos(0-2-1) 1/sqrt2 vs 1    -> two entries of smooth_l1(1-1/sqrt2)
    # every other entry (j == k, or j/k == anchor) agrees; 27 entries in all
    student = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    r = 1 / math.sqrt(2)
    expected = 2 * (smooth_l1(1.0) + smooth_l1(1 + r) + smooth_l1(1 - r)) / 27
    assert expected == pytest.approx(3.5 / 27)
    assert rkd_angle(student, teacher).item() == pytest.approx(expected)


def test_rkd_angle_rotation_scale_translation_invariant():
    student = t([[0.0, 1.0], [1.0, -1.0], [3.0, 0.5], [-0.5, 0.2]])
    c, s = math.cos(0.7), math.sin(0.7)
    rotation = t([[c, -s], [s, c]])
    teacher = 3.0 * student @ rotation.T + t([[5.0, -2.0]])
    assert rkd_angle(student, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_embed_mse_plain_and_projected():
    student = t([[1.0, 2.0], [0.0, -1.0]])
    teacher = t([[0.0, 2.0], [1.0, 1.0]])
    assert embed_mse(student, teacher).item() == pytest.approx((1 + 0 + 1 + 4) / 4)

    proj = nn.Linear(2, 3, bias=False).double()
    with torch.no_grad():
        proj.weight.copy_(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    teacher3 = t([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # projected student: [1, 2, 3], [0, -1, -1]
    expected = (0 + 0 + 9 + 0 + 1 + 1) / 6
    assert embed_mse(student, teacher3, proj).item() == pytest.approx(expected)


def test_embed_mse_dim_mismatch_says_so():
    with pytest.raises(ValueError, match="projection"):
        embed_mse(t([[1.0, 2.0]]), t([[1.0, 2.0, 3.0]]))


def test_gradients_reach_student_and_projection_never_teacher():
    torch.manual_seed(0)
    logits, teacher_logits = t(LOGITS, grad=True), t(TEACHER, grad=True)
    s_emb = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t_emb = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weights = {name: 1.0 for name in TERMS}
    loss_fn = KDLoss(weights, KDOptions(tau=2.0), student_dim=3, teacher_dim=5).double()
    inputs = LossInputs(
        logits=logits,
        dist_logits=logits,
        targets=torch.tensor([1, 2]),
        teacher_logits=teacher_logits,
        student_emb=s_emb,
        teacher_emb=t_emb,
    )
    # embedding terms see a batch of 4, logit terms a batch of 2: fine for this check
    out = loss_fn(inputs)
    out["loss"].backward()
    assert teacher_logits.grad is None and t_emb.grad is None
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert s_emb.grad is not None and torch.isfinite(s_emb.grad).all()
    assert loss_fn.projection.weight.grad is not None


# --------------------------------------------------------------------------- composer


def test_kdloss_weighted_sum_and_terms():
    logits, dist = t(LOGITS), t(TEACHER) * 0.5
    inputs = LossInputs(
        logits=logits, dist_logits=dist, targets=torch.tensor([2, 0]), teacher_logits=t(TEACHER)
    )
    options = KDOptions(tau=2.0, soft_reduction="deit", label_smoothing=0.1)
    loss_fn = KDLoss({"ce": 0.5, "deit_soft": 0.5, "ikd": 0.0}, options)
    out = loss_fn(inputs)
    assert set(out) == {"ce", "deit_soft", "loss"}  # zero-weight term skipped
    assert out["ce"].item() == pytest.approx(ce(logits, torch.tensor([2, 0]), 0.1).item())
    assert out["deit_soft"].item() == pytest.approx(
        soft_distillation(dist, t(TEACHER), 2.0, "deit").item()
    )
    assert out["loss"].item() == pytest.approx(
        0.5 * out["ce"].item() + 0.5 * out["deit_soft"].item()
    )
    assert loss_fn.needs_teacher and loss_fn.needs_labels and not loss_fn.needs_embeddings


def test_kdloss_projection_is_a_submodule_only_when_needed():
    with_proj = KDLoss({"embed_mse": 1.0}, student_dim=3, teacher_dim=5)
    assert "projection.weight" in with_proj.state_dict()
    assert sum(p.numel() for p in with_proj.parameters()) == 3 * 5 + 5
    assert KDLoss({"embed_mse": 1.0}, student_dim=4, teacher_dim=4).projection is None
    assert KDLoss({"ce": 1.0}, student_dim=3, teacher_dim=5).projection is None


def test_kdloss_missing_teacher_error():
    loss_fn = KDLoss({"ce": 1.0, "ikd": 1.0})
    inputs = LossInputs(logits=t(LOGITS), dist_logits=t(LOGITS), targets=torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match="term 'ikd' needs teacher logits but the row has no teacher"
    ):
        loss_fn(inputs)


def test_kdloss_missing_embeddings_and_labels_errors():
    inputs = LossInputs(logits=t(LOGITS), dist_logits=t(LOGITS), teacher_logits=t(TEACHER))
    with pytest.raises(ValueError, match="needs labels"):
        KDLoss({"ce": 1.0})(inputs)
    with pytest.raises(ValueError, match="needs student and teacher embeddings"):
        KDLoss({"rkd_distance": 1.0})(inputs)


def test_kdloss_rejects_bad_weights_with_all_problems():
    with pytest.raises(ValueError) as info:
        KDLoss({"cee": 1.0, "ikd": -1.0})
    assert "did you mean 'ce'" in str(info.value) and "must be >= 0" in str(info.value)


# --------------------------------------------------------------------------- registry


def test_registry_names():
    assert list(TERMS) == [
        "ce", "deit_hard", "deit_soft", "ikd", "rkd_distance", "rkd_angle", "embed_mse"
    ]  # fmt: skip


def test_check_terms_reports_everything_at_once():
    problems = check_terms({"deit_hrad": 1.0, "ikd": -0.5, "ce": float("nan")})
    assert len(problems) == 3
    assert problems[0].startswith("unknown KD term 'deit_hrad'; did you mean 'deit_hard'? Valid")
    assert "ce, deit_hard, deit_soft, ikd, rkd_distance, rkd_angle, embed_mse" in problems[0]
    assert "'ikd'" in problems[1] and ">= 0" in problems[1]
    assert "'ce'" in problems[2] and "finite" in problems[2]


def test_check_terms_empty_zero_and_fine():
    assert "no KD terms" in check_terms({})[0]
    assert "all KD term weights are zero" in check_terms({"ce": 0.0, "ikd": 0})[0]
    assert check_terms({"ce": 0.5, "deit_hard": 0.5}) == []


def test_get_term():
    assert get_term("rkd_angle").needs_embeddings
    with pytest.raises(UnknownTermError) as info:
        get_term("ikdd")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown KD term 'ikdd'; did you mean 'ikd'?")


def test_kd_options_validation():
    with pytest.raises(ValueError, match="batchmean, deit"):
        KDOptions(soft_reduction="sum")
    with pytest.raises(ValueError, match="tau"):
        KDOptions(tau=0.0)
