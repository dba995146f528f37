"""Fixtures shared by end-to-end tests: one run of the README's main job for the whole session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def launch(
    workdir: Path, *args: str, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`python launch/grid.py ARGS --executor local` in `workdir`, MLflow in workdir/mlflow.db."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "grid.py"), *args, "--executor", "local"],
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def table2b_smoke(tmp_path_factory):
    """The README's main job, table2b --smoke on the local executor, run once per session.
    Returns (workdir, the launch's CompletedProcess)."""
    workdir = tmp_path_factory.mktemp("table2b-smoke")
    shutil.copytree(REPO / "grids", workdir / "grids")
    result = launch(workdir, "grids/table2b.yaml", "--smoke", "--max-parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result
