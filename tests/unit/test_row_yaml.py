"""row.yaml for many rows (kd/tracking/yaml_text.py: each entry dumped once per distinct value
and reused) is byte for byte what one `yaml.dump` per row writes: over the paper grids' rows,
a 300-row axis, fuzzed grids and values chosen to make YAML quote, fold or escape."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from fuzzing import VALID_GRID, broken_grids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd.data import generate_dataset
from kd.grid import GridError, load_grid
from kd.tracking import row_yaml
from kd.tracking.yaml_text import DUMPER, dump_cached

GRIDS = Path(__file__).resolve().parents[2] / "grids"  # the paper grids (fashion_kd needs weights)


def whole(data: dict) -> str:
    """What row.yaml held before: one dump of the whole row."""
    return yaml.dump(data, Dumper=DUMPER, sort_keys=False)


def same_text(rows, cache: dict | None = None) -> int:
    cache = {} if cache is None else cache
    for row in rows:
        data = row.to_dict()
        assert dump_cached(data, cache) == whole(data), row.id
        assert row_yaml(row, cache=cache) == row_yaml(row)
    return len(rows)


@pytest.mark.parametrize("grid", ["table2a.yaml", "table2b.yaml", "table2c.yaml", "vit2cnn.yaml"])
def test_paper_grids_rows(grid):
    cache: dict = {}  # shared by all variants, as values recur across them
    count = 0
    for kwargs in ({}, {"smoke": True}, {"seeds": 3}):
        count += same_text(load_grid(GRIDS / grid, check_data=False, **kwargs).rows, cache)
    assert count > 0


def test_an_axis_of_rows(tmp_path):
    from bench.launch import write_launch_grid

    grid = load_grid(write_launch_grid(tmp_path, 300, None, "yaml_axis"))
    assert same_text(grid.rows) == 300


TRICKY = [
    "",
    " lead",
    "trail ",
    "yes",
    "No",
    "null",
    "~",
    "0123",
    "0x1f",
    "1e3",
    "1.5",
    "-",
    "- a",
    "a: b",
    "a #b",
    "#c",
    "[x]",
    "{a: 1}",
    "'q'",
    '"d"',
    "a\tb",
    "two\nlines",
    "trailing newline\n",
    "é ü 中文",
    "emoji \U0001f600",
    "\x85 next line",
    "word " * 30,
    "x" * 200,
    "*alias",
    "&anchor",
    "!tag",
    "%dir",
    "@at",
    "`tick",
    "?q",
    "|",
    ">",
    "2024-01-01",
    "12:30:00",
    ".inf",
    ".NaN",
]
VALUES = [
    *TRICKY,
    0,
    -1,
    10**30,
    True,
    False,
    None,
    0.0,
    -0.0,
    1e-3,
    1e20,
    float("inf"),
    float("nan"),
    [],
    {},
    ["a", 1, None, [2]],
    {"k": "v", "n": {"m": [1, {"z": "yes"}]}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_yaml_quotes_folds_or_escapes(tmp_path, value):
    from bench.launch import write_launch_grid

    row = load_grid(write_launch_grid(tmp_path, 2, None, "yaml_values")).rows[1]
    base = row.to_dict()
    cache: dict = {}
    places = [
        ("key",),
        ("grid_file",),
        ("config", "label"),
        ("config", "output_dir"),
        ("config", "train", "lr"),
        ("config", "evaluate", "cluster"),
        ("config", "resources", "sbatch_extra"),
        ("dependency_dirs",),
    ]
    for place in places:
        data = copy.deepcopy(base)
        parent = data
        for name in place[:-1]:
            parent = parent[name]
        parent[place[-1]] = value
        assert dump_cached(data, cache) == whole(data), place
        # ... and as a key at each level
        parent[str(value) if not isinstance(value, (list, dict)) else "k"] = 1
        assert dump_cached(data, cache) == whole(data), place


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return generate_dataset(
        "imagefolder", tmp_path_factory.mktemp("yamldata") / "d", num_classes=2, image_size=16
    ).root


def test_fuzzed_grids(tmp_path, data_root):
    valid = copy.deepcopy(VALID_GRID)
    valid["defaults"]["data"]["root"] = data_root
    path = tmp_path / "valid.yaml"
    path.write_text(yaml.safe_dump(valid))
    cache: dict = {}
    same_text(load_grid(path).rows, cache)
    loaded = []

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(broken_grids(str(data_root)), st.booleans())
    def case(text: str, shared: bool) -> None:
        path.write_text(text)
        try:
            grid = load_grid(path)
        except GridError:
            return
        loaded.append(same_text(grid.rows, cache if shared else None))

    case()
    assert loaded  # some fuzzed grids were valid, and their rows compared
