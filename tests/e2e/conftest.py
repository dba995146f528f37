"""End-to-end tests: real training processes, the launcher as a user runs it, a real MLflow
store; no SLURM.

Every test collected under this folder is marked `e2e` and has a 900 s timeout
(pytest-timeout) unless it sets its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from launching import launch
from tiers import mark_tier

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, __file__, "e2e", timeout_s=900)


@pytest.fixture(scope="session")
def table2b_smoke(tmp_path_factory):
    """The README's main job, table2b --smoke on the local executor, run once per session.
    Returns (workdir, the launch's CompletedProcess)."""
    workdir = tmp_path_factory.mktemp("table2b-smoke")
    shutil.copytree(REPO / "grids", workdir / "grids")
    result = launch(workdir, "grids/table2b.yaml", "--smoke", "--max-parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result
