"""A kill at any point of an epoch's save (kd.train.state.write_epoch_files) leaves best.pt,
last.pt, state.pt and state.json agreeing with what a resume does: the kill is injected
between the file writes (atomic_save raising after N writes), then the resume's repair runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd import rowfiles
from kd.grid import load_grid
from kd.train import state as S


class Killed(BaseException):
    """The process died here (a BaseException: nothing in the code under test catches it)."""


@pytest.fixture
def row(tmp_path: Path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: epochfiles\n"
        "defaults: {student: {model: resnet18}, init: scratch, train: {epochs: 5},\n"
        f"  data: {{dataset: imagefolder, root: {tmp_path}}}, output_dir: {tmp_path}/out}}\n"
        "rows: [{id: r, label: R}]\n"
    )
    row = load_grid(grid, check_data=False, check_models=False).rows[0]
    row.output_dir.mkdir(parents=True)
    return row


def epoch_files(row, epoch: int, acc1: float, best: float, history: list) -> S.EpochFiles:
    weights = {"w": torch.full((4,), float(epoch))}
    model = {"model": weights, "epoch": epoch, "acc1": acc1, "run_id": "run"}
    state = {
        "model": weights,
        "epoch": epoch,
        "best_acc1": best,
        "run_id": "run",
        "dependency_runs": {},
        "history": list(history),
    }
    return S.EpochFiles(epoch, 5, model, state, improved=acc1 >= best)


def train(row, accs: list[float], kill_after: int | None, monkeypatch) -> None:
    """Save one epoch per accuracy in `accs`, killed after `kill_after` file writes."""
    writes = 0
    real = S.atomic_save

    def save(obj, path):
        nonlocal writes
        if kill_after is not None and writes >= kill_after:
            raise Killed(path.name)
        real(obj, path)
        writes += 1

    monkeypatch.setattr(S, "atomic_save", save)
    best, history = -1.0, []
    try:
        for epoch, acc1 in enumerate(accs):
            best = max(best, acc1)
            history.append({"epoch": epoch + 1, "val/acc1": acc1})
            S.write_epoch_files(row, epoch_files(row, epoch, acc1, best, history))
    except Killed:
        pass
    finally:
        monkeypatch.setattr(S, "atomic_save", real)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("kill_after", range(0, 10))
def test_a_kill_between_any_two_writes_is_repaired_on_resume(row, kill_after, monkeypatch):
    accs = [0.2, 0.5, 0.4, 0.7]  # epochs 0, 1 and 3 improve; 3 writes each, 2 for epoch 2
    train(row, accs, kill_after, monkeypatch)
    out = row.output_dir
    state = S.load_state(out / rowfiles.STATE, "run")
    if state is None:  # killed before the first epoch was committed: a resume starts afresh
        assert not (out / rowfiles.BEST).exists() or load(out / rowfiles.BEST)["epoch"] == 0
        return
    S.repair_epoch_files(row, state)
    epoch = state["epoch"]
    done = state["history"]
    assert [h["epoch"] for h in done] == list(range(1, epoch + 2))
    best_epoch = max(range(len(done)), key=lambda e: (done[e]["val/acc1"], e))
    best = load(out / rowfiles.BEST)
    assert best["epoch"] == best_epoch, "best.pt is from an epoch not in the run's history"
    assert best["acc1"] == state["best_acc1"]
    assert load(out / rowfiles.LAST)["epoch"] == epoch
    info = json.loads((out / rowfiles.STATE_INFO).read_text())
    assert info["epoch"] == epoch + 1 and info["run_id"] == "run"
    # The resume trains the next epoch: the files after it are those of an unbroken run.
    resumed = accs[epoch + 1 :]
    if resumed:
        history, top = list(done), state["best_acc1"]
        for offset, acc1 in enumerate(resumed):
            e = epoch + 1 + offset
            top = max(top, acc1)
            history.append({"epoch": e + 1, "val/acc1": acc1})
            S.write_epoch_files(row, epoch_files(row, e, acc1, top, history))
    assert load(out / rowfiles.BEST)["epoch"] == 3 and load(out / rowfiles.LAST)["epoch"] == 3


def test_a_state_of_an_older_version_is_left_as_it_is(row):
    (row.output_dir / rowfiles.STATE).write_bytes(b"")
    assert S.repair_epoch_files(row, {"epoch": 2, "run_id": "run"}) == []
