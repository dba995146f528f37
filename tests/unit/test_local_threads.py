"""The local executor gives a row its share of the cores, capped at what the row asks for."""

from __future__ import annotations

from pathlib import Path

from kd.grid import load_grid
from slurm.local import row_env, row_threads


def one_row(tmp_path: Path, cpus: int):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: threads\n"
        "defaults: {student: {model: resnet18}, init: scratch,\n"
        f"  data: {{dataset: imagefolder, root: {tmp_path}}}, output_dir: {tmp_path}/out,\n"
        f"  resources: {{cpus_per_task: {cpus}}}}}\n"
        "rows: [{id: r, label: R}]\n"
    )
    return load_grid(grid, check_data=False, check_models=False).rows[0]


def test_a_row_gets_no_more_threads_than_its_cpus_per_task(tmp_path: Path) -> None:
    assert row_threads(2, one_row(tmp_path, cpus=1)) == 1  # --max-parallel 1 on 2 cores
    assert row_threads(2, one_row(tmp_path, cpus=8)) == 2  # the share of the cores caps it
    assert row_threads(16, one_row(tmp_path, cpus=8)) == 8


def test_the_launching_environment_still_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert row_env(row_threads(2, one_row(tmp_path, cpus=1)))["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert row_env(row_threads(2, one_row(tmp_path, cpus=1)))["OMP_NUM_THREADS"] == "1"
