"""Marks each tier's tests (tests/unit, tests/e2e, tests/slurm) from the folder they are in, so a
test's tier is where it lives, and `-m "not e2e and not slurm"` is the fast run."""

from __future__ import annotations

from pathlib import Path

import pytest


def mark_tier(
    items: list[pytest.Item],
    conftest_file: str,
    tier: str,
    timeout_s: int,
    slower_tiers: dict[str, int] | None = None,
) -> None:
    """Mark the items under the folder of `conftest_file` with `tier` and, unless they set one,
    a pytest-timeout of `timeout_s` seconds, or of a slower tier's whose marker they carry
    (`slower_tiers`: marker -> seconds). (A conftest's collection hook sees every item of the
    session, so it picks its own folder's.)"""
    folder = Path(conftest_file).resolve().parent
    for item in items:
        if folder not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("timeout") is None:
            slower = [s for m, s in (slower_tiers or {}).items() if item.get_closest_marker(m)]
            item.add_marker(pytest.mark.timeout(max([timeout_s, *slower])))
