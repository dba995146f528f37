"""Tests on the local SLURM cluster (`bash slurm/cluster.sh up`); CI brings it up and never
skips them.

Every test collected under this folder is marked `slurm` and has a 900 s timeout
(pytest-timeout) unless it sets its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiers import mark_tier


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, __file__, "slurm", timeout_s=900)


@pytest.fixture(scope="module")
def epoch_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder copy with 64 training images (4 classes), for SLURM rows: epochs long
    enough (8 steps) to be timed by their compute rather than by the per-epoch bookkeeping
    (state file, MLflow), which swings with the box's load."""
    from slurmtools import generate_data

    return generate_data(tmp_path_factory.mktemp("epoch-data") / "data", 16)
