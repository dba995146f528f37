"""Unit tests: one function or class at a time, in this process, in seconds.
The fast run (`python -m pytest -m "not e2e and not slurm"`) is this folder.

Every test collected under this folder is marked `unit` and has a 60 s timeout
(pytest-timeout) unless it sets its own; the few here marked `e2e` or `slurm` (a real row
process, the cluster: left out of the fast run) get the 900 s of those tiers.
"""

from __future__ import annotations

import pytest
from tiers import mark_tier


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, __file__, "unit", timeout_s=60, slower_tiers={"e2e": 900, "slurm": 900})
