"""kd.train and kd.evaluate: tiny timm models, generated data, a real MLflow store (SQLite).

Rows come from small grid files written here and loaded with `kd.grid.load_grid`, then run in
this process with `kd.train.run` exactly as a job would run them. One SQLite store serves the
whole module (creating its tables takes seconds); every grid has its own experiment, created
here with an artifact folder under the test's temporary directory.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from kd import config as C
from kd import rowfiles, train
from kd.data import generate_dataset
from kd.evaluate import evaluate
from kd.grid import Grid, Row, load_grid
from kd.models import build_model, smoke_model_name
from kd.train import loop as train_loop

DEIT_DIST = smoke_model_name("deit_base_distilled_patch16_384")  # deit_tiny_distilled_patch16_224
DEIT = smoke_model_name("deit_base_patch16_384")  # deit_tiny_patch16_224
BIT = smoke_model_name("resnetv2_50x1_bit")  # tiny BiT: GroupNorm, StdConv, mean/std 0.5
RESNET = smoke_model_name("resnet50")  # resnet18: BatchNorm
CLASSES = 4
IMG = 32
HARD_KD = {"ce": 0.5, "deit_hard": 0.5}
EPOCH_METRICS = (
    "train/loss",
    "train/ce",
    "train/deit_hard",
    "train/lr",
    "train/img_per_s",
    "val/acc1",
    "val/acc5",
    "val/loss",
    "time/train_s",
    "time/eval_s",
    "time/checkpoint_s",
    "time/epoch_s",
)


# --------------------------------------------------------------------------------------------
# Helpers: one generated dataset and one MLflow store per module; grids written per test
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    """Two CPU cores shared with loader workers and other jobs: one intra-op thread avoids
    OpenMP threads waiting on each other (10x slower steps seen under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class World:
    base: Path
    data: Path
    uri: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("train")
    spec = generate_dataset(
        "imagefolder",
        base / "data",
        num_classes=CLASSES,
        train_per_class=4,  # 16 images: 2 steps of 8 per epoch
        test_per_class=2,
        image_size=IMG,
    )
    return World(base=base, data=Path(spec.root), uri=f"sqlite:///{base}/mlflow.db")


def make_grid(
    world: World,
    name: str,
    rows: list[dict[str, Any]],
    *,
    num_workers: int = 0,
    train_cfg: dict[str, Any] | None = None,
) -> Grid:
    """Write a grid on the generated dataset (2 epochs, batch 8, 32 px), load it, and create its
    MLflow experiment with artifacts under the test folder (not ./mlruns of the working dir)."""
    folder = world.base / name
    folder.mkdir()
    spec = {
        "name": name,
        "experiment": f"kd-test-{name}",
        "defaults": {
            "init": "scratch",
            "kd": {"ce": 1.0},
            "data": {
                "dataset": "imagefolder",
                "root": str(world.data),
                "img_size": IMG,
                "num_workers": num_workers,
            },
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "lr": 1.0e-3,
                "warmup_epochs": 0,
                "seed": 0,
                **(train_cfg or {}),
            },
            "output_dir": str(folder / "out"),
        },
        "rows": rows,
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    grid = load_grid(path)
    world.client.create_experiment(grid.experiment, artifact_location=str(folder / "artifacts"))
    return grid


def runs_of(world: World, grid: Grid) -> list[Any]:
    experiment = world.client.get_experiment_by_name(grid.experiment)
    return world.client.search_runs([experiment.experiment_id])


def only_run(world: World, grid: Grid) -> Any:
    runs = runs_of(world, grid)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def metric_steps(world: World, run_id: str, name: str) -> list[int]:
    return [m.step for m in world.client.get_metric_history(run_id, name)]


def metric_values(world: World, run_id: str, name: str) -> list[float]:
    history = sorted(world.client.get_metric_history(run_id, name), key=lambda m: m.step)
    return [m.value for m in history]


def load_pt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def save_timm_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """A checkpoint as timm/DeiT publish them: {"model": state_dict}."""
    torch.save({"model": model.state_dict()}, path)
    return path


# --------------------------------------------------------------------------------------------
# A KD row (DeiT-tiny distilled, hard distillation from a BiT teacher file), run twice:
# A uninterrupted, B stopped after epoch 1 and resumed into the same MLflow run.
# Parametrised over the loader: no workers (smoke runs) and worker processes (real runs).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePair:
    row_a: Row
    run_a: str
    row_b: Row
    run_b: str
    grid_b: Grid
    stopped_state: dict[str, Any]
    status_when_stopped: str
    steps_when_stopped: list[int]
    log_b: list[str]


# Every source of randomness and every piece of state the loop carries across epochs: DeiT's
# augmentations (RandAugment, mixup/cutmix, random erasing), stochastic depth, a warmup
# schedule, gradient accumulation and clipping, EMA weights.
RECIPE = {
    "mixup": 0.8,
    "cutmix": 1.0,
    "re_prob": 0.25,
    "warmup_epochs": 1,
    "grad_accum_steps": 2,
    "clip_grad": 1.0,
    "ema": True,
    "ema_decay": 0.9,
}


def hard_kd_row(teacher_file: Path) -> dict[str, Any]:
    return {
        "id": "hard",
        "label": "2b-6",
        "student": {"model": DEIT_DIST},
        "teacher": {"model": BIT, "file": str(teacher_file)},
        "kd": HARD_KD,
    }


# The loader variants: worker processes (as real rows run: DataConfig's default is 8 workers),
# and no workers (as --smoke runs) with an epoch cut by limit_train_batches in the middle of a
# gradient accumulation (4 batches of 4, limit 3, 2 micro-batches per update).
LOADERS = {
    "workers2": {"num_workers": 2, "train_cfg": RECIPE},
    "limit_accum": {
        "num_workers": 0,
        "train_cfg": {**RECIPE, "batch_size": 4, "limit_train_batches": 3},
    },
}


@pytest.fixture(scope="module", params=sorted(LOADERS))
def resume_pair(request: pytest.FixtureRequest, world: World) -> ResumePair:
    variant = request.param
    teacher_file = world.base / f"bit_teacher_{variant}.pt"
    torch.manual_seed(7)
    save_timm_checkpoint(teacher_file, build_model(BIT, num_classes=CLASSES))
    rows = [hard_kd_row(teacher_file)]
    grid_a = make_grid(world, f"resume_a_{variant}", rows, **LOADERS[variant])
    grid_b = make_grid(world, f"resume_b_{variant}", rows, **LOADERS[variant])
    row_a, row_b = grid_a.rows[0], grid_b.rows[0]

    train.run(row_a, run_id=None, tracking_uri=world.uri, log=lambda _: None)
    run_a = only_run(world, grid_a).info.run_id

    log_b: list[str] = []
    with pytest.raises(train.StopRequested, match="after epoch 1"):
        train.run(
            row_b,
            run_id=None,
            tracking_uri=world.uri,
            stop_requested=lambda: True,
            log=log_b.append,
        )
    run_b = only_run(world, grid_b).info.run_id
    stopped_state = load_pt(row_b.output_dir / rowfiles.STATE)
    status_when_stopped = world.client.get_run(run_b).info.status
    steps_when_stopped = metric_steps(world, run_b, "train/loss")

    train.run(row_b, run_id=run_b, tracking_uri=world.uri, log=log_b.append)
    return ResumePair(
        row_a=row_a,
        run_a=run_a,
        row_b=row_b,
        run_b=run_b,
        grid_b=grid_b,
        stopped_state=stopped_state,
        status_when_stopped=status_when_stopped,
        steps_when_stopped=steps_when_stopped,
        log_b=log_b,
    )


def test_row_trains_and_logs_metrics_params_and_artifacts(
    resume_pair: ResumePair, world: World, tmp_path: Path
) -> None:
    run = world.client.get_run(resume_pair.run_a)
    assert run.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        assert metric_steps(world, run.info.run_id, name) == [1, 2], name
        assert all(math.isfinite(v) for v in metric_values(world, run.info.run_id, name)), name
    # Where each epoch's time went: its parts add up to no more than the whole.
    parts = zip(
        *(
            metric_values(world, run.info.run_id, f"time/{n}_s")
            for n in ("train", "eval", "checkpoint", "epoch")
        ),
        strict=True,
    )
    for train_s, eval_s, checkpoint_s, epoch_s in parts:
        assert min(train_s, eval_s, checkpoint_s) > 0
        assert train_s + eval_s + checkpoint_s <= epoch_s + 1e-3
    state = load_pt(resume_pair.row_a.output_dir / rowfiles.STATE)
    assert all("time/checkpoint_s" in h["metrics"] for h in state["history"])
    loss, ce, hard = (
        metric_values(world, run.info.run_id, n)
        for n in ("train/loss", "train/ce", "train/deit_hard")
    )
    for total, a, b in zip(loss, ce, hard, strict=True):  # the total is the weighted sum
        assert total == pytest.approx(0.5 * a + 0.5 * b, rel=1e-5)
    acc1, acc5 = (metric_values(world, run.info.run_id, n) for n in ("val/acc1", "val/acc5"))
    assert all(0 <= a1 <= a5 <= 100 for a1, a5 in zip(acc1, acc5, strict=True))
    assert all(v > 0 for v in metric_values(world, run.info.run_id, "train/img_per_s"))

    params = run.data.params
    assert params["train.lr"] == "0.001"
    assert params["kd.ce"] == "0.5"
    assert params["kd.deit_hard"] == "0.5"
    assert params["student.model"] == DEIT_DIST
    assert params["teacher.model"] == BIT
    assert params["data.img_size"] == str(IMG)

    top = {a.path for a in world.client.list_artifacts(run.info.run_id)}
    assert {"row.yaml", "checkpoints"} <= top
    checkpoints = {a.path for a in world.client.list_artifacts(run.info.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/best.pt", "checkpoints/last.pt"}
    local = world.client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path))
    logged, written = load_pt(Path(local)), load_pt(resume_pair.row_a.output_dir / rowfiles.LAST)
    assert logged["epoch"] == 1 and logged["arch"] == DEIT_DIST
    assert logged["model"]["head.weight"].shape == (CLASSES, 192)
    assert logged["model"]["head_dist.weight"].shape == (CLASSES, 192)
    assert all(torch.equal(logged["model"][k], v) for k, v in written["model"].items())
    row_yaml = yaml.safe_load(
        Path(
            world.client.download_artifacts(run.info.run_id, "row.yaml", str(tmp_path))
        ).read_text()
    )
    assert row_yaml["config"]["id"] == "hard" and row_yaml["config"]["kd"] == HARD_KD


def test_resume_after_epoch_1_ends_with_the_same_weights_in_the_same_run(
    resume_pair: ResumePair, world: World
) -> None:
    pair = resume_pair
    # Stopped: state of epoch 1 saved, the run still RUNNING (to be requeued), epoch 1 logged.
    assert pair.stopped_state["epoch"] == 0
    assert pair.stopped_state["run_id"] == pair.run_b
    assert pair.status_when_stopped == "RUNNING"
    assert pair.steps_when_stopped == [1]
    assert any("resuming after epoch 1/2" in line for line in pair.log_b)

    # Resumed into the same run: no second run, one point per epoch, nothing repeated.
    assert [r.info.run_id for r in runs_of(world, pair.grid_b)] == [pair.run_b]
    assert world.client.get_run(pair.run_b).info.status == "FINISHED"
    for name in (*EPOCH_METRICS, "val_ema/acc1", "epoch"):
        assert metric_steps(world, pair.run_b, name) == [1, 2], name

    # Bit-identical to the uninterrupted run: student, EMA, optimizer step count.
    a = load_pt(pair.row_a.output_dir / rowfiles.LAST)["model"]
    b = load_pt(pair.row_b.output_dir / rowfiles.LAST)["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{len(different)}/{len(a)} tensors differ, e.g. {different[:5]}"
    state_a = load_pt(pair.row_a.output_dir / rowfiles.STATE)
    state_b = load_pt(pair.row_b.output_dir / rowfiles.STATE)
    assert state_a["global_step"] == state_b["global_step"] == 2  # one update per epoch
    assert all(torch.equal(v, state_b["ema"][k]) for k, v in state_a["ema"].items())
    for name in ("train/loss", "train/deit_hard", "val/loss"):
        assert metric_values(world, pair.run_a, name) == metric_values(world, pair.run_b, name)


def test_training_batches_are_normalised_and_erased_as_the_recipe_says() -> None:
    cfg = C.RowConfig(train=C.TrainConfig(re_prob=0.25))
    student_data = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    train_normalize, test_normalize = train.batch_normalizers(cfg, student_data)
    assert (train_normalize.re_prob, test_normalize.re_prob) == (0.25, 0.0)
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.equal(test_normalize(batch), torch.full((2, 3, 4, 4), 2.0))


@pytest.mark.parametrize(
    ("batches", "limit", "accum", "expected"),
    [
        (10, None, 1, (10, 10)),
        (10, None, 3, (10, 4)),  # Accelerate also updates after the loader's last batch
        (10, 5, 2, (4, 2)),  # a cut epoch ends on an update boundary
        (10, 1, 2, (2, 1)),  # ... and makes at least one update
        (1, 5, 2, (1, 1)),
        (10, 20, 2, (10, 5)),
    ],
)
def test_epoch_length(batches: int, limit: int | None, accum: int, expected: tuple) -> None:
    cfg = C.TrainConfig(limit_train_batches=limit, grad_accum_steps=accum)
    assert train.epoch_length(batches, cfg) == expected


# --------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on CPU): each one trains on its shard of every epoch
# --------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys

import torch

from kd import config as C
from kd import train
from kd.grid import load_grid

torch.set_num_threads(1)
row = load_grid(sys.argv[1]).rows[0]
train.run(row, run_id=None, tracking_uri=sys.argv[2], log=lambda _: None)
"""


@pytest.mark.e2e
def test_two_processes_count_their_own_shard_for_schedule_and_loss(
    world: World, tmp_path: Path
) -> None:
    grid = make_grid(
        world,
        "ddp",
        [{"id": "ddp", "label": "d", "student": {"model": DEIT}}],
        train_cfg={"epochs": 1, "min_lr": 1.0e-6},
    )
    # A state left by an earlier run of this row (say, launch/train.py run before): not this
    # run's, so no process may resume from it; every one must know the new run's id to tell.
    row = grid.rows[0]
    row.output_dir.mkdir(parents=True)
    torch.save({"run_id": "an-earlier-run", "epoch": 0}, row.output_dir / rowfiles.STATE)
    done = _torchrun_row(grid, world, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    run = only_run(world, grid)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdgrid.world_size"] == "2"
    # 16 images in batches of 8: one batch, one update per process and epoch. The cosine
    # schedule must reach min_lr at the last update (not stop halfway through), and the
    # epoch's loss is the mean over the batches this process ran: a 4-class model at its
    # initialisation (the loss is taken before the update) is near log(4).
    assert metric_values(world, run.info.run_id, "train/lr") == [pytest.approx(1.0e-6)]
    assert metric_values(world, run.info.run_id, "train/loss") == [
        pytest.approx(math.log(CLASSES), abs=0.2)
    ]


def _torchrun_row(
    grid: Grid, world: World, tmp_path: Path, prelude: str = ""
) -> subprocess.CompletedProcess:
    """The grid's first row trained by 2 processes (torchrun, gloo on CPU); `prelude` runs first
    in each."""
    script = tmp_path / "ddp_row.py"
    script.write_text(prelude + DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*command, str(script), grid.file, world.uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.e2e
def test_two_processes_train_a_row_whose_loss_leaves_the_class_head_unused(
    world: World, tmp_path: Path
) -> None:
    """Hard distillation alone trains a distilled DeiT's distillation head, not its class head:
    DDP must be told to look for unused parameters, or the second step fails ("Expected to
    have finished reduction in the prior iteration")."""
    teacher_file = tmp_path / "bit_teacher.pt"
    save_timm_checkpoint(teacher_file, build_model(BIT, num_classes=CLASSES))
    row = {**hard_kd_row(teacher_file), "kd": {"ce": 0.0, "deit_hard": 1.0}}
    grid = make_grid(world, "ddp_unused", [row], train_cfg={"epochs": 2})
    done = _torchrun_row(grid, world, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    run = only_run(world, grid)
    assert run.info.status == "FINISHED" and run.data.tags["kdgrid.world_size"] == "2"
    assert len(metric_values(world, run.info.run_id, "train/deit_hard")) == 2


# --------------------------------------------------------------------------------------------
# Checkpoints are written while the next epoch trains
# --------------------------------------------------------------------------------------------


def test_the_next_epoch_trains_while_an_epochs_files_are_written(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 1's files are held back until epoch 2 has taken a step: a loop that waited for
    them would never take it (the write gives up after 60 s and the test fails). What is
    written is epoch 1's state, not the weights that moved on meanwhile."""
    grid = make_grid(
        world, "async_ckpt", [{"id": "plain", "label": "p", "student": {"model": DEIT}}]
    )
    row = grid.rows[0]
    writing, stepped = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}
    real_step, real_write = train.train_step, train.write_epoch_files

    def step(parts, images, targets):
        if writing.is_set() and not stepped.is_set():
            seen["student"] = parts.student
            seen["at_epoch_end"] = {k: v.clone() for k, v in parts.student.state_dict().items()}
            out = real_step(parts, images, targets)
            stepped.set()
            return out
        return real_step(parts, images, targets)

    def write(row_, files, *args, **kwargs):
        if files.epoch == 0:
            writing.set()
            seen["trained_meanwhile"] = stepped.wait(timeout=60)
            live = seen["student"].state_dict() if seen["trained_meanwhile"] else {}
            seen["written_is_epoch_end"] = (
                all(
                    torch.equal(files.model["model"][k], v) for k, v in seen["at_epoch_end"].items()
                )
                if seen["trained_meanwhile"]
                else False
            )
            seen["weights_moved_on"] = any(
                not torch.equal(files.model["model"][k], v) for k, v in live.items()
            )
        real_write(row_, files, *args, **kwargs)

    monkeypatch.setattr(train_loop, "train_step", step)
    monkeypatch.setattr(train_loop, "write_epoch_files", write)
    train.run(row, run_id=None, tracking_uri=world.uri, log=lambda _: None)

    assert seen["trained_meanwhile"], "the loop waited for epoch 1's files before training on"
    assert seen["written_is_epoch_end"] and seen["weights_moved_on"]
    run = only_run(world, grid)
    assert run.info.status == "FINISHED"
    assert metric_steps(world, run.info.run_id, "val/acc1") == [1, 2]
    state = load_pt(row.output_dir / rowfiles.STATE)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [0, 1]
    last = load_pt(row.output_dir / rowfiles.LAST)
    student_keys = {k.removeprefix("student.") for k in state["model"] if k.startswith("student.")}
    assert set(last["model"]) == student_keys
    for key, value in last["model"].items():  # last.pt and state.pt: the same final weights
        assert torch.equal(value, state["model"][f"student.{key}"]), key


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


def test_nan_loss_fails_the_row_with_the_reason_in_mlflow(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = make_grid(world, "nan", [{"id": "plain", "label": "p", "student": {"model": DEIT}}])
    row = grid.rows[0]
    monkeypatch.setenv("KDGRID_INJECT_NAN_AT_STEP", "1")
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at epoch 1"):
        train.run(row, run_id=None, tracking_uri=world.uri, log=lambda _: None)
    run = only_run(world, grid)
    assert run.info.status == "FAILED"
    reason = run.data.tags["kdgrid.failure_reason"]
    assert "NonFiniteLossError" in reason and "non-finite loss" in reason
    # Nothing was checkpointed from the poisoned weights.
    for name in (rowfiles.STATE, rowfiles.BEST, rowfiles.LAST):
        assert not (row.output_dir / name).exists(), name


def test_eval_every_scores_fewer_epochs_and_trains_the_same_weights(world: World) -> None:
    """`train.eval_every: 2` over 3 epochs: the test split is scored after epochs 2 and 3 (the
    last always), every epoch still trains, checkpoints and logs its training metrics, and the
    weights are those of the same row scored every epoch (scoring draws no training randomness)."""
    rows = [{"id": "every", "label": "e", "student": {"model": DEIT}}]
    every = make_grid(world, "eval_every_1", rows, train_cfg={"epochs": 3})
    sparse = make_grid(world, "eval_every_2", rows, train_cfg={"epochs": 3, "eval_every": 2})
    assert sparse.rows[0].key != every.rows[0].key  # best.pt can differ: a result, keyed
    lines: list[str] = []
    for grid, log in ((every, lambda _: None), (sparse, lines.append)):
        train.run(grid.rows[0], run_id=None, tracking_uri=world.uri, log=log)
    run = only_run(world, sparse)
    assert run.info.status == "FINISHED"
    for name in ("val/acc1", "val/acc5", "val/loss", "val/best_acc1", "time/eval_s"):
        assert metric_steps(world, run.info.run_id, name) == [2, 3], name
    for name in ("train/loss", "time/train_s", "time/epoch_s", "epoch"):
        assert metric_steps(world, run.info.run_id, name) == [1, 2, 3], name
    assert any("epoch 1/3" in line and "not evaluated" in line for line in lines), lines
    out = sparse.rows[0].output_dir
    best, last = load_pt(out / rowfiles.BEST), load_pt(out / rowfiles.LAST)
    assert best["epoch"] in (1, 2) and best["acc1"] is not None and last["epoch"] == 2
    assert len(load_pt(out / rowfiles.STATE)["history"]) == 3
    weights = load_pt(every.rows[0].output_dir / rowfiles.LAST)["model"]
    assert all(torch.equal(weights[k], v) for k, v in last["model"].items())
    assert (
        metric_values(world, run.info.run_id, "val/acc1")[-1]
        == metric_values(world, only_run(world, every).info.run_id, "val/acc1")[-1]
    )


# --------------------------------------------------------------------------------------------
# Where weights come from: a local file, other rows' best checkpoints
# --------------------------------------------------------------------------------------------


def test_init_from_local_timm_checkpoint_with_another_head(world: World) -> None:
    torch.manual_seed(1234)
    source = build_model(DEIT, num_classes=10, img_size=IMG)  # e.g. another dataset's head
    file = save_timm_checkpoint(world.base / "deit_10_classes.pt", source)
    expected = source.state_dict()
    # lr 1e-12 (and no schedule above it): the weights move by far less than the tolerance, so
    # the run's last checkpoint still shows the weights it started from.
    grid = make_grid(
        world,
        "init_file",
        [
            {
                "id": "from_file",
                "label": "f",
                "student": {"model": DEIT},
                "init": {"file": str(file)},
            }
        ],
        train_cfg={"epochs": 1, "lr": 1.0e-12, "min_lr": 0.0, "warmup_lr": 0.0},
    )
    row = grid.rows[0]
    train.run(row, run_id=None, tracking_uri=world.uri, log=lambda _: None)
    assert only_run(world, grid).info.status == "FINISHED"

    trained = load_pt(row.output_dir / rowfiles.LAST)["model"]
    assert trained["head.weight"].shape == (CLASSES, 192)  # the head was replaced
    body = [k for k in expected if not k.startswith("head.")]
    assert body and set(body) <= trained.keys()
    for key in body:
        torch.testing.assert_close(trained[key], expected[key], rtol=0, atol=1e-9, msg=key)
    torch.manual_seed(0)
    scratch = build_model(DEIT, num_classes=CLASSES, img_size=IMG).state_dict()
    assert not torch.equal(
        scratch["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"]
    )


def test_teacher_and_init_rows_feed_a_student_row(world: World) -> None:
    rows = [
        {"id": "teacher", "label": "t", "student": {"model": RESNET}},
        {"id": "base", "label": "b", "student": {"model": DEIT_DIST}},
        {
            "id": "student",
            "label": "s",
            "student": {"model": DEIT_DIST},
            "teacher": {"row": "teacher"},
            "init": {"row": "base"},
            "kd": HARD_KD,
        },
    ]
    grid = make_grid(world, "deps", rows, train_cfg={"epochs": 1})
    teacher_row, base_row, student_row = (grid.row(i) for i in ("teacher", "base", "student"))
    assert student_row.depends_on == ("teacher", "base")
    assert student_row.config.teacher.model == RESNET
    out = Path(student_row.config.output_dir)

    def run_student() -> None:
        train.run(student_row, run_id=None, tracking_uri=world.uri, log=lambda _: None)

    # Dependencies missing: a clear error naming the row, the dependency and its path.
    with pytest.raises(FileNotFoundError) as missing_init:
        run_student()
    message = str(missing_init.value)
    assert "'student'" in message and "'base'" in message
    assert str(out / "base" / "best.pt") in message
    train.run(base_row, run_id=None, tracking_uri=world.uri, log=lambda _: None)
    with pytest.raises(FileNotFoundError) as missing_teacher:
        run_student()
    message = str(missing_teacher.value)
    assert "'student'" in message and "'teacher'" in message
    assert str(out / "teacher" / "best.pt") in message
    failed = [r for r in runs_of(world, grid) if r.info.status == "FAILED"]
    assert len(failed) == 2
    assert all("FileNotFoundError" in r.data.tags["kdgrid.failure_reason"] for r in failed)

    # Both dependencies done: the student starts from them.
    train.run(teacher_row, run_id=None, tracking_uri=world.uri, log=lambda _: None)
    built = train.build(student_row, None)
    for built_model, dep in ((built.student, "base"), (built.teacher, "teacher")):
        assert built_model is not None
        saved = load_pt(out / dep / rowfiles.BEST)["model"]
        state = built_model.state_dict()
        assert state.keys() == saved.keys(), dep
        assert all(torch.equal(state[k], saved[k]) for k in saved), dep
    assert not built.teacher.training
    assert not any(p.requires_grad for p in built.teacher.parameters())

    run_student()
    finished = [r for r in runs_of(world, grid) if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["kdgrid.id"] for r in finished) == ["base", "student", "teacher"]
    student_run = next(r for r in finished if r.data.tags["kdgrid.id"] == "student")
    assert metric_steps(world, student_run.info.run_id, "train/deit_hard") == [1]


@pytest.mark.parametrize("kd_terms", [{"ce": 1.0}, HARD_KD], ids=["labels_only", "hard_kd"])
def test_distilled_student_trains_both_heads(world: World, kd_terms: dict[str, float]) -> None:
    """With distillation terms the heads learn apart (cls: labels, dist: teacher); without them
    both learn the labels. Either way evaluation's mean of the heads averages trained heads."""
    row: dict[str, Any] = {"id": "dist", "label": "d", "student": {"model": DEIT_DIST}}
    if "deit_hard" in kd_terms:
        row["teacher"] = {"model": RESNET, "pretrained": False}
    grid = make_grid(world, f"heads_{'_'.join(kd_terms)}", [{**row, "kd": kd_terms}])
    built = train.build(grid.rows[0], None)
    built.step_module.train()
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, IMG, IMG), torch.arange(8) % CLASSES
    teacher_logits = torch.randn(8, CLASSES) if built.teacher is not None else None
    losses = built.step_module(images, targets, teacher_logits)
    assert set(losses) == {"loss", *kd_terms}
    losses["loss"].backward()
    for head in (built.student.head, built.student.head_dist):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def identity_classifier(classes: int) -> torch.nn.Linear:
    """A fixed linear model whose logits are its inputs."""
    model = torch.nn.Linear(classes, classes)
    with torch.no_grad():
        model.weight.copy_(torch.eye(classes))
        model.bias.zero_()
    return model


def test_evaluate_top1_top5_and_mean_cross_entropy_by_hand(accelerator: Any) -> None:
    ramp = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    logits = torch.tensor([ramp, ramp, ramp, [0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    targets = torch.tensor([0, 1, 5, 5])
    # top-1 hits: samples 0 and 3; top-5 hits: 0, 1 and 3 (sample 2's target ranks last of 6).
    lse_ramp = math.log(sum(math.exp(k) for k in range(6)))
    losses = [lse_ramp - 5, lse_ramp - 4, lse_ramp - 0, math.log(5 + math.exp(9)) - 9]
    loader = DataLoader(TensorDataset(logits, targets), batch_size=3)  # batches of 3 and 1
    model = identity_classifier(6)

    result = evaluate(model, loader, accelerator)
    assert result["count"] == 4
    assert result["acc1"] == pytest.approx(50.0)
    assert result["acc5"] == pytest.approx(75.0)
    assert result["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert model.training  # the mode it came in with

    first = evaluate(model, loader, accelerator, limit=1)  # samples 0..2 only
    assert first["count"] == 3
    assert first["acc1"] == pytest.approx(100 / 3)
    assert first["acc5"] == pytest.approx(200 / 3)
    assert first["loss"] == pytest.approx(sum(losses[:3]) / 3, rel=1e-6)


def test_evaluate_scores_a_distilled_deit_on_the_mean_of_its_heads(accelerator: Any) -> None:
    torch.manual_seed(0)
    model = build_model(DEIT_DIST, num_classes=CLASSES, img_size=IMG)
    with torch.no_grad():  # heads that disagree: cls says class 0, dist (more surely) class 3
        model.head.bias.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))
        model.head_dist.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 9.0]))
        images = torch.randn(6, 3, IMG, IMG)
        tokens = model.eval().forward_features(images)
        cls_logits, dist_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    mean = (cls_logits + dist_logits) / 2
    assert (cls_logits.argmax(dim=1) == 0).all() and (mean.argmax(dim=1) == 3).all()
    targets = torch.full((6,), 3)
    expected_loss = F.cross_entropy(mean, targets).item()
    assert abs(expected_loss - F.cross_entropy(dist_logits, targets).item()) > 0.1

    model.set_distilled_training(True)
    model.train()  # as the loop leaves it: two separate heads in training mode
    loader = DataLoader(TensorDataset(images, targets), batch_size=4)
    result = evaluate(model, loader, accelerator)
    assert result["acc1"] == pytest.approx(100.0)  # the cls head alone would score 0
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training


def test_the_fp16_loss_scale_is_part_of_the_saved_state() -> None:
    """Under fp16 (CUDA only) a resume restarting the loss scale at 65536 would skip updates
    the uninterrupted run made: the scaler's state is saved with the epoch (and loaded on
    resume); other precisions have no scaler and save None."""
    from types import SimpleNamespace

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    saved = train.scaler_state(SimpleNamespace(scaler=scaler))
    assert saved is not None and saved["scale"] == 1024.0 and saved["growth_interval"] == 7
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(saved)
    assert restored.get_scale() == 1024.0
    assert train.scaler_state(SimpleNamespace(scaler=None)) is None


@pytest.mark.e2e
def test_a_non_finite_loss_on_one_process_fails_the_row_on_every_process(
    world: World, tmp_path: Path
) -> None:
    """The loss goes NaN on process 1 only: both processes stop at the same check and the row
    FAILED with the advice, instead of process 0 waiting for process 1 until the time limit."""
    grid = make_grid(world, "ddp_nan", [{"id": "nan", "label": "n", "student": {"model": DEIT}}])
    prelude = (
        "import os\n"
        "if os.environ['RANK'] == '1':\n"
        "    os.environ['KDGRID_INJECT_NAN_AT_STEP'] = '0'\n"
    )
    done = _torchrun_row(grid, world, tmp_path, prelude)
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "on another process (this one's running sums are finite)" in done.stderr
    run = only_run(world, grid)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdgrid.failure_reason"].startswith("NonFiniteLossError: non-finite loss")
