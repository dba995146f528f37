"""A row as plain data: the run's row.yaml (written by the job when it starts) and the dict a
SLURM job's pickle carries read back into the row they were made from (the same dict, the
same content key), over the paper grids' rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.grid import Row, load_grid
from kd.tracking import row_yaml

GRIDS = Path(__file__).resolve().parents[2] / "grids"  # the paper grids (fashion_kd needs weights)


@pytest.mark.parametrize("grid", ["table2a.yaml", "table2b.yaml", "table2c.yaml", "vit2cnn.yaml"])
def test_row_yaml_reads_back_into_the_row(grid):
    rows = load_grid(GRIDS / grid, check_data=False, smoke=True).rows
    for row in rows:
        data = yaml.safe_load(row_yaml(row))
        assert data == row.to_dict(), row.id
        assert Row.from_dict(data).key == row.key
    assert rows


@pytest.mark.parametrize("grid", ["table2a.yaml", "table2b.yaml", "vit2cnn.yaml"])
def test_rows_made_into_dicts_with_shared_sections_equal_one_by_one(grid):
    """What a SLURM job's pickle carries (`Row.to_dict(shared)`, sections made once for the
    rows that hold them) equals each row made alone, and reads back into the same row."""
    rows = load_grid(GRIDS / grid, check_data=False, seeds=2).rows
    shared: dict = {}
    for row in rows:
        data = row.to_dict(shared)
        assert data == row.to_dict(), row.id
        assert Row.from_dict(data).key == row.key
    assert len(shared) < 12 * len(rows)  # sections were shared
