"""The grid cache (kd/grid/cache.py): a grid read back equals the grid loaded, and any input the
load depends on (the file, the overrides, an environment variable it reads, the flags) gives a
new load; a broken cache file is loaded over; a failed load is not kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import kd.grid.cache as cache
from kd.grid import GridError, load_grid

GRID = {
    "name": "cached",
    "defaults": {
        "student": {"model": "resnet18"},
        "data": {"dataset": "imagefolder", "root": "${oc.env:KDGRID_TEST_ROOT,/data/x}"},
        "train": {"epochs": 1},
        "output_dir": "outputs",
    },
    "axes": {"values": {"train.lr": [round(0.001 * (i + 1), 3) for i in range(12)]}},
    "rows": [],
}


@pytest.fixture
def grid_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDGRID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KDGRID_GRID_CACHE", raising=False)
    monkeypatch.delenv("KDGRID_TEST_ROOT", raising=False)
    monkeypatch.setattr(cache, "CACHE_MIN_ROWS", 10)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    return path


OPTIONS = {"check_data": False, "check_models": False}


def loads(monkeypatch) -> list[int]:
    """Counts the full loads the cache makes."""
    made: list[int] = []

    def counted(*args, **kwargs):
        made.append(1)
        return load_grid(*args, **kwargs)

    monkeypatch.setattr(cache, "load_grid", counted)
    return made


def test_a_grid_read_back_equals_the_grid_loaded(grid_file, monkeypatch):
    made = loads(monkeypatch)
    first = cache.load_grid_cached(grid_file, **OPTIONS)
    again = cache.load_grid_cached(grid_file, **OPTIONS)
    assert len(made) == 1 and again == first == load_grid(grid_file, **OPTIONS)
    assert [r.key for r in again.rows] == [r.key for r in first.rows]
    assert len(list(cache.cache_folder().glob("*.pickle"))) == 1


def test_each_input_gives_a_new_load(grid_file, monkeypatch):
    made = loads(monkeypatch)
    base = cache.load_grid_cached(grid_file, **OPTIONS)
    assert cache.load_grid_cached(grid_file, ["train.epochs=2"], **OPTIONS) != base
    assert cache.load_grid_cached(grid_file, smoke=True, **OPTIONS).smoke
    assert len(cache.load_grid_cached(grid_file, seeds=2, **OPTIONS).rows) == 24
    monkeypatch.setenv("KDGRID_TEST_ROOT", "/elsewhere")  # read by ${oc.env:...}
    moved = cache.load_grid_cached(grid_file, **OPTIONS)
    assert {r.config.data.root for r in moved.rows} == {"/elsewhere"}
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")  # not read by the grid: same entry
    assert cache.load_grid_cached(grid_file, **OPTIONS) == moved
    grid_file.write_text(grid_file.read_text().replace("epochs: 1", "epochs: 3"))
    assert {r.config.train.epochs for r in cache.load_grid_cached(grid_file, **OPTIONS).rows} == {3}
    assert len(made) == 6


def test_a_broken_cache_file_is_loaded_over(grid_file, monkeypatch):
    made = loads(monkeypatch)
    grid = cache.load_grid_cached(grid_file, **OPTIONS)
    (file,) = cache.cache_folder().glob("*.pickle")
    file.write_bytes(file.read_bytes()[:100])  # truncated
    assert cache.load_grid_cached(grid_file, **OPTIONS) == grid
    assert cache.load_grid_cached(grid_file, **OPTIONS) == grid
    assert len(made) == 2  # loaded again once, then read from the rewritten file


def test_small_grids_failed_loads_and_the_switch_are_not_cached(grid_file, monkeypatch):
    made = loads(monkeypatch)
    monkeypatch.setattr(cache, "CACHE_MIN_ROWS", 100)
    cache.load_grid_cached(grid_file, **OPTIONS)
    monkeypatch.setattr(cache, "CACHE_MIN_ROWS", 10)
    monkeypatch.setenv("KDGRID_GRID_CACHE", "0")
    cache.load_grid_cached(grid_file, **OPTIONS)
    assert not cache.cache_folder().exists()
    monkeypatch.delenv("KDGRID_GRID_CACHE")
    grid_file.write_text(grid_file.read_text().replace("resnet18", "resnet18\n    bogus: 1"))
    for _ in range(2):
        with pytest.raises(GridError, match="bogus"):
            cache.load_grid_cached(grid_file, **OPTIONS)
    assert len(made) == 4 and not list(cache.cache_folder().glob("*.pickle"))


def test_a_launch_leaves_the_grid_where_status_reads_it(grid_file, monkeypatch):
    """The launcher's fully checked grid, kept for status (`keep_for_readers`): status's
    first read makes no load; the checks a launch makes add problems, never change rows."""
    from kd.data import generate_dataset

    root = generate_dataset("imagefolder", grid_file.parent / "d", num_classes=2, image_size=16)
    monkeypatch.setenv("KDGRID_TEST_ROOT", str(root.root))
    checked = load_grid(grid_file, ["train.epochs=2"], smoke=False, seeds=2, check_models=False)
    cache.keep_for_readers(checked, grid_file, checked.overrides, smoke=False, seeds=2)
    made = loads(monkeypatch)
    read = cache.load_grid_cached(
        grid_file, ["train.epochs=2"], smoke=False, check_data=False, check_models=False, seeds=2
    )
    assert made == [] and read == checked
    assert load_grid(grid_file, ["train.epochs=2"], seeds=2, **OPTIONS) == checked
