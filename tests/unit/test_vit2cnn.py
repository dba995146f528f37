"""The second study, ViT -> CNN (grids/vit2cnn.yaml): the rows of its Table 1 and their terms,
feature-level KD through the real training step (gradients reach the student and the embed_mse
projection, never the teacher), the layer the grid taps, the head-only teacher row, and an
end-to-end smoke run of two rows with the clustering evaluation recorded in MLflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from kd import config as C
from kd import train
from kd.data import generate_dataset
from kd.grid import Row, load_grid
from kd.losses import KDLoss
from kd.models import build_model, embedding_dim, freeze_teacher, smoke_model_name

REPO = Path(__file__).resolve().parents[2]
GRID = REPO / "grids" / "vit2cnn.yaml"
VIT = smoke_model_name("vit_small_patch16_224.dino")  # vit_tiny_patch16_224: 192-d
RESNET = smoke_model_name("resnet50")  # resnet18: 512-d, BatchNorm
IMG = 32
CLASSES = 4

# Table 1 of the study: label -> (CE, embedding MSE, IKD, RKD) and the reported accuracy.
TABLE_1 = {
    "A": ((False, True, False, True), 0.8),
    "B": ((False, False, True, True), 69.9),
    "C": ((False, True, True, True), 67.8),
    "D": ((True, False, False, False), 77.7),
    "E": ((True, True, True, False), 71.9),
    "F": ((True, True, False, True), 74.0),
    "G": ((True, False, True, True), 74.4),
    "H": ((True, True, True, True), 70.9),
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The grid


@pytest.mark.parametrize("smoke", [False, True])
def test_rows_labels_terms_and_the_teacher_row(smoke: bool):
    grid = load_grid(GRID, smoke=smoke, check_data=False)
    rows = {row.label: row for row in grid.rows}
    assert [row.label for row in grid.rows] == [*"ABCDEFGH", "O"]
    assert len({row.key for row in grid.rows}) == 9
    teacher = rows["O"]
    assert teacher.config.teacher is None and teacher.depends_on == ()
    assert teacher.config.kd == {"ce": 1.0}
    assert teacher.config.train.trainable == "head"  # the ViT's head only
    assert teacher.config.paper.acc1 == 65.2
    vit = "vit_small_patch16_224.dino"
    assert teacher.config.student.model == (smoke_model_name(vit) if smoke else vit)
    for label, ((ce, mse, ikd, rkd), acc1) in TABLE_1.items():
        cfg = rows[label].config
        terms = {name for name, weight in cfg.kd.items() if weight > 0}
        expected = {
            name
            for name, used in (
                ("ce", ce),
                ("embed_mse", mse),
                ("ikd", ikd),
                ("rkd_distance", rkd),
                ("rkd_angle", rkd),
            )
            if used
        }
        assert terms == expected, label
        assert cfg.paper.acc1 == acc1, label
        assert cfg.train.trainable == "all", label
        assert cfg.student.model == (RESNET if smoke else "resnet50.tv_in1k"), label
        assert cfg.data.dataset == "cub", label
        assert set(cfg.evaluate.cluster) == {"cub", "cifar10"}, label
        if label == "D":  # labels only: no teacher to wait for
            assert cfg.teacher is None and rows[label].depends_on == (), label
        else:
            assert rows[label].depends_on == (teacher.id,), label
            assert cfg.teacher.row == teacher.id, label
            assert cfg.teacher.model == teacher.config.student.model, label
        if rkd:  # Park et al.'s weights: 1/2 alone, 25/50 beside CE
            assert (cfg.kd["rkd_distance"], cfg.kd["rkd_angle"]) == ((25, 50) if ce else (1, 2))
    assert rows["O"].config.evaluate.cluster == rows["A"].config.evaluate.cluster


def test_dataset_roots_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUB_ROOT", "/data/CUB_200_2011")
    monkeypatch.setenv("CIFAR10_ROOT", "/data/cifar")
    row = load_grid(GRID, check_data=False).rows[0]
    assert row.config.data.root == "/data/CUB_200_2011"
    assert row.config.evaluate.cluster == {"cub": "/data/CUB_200_2011", "cifar10": "/data/cifar"}


def test_a_dino_resnet50_checkpoint_file_is_one_override(tmp_path: Path):
    """The header's recipe for the DINO ResNet-50: `init.file=PATH` (torchvision keys, no fc)."""
    model = build_model("resnet18", num_classes=10)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    file = tmp_path / "dino_resnet_pretrain.pth"
    torch.save(state, file)
    grid = load_grid(GRID, [f"init.file={file}"], check_data=False)
    for row in grid.rows:
        assert row.config.init.source == "file" and row.config.init.file == str(file)
    student = build_model("resnet18", num_classes=200, source="file", checkpoint=file)
    assert torch.equal(student.conv1.weight, model.conv1.weight)
    assert student.fc.weight.shape == (200, 512)


# --------------------------------------------------------------------------------------------
# Feature-level KD through the real training step


def tiny_models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    student = build_model(RESNET, num_classes=CLASSES)
    teacher = build_model(VIT, num_classes=CLASSES, img_size=IMG)
    return student, teacher


def step_module(student: torch.nn.Module, teacher: torch.nn.Module, terms: dict[str, float]):
    kd_loss = KDLoss(terms, student_dim=embedding_dim(student), teacher_dim=embedding_dim(teacher))
    return train.DistillationStep(student, kd_loss, feature_layer=None)


@pytest.fixture(scope="module")
def accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("term", ["embed_mse", "rkd_distance", "rkd_angle"])
def test_each_feature_term_trains_the_student_and_never_the_teacher(term: str, accelerator):
    student, teacher = tiny_models()
    freeze_teacher(teacher)
    step = step_module(student, teacher, {term: 1.0})
    step.train()
    images, targets = torch.randn(8, 3, IMG, IMG), torch.arange(8) % CLASSES
    teacher_logits, teacher_emb = train.teacher_forward(teacher, images, None, accelerator)
    assert teacher_emb.shape == (8, 192)
    losses = step(images, targets, teacher_logits, teacher_emb)
    assert set(losses) == {term, "loss"} and losses[term] > 0
    losses["loss"].backward()
    # stem, a shortcut, a (zero-initialised, so the only one reached) last BN of a block
    for name in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.bn2.weight"):
        grad = student.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert student.fc.weight.grad is None  # the head is not on the embedding's path
    projection = step.kd_loss.projection
    if term == "embed_mse":  # student 512-d -> teacher 192-d, learned with the student
        assert projection.weight.shape == (192, 512)
        assert projection.weight.grad.abs().sum() > 0 and projection.bias.grad.abs().sum() > 0
    else:  # RKD compares the raw embeddings (scale-free, any widths): no projection
        assert projection is None
    assert all(g is None for g in grads(teacher).values())


def test_teacher_outputs_that_carry_a_graph_still_give_it_no_gradient(accelerator):
    """Even a teacher left trainable, run with autograd on, gets no gradient: every term
    detaches the teacher's side. And an optimizer step moves the student and the projection
    (it is in the optimizer), not the teacher."""
    student, teacher = tiny_models(seed=1)
    teacher.train()  # not frozen: requires_grad stays on
    terms = {"ce": 1.0, "embed_mse": 1.0, "ikd": 1.0, "rkd_distance": 25.0, "rkd_angle": 50.0}
    step = step_module(student, teacher, terms)
    optimizer = train.build_optimizer(C.TrainConfig(lr=1e-2, weight_decay=0.0), step, cuda=False)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in step.kd_loss.projection.parameters()} <= in_optimizer
    assert not {id(p) for p in teacher.parameters()} & in_optimizer
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    projection_before = step.kd_loss.projection.weight.detach().clone()
    student_before = student.conv1.weight.detach().clone()

    images, targets = torch.randn(8, 3, IMG, IMG), torch.arange(8) % CLASSES
    from kd.models import forward_with_embedding

    out = forward_with_embedding(teacher, images)
    assert out.embedding.requires_grad and out.logits.requires_grad
    step.train()
    losses = step(images, targets, out.logits, out.embedding)
    assert set(losses) == {*terms, "loss"}
    losses["loss"].backward()
    assert all(g is None for g in grads(teacher).values())
    optimizer.step()
    assert not torch.equal(step.kd_loss.projection.weight, projection_before)
    assert not torch.equal(student.conv1.weight, student_before)
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())


# --------------------------------------------------------------------------------------------
# Rows built by kd.train: the tapped layers, a head-only row


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    spec = generate_dataset(
        "imagefolder",
        tmp_path_factory.mktemp("data") / "if",
        num_classes=CLASSES,
        train_per_class=2,
        test_per_class=1,
        image_size=IMG,
    )
    return spec.root


def one_row(tmp_path: Path, data_root: str, row: dict[str, Any]) -> Row:
    text = f"""\
        name: v2c
        defaults:
          init: scratch
          data: {{dataset: imagefolder, root: {data_root}, img_size: {IMG}, num_workers: 0}}
          train: {{epochs: 1, batch_size: 4, lr: 1.0e-2, weight_decay: 0.0, warmup_epochs: 0}}
          output_dir: {tmp_path / "out"}
        rows:
          - {row}
    """
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return load_grid(path).rows[0]


def test_the_grid_names_the_layers_the_terms_tap(tmp_path: Path, data_root: str, accelerator):
    row = one_row(
        tmp_path,
        data_root,
        {
            "id": "tap",
            "label": "T",
            "student": {"model": RESNET, "feature_layer": "layer3"},  # 256-d
            "teacher": {"model": RESNET, "pretrained": False, "feature_layer": "layer2"},  # 128-d
            "kd": {"embed_mse": 1.0, "rkd_distance": 1.0},
        },
    )
    built = train.build(row, None)
    projection = built.step_module.kd_loss.projection
    assert (projection.in_features, projection.out_features) == (256, 128)
    images = torch.randn(4, 3, IMG, IMG)
    teacher_logits, teacher_emb = train.teacher_forward(built.teacher, images, None, accelerator)
    assert teacher_logits.shape == (4, CLASSES) and teacher_emb.shape == (4, 128)
    with torch.no_grad():
        layer2 = built.teacher.layer2(
            built.teacher.layer1(
                built.teacher.maxpool(
                    built.teacher.act1(built.teacher.bn1(built.teacher.conv1(images)))
                )
            )
        )
    torch.testing.assert_close(teacher_emb, layer2.mean(dim=(2, 3)))
    losses = built.step_module(images, torch.arange(4), teacher_logits, teacher_emb)
    assert losses["embed_mse"] > 0 and losses["rkd_distance"] > 0


def test_trainable_head_trains_the_classifier_only(tmp_path: Path, data_root: str):
    row = one_row(
        tmp_path,
        data_root,
        {
            "id": "probe",
            "label": "P",
            "student": {"model": RESNET, "drop_path": 0.0},
            "train": {"trainable": "head"},
        },
    )
    built = train.build(row, None)
    student = built.student
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    optimizer = train.build_optimizer(row.config.train, built.step_module, cuda=False)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(student.fc.weight), id(student.fc.bias)}
    before = {k: v.clone() for k, v in student.state_dict().items()}

    built.step_module.train()  # as the loop does each epoch
    images, targets = torch.randn(4, 3, IMG, IMG), torch.arange(4)
    losses = built.step_module(images, targets)
    losses["loss"].backward()
    optimizer.step()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The backbone is frozen in eval mode: neither its weights nor BatchNorm's running
    # statistics move (in train mode the BN layers would update them on every batch).
    assert changed == {"fc.weight", "fc.bias"}, sorted(changed)[:5]
    assert student.fc.training and not student.bn1.training and not student.layer1.training
    student.eval()
    assert not student.fc.training
    student.train()
    assert student.fc.training and not student.layer4[1].bn2.training


# --------------------------------------------------------------------------------------------
# End to end: the teacher row and the row with every term, --smoke, local executor


@pytest.mark.e2e
def test_smoke_grid_rows_record_accuracy_cluster_metrics_and_maps(tmp_path: Path):
    shutil.copytree(REPO / "grids", tmp_path / "grids")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "grid.py"), "grids/vit2cnn.yaml", "--smoke"]
        + ["--rows", "O,H", "--executor", "local", "--max-parallel", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "2 finished, 0 failed" in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("kd-vit2cnn-smoke")
    runs = {
        r.data.tags["kdgrid.label"]: r
        for r in client.search_runs([experiment.experiment_id])
        if "kdgrid.label" in r.data.tags
    }
    assert set(runs) == {"O", "H"}
    for label, run in runs.items():
        assert run.info.status == "FINISHED", label
        metrics = run.data.metrics
        for dataset in ("cub", "cifar10"):
            assert 0 <= metrics[f"cluster/{dataset}/nmi"] <= 1, label
            assert -1 <= metrics[f"cluster/{dataset}/ari"] <= 1, label
            assert metrics[f"cluster/{dataset}/samples"] == 12, label  # 4 classes x 3 tests
            [history] = [client.get_metric_history(run.info.run_id, f"cluster/{dataset}/nmi")]
            assert [m.step for m in history] == [2], label  # once, at the last epoch
        pngs = {a.path for a in client.list_artifacts(run.info.run_id, "cluster")}
        assert pngs == {"cluster/cub.png", "cluster/cifar10.png"}, label
        for png in sorted(pngs):
            local = client.download_artifacts(run.info.run_id, png, str(tmp_path / label))
            with Image.open(local) as image:
                assert image.format == "PNG" and image.size == (700, 700)
                assert np.asarray(image.convert("RGB")).std() > 5, png
    for term in ("ce", "embed_mse", "ikd", "rkd_distance", "rkd_angle"):
        assert f"train/{term}" in runs["H"].data.metrics, term
    # The student's checkpoint carries the trained embed_mse projection (resnet18 -> ViT-tiny).
    out = tmp_path / "outputs" / "vit2cnn-smoke"
    best = torch.load(out / "ce_mse_ikd_rkd" / "best.pt", map_location="cpu", weights_only=True)
    assert best["kd_loss"]["projection.weight"].shape == (192, 512)
    assert best["model"]["fc.weight"].shape == (CLASSES, 512)
    # The teacher row trained its head only: its backbone is where it started (the step-0
    # weights are rebuilt from the row's seed exactly as kd.train built them).
    teacher = torch.load(out / "vit_teacher" / "last.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    start = build_model(VIT, num_classes=CLASSES, img_size=IMG).state_dict()
    moved = {k for k, v in teacher["model"].items() if not torch.equal(v, start[k])}
    assert moved == {"head.weight", "head.bias"}
