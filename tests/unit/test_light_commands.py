"""status, table, --dry-run and --cancel answer without importing torch, timm or torchvision
(the import alone took ~5 s of their ~5-9 s): checked from `python -X importtime`'s record of
every module a real run of the command imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """table2b's dataset copies (small, generated), a store that does not exist yet, and a
    warm name cache of the installed timm (what the first check of any grid leaves behind)."""
    from kd.data import generate_dataset
    from kd.models import name_cache, names

    folder = tmp_path_factory.mktemp("light")
    spec = generate_dataset("cub_dogs", folder / "data")
    cache = folder / "cache"
    os.environ["KDGRID_CACHE_DIR"] = str(cache)
    try:
        name_cache.write_names(*names._registry())
    finally:
        del os.environ["KDGRID_CACHE_DIR"]
    assert name_cache.cache_dir() != cache and list(cache.glob("timm-names-*.json"))
    from kd.grid import load_grid
    from kd.tracking import Tracker

    grid = load_grid(REPO / "grids/table2b.yaml", check_data=False, check_models=False)
    tracker = Tracker(f"sqlite:///{folder}/mlflow.db")  # table2b launched: its runs scheduled
    tracker.create_row_runs(tracker.ensure_experiment(grid.experiment), grid.rows, executor="slurm")
    return {
        **os.environ,
        "KDGRID_CACHE_DIR": str(cache),
        "CUB_ROOT": spec.root,
        "DOGS_ROOT": str(spec.dogs_root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
        "PATH": "/nonexistent",  # no sbatch: --cancel and status read MLflow only
    }


def imported(env: dict[str, str], *args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    "args",
    [
        ["launch/status.py", "grids/table2b.yaml"],
        ["launch/table.py", "grids/table2b.yaml", "--no-log"],
        ["launch/grid.py", "grids/table2b.yaml", "--dry-run"],
        ["launch/grid.py", "grids/table2b.yaml", "--cancel", "--executor", "local"],
    ],
    ids=["status", "table", "dry-run", "cancel"],
)
def test_light_command_imports_no_torch(env: dict[str, str], args: list[str]) -> None:
    modules = imported(env, *args)
    assert "kd.grid" in modules  # the record is read right: the grid was loaded
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"{' '.join(args)} imported {heavy[:5]}"


def test_dry_run_still_reports_a_misspelt_model(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "launch/grid.py", "grids/table2b.yaml", "--dry-run"]
        + ["defaults.student.model=convnext_bsae"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown timm model 'convnext_bsae'" in done.stderr


def test_name_cache_is_what_timm_lists(env: dict[str, str]) -> None:
    from kd.models import name_cache, names

    os.environ["KDGRID_CACHE_DIR"] = env["KDGRID_CACHE_DIR"]
    try:
        cached = name_cache.read_names()
    finally:
        del os.environ["KDGRID_CACHE_DIR"]
    import timm

    assert cached is not None
    assert set(timm.list_models()) <= set(cached[0]) and names.SMOKE_BIT in cached[0]
    assert (
        cached[1]["deit_base_distilled_patch16_384"]
        == names.pretrained_tags()["deit_base_distilled_patch16_384"]
    )


def test_status_reads_a_sqlite_store_without_mlflow(env: dict[str, str]) -> None:
    modules = imported(env, "launch/status.py", "grids/table2b.yaml", "--json")
    assert sorted(m for m in modules if m.split(".")[0] == "mlflow") == []
    done = subprocess.run(
        [sys.executable, "launch/status.py", "grids/table2b.yaml", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = json.loads(done.stdout)
    assert len(rows) == 10 and all(r["run_id"] for r in rows)  # the runs were read


def test_cancel_closes_sqlite_runs_without_mlflow_as_mlflow_would(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`--cancel` on a SQLite store writes with sqlite3: the runs it closes read back through
    MLflow as `Tracker.cancel_run` leaves them (KILLED, end time, cancel tag, reason), and a run
    that finished is left alone."""
    from kd.grid import load_grid
    from kd.tracking import CANCEL_REASON, CANCELLED, TAG, Tracker

    grid = load_grid(REPO / "grids/table2b.yaml", check_data=False, check_models=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    experiment = tracker.ensure_experiment(grid.experiment)
    run_ids = tracker.create_row_runs(experiment, grid.rows, executor="slurm")
    finished, by_mlflow, *rest = (run_ids[row.id] for row in grid.rows)
    tracker.client.set_terminated(finished, status="FINISHED")
    tracker.cancel_run(by_mlflow, CANCEL_REASON)  # the reference: MLflow's own calls

    light_env = {**env, "MLFLOW_TRACKING_URI": uri}
    args = ["launch/grid.py", "grids/table2b.yaml", "--cancel", "--executor", "local"]
    modules = imported(light_env, *args)
    assert sorted(m for m in modules if m.split(".")[0] in ("mlflow", "sqlalchemy")) == []

    assert tracker.client.get_run(finished).info.status == "FINISHED"
    reference = tracker.client.get_run(by_mlflow)
    for run_id in rest:
        run = tracker.client.get_run(run_id)
        assert run.info.status == reference.info.status == "KILLED"
        assert run.info.end_time is not None and run.info.end_time >= run.info.start_time
        assert run.data.tags[f"{TAG}.failure_reason"] == CANCEL_REASON
        assert run.data.tags[CANCELLED].isdigit()
        assert set(run.data.tags) == set(reference.data.tags)
        assert run.data.params == reference.data.params == {}  # a job never started: none
