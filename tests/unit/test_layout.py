"""The layout of issue 16 holds: small modules, short functions, no import cycles, no private
name used outside its module (tools/layout.py measures; `python tools/layout.py` prints it)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import layout  # noqa: E402

FIGURES = layout.report(layout.load())


def test_no_library_module_is_over_the_limit() -> None:
    assert FIGURES["modules_over_limit"] == [], f"over {layout.MAX_MODULE_LINES} lines"


def test_no_function_is_over_the_limit() -> None:
    assert FIGURES["functions_over_limit"] == [], f"over {layout.MAX_FUNCTION_LINES} lines"


def test_no_import_cycles() -> None:
    assert FIGURES["import_cycles"] == []


def test_imports_go_one_way_launch_bench_slurm_kd() -> None:
    assert FIGURES["upward_imports"] == []


def test_no_private_name_is_used_outside_its_module() -> None:
    assert FIGURES["private_uses"] == []


def test_the_measure_sees_what_it_should(tmp_path: Path) -> None:
    """The checks can fail: a cycle, a private import and a long function are all found."""
    names = {"kd.a", "kd.b"}
    (tmp_path / "kd").mkdir()
    a, b = tmp_path / "kd" / "a.py", tmp_path / "kd" / "b.py"
    a.write_text("from kd.b import _hidden\n\ndef f():\n" + "    x = 1\n" * 90)
    b.write_text("def g():\n    from kd import a\n    import slurm.job\n")
    old = layout.REPO
    layout.REPO = tmp_path
    try:
        modules = {m.name: m for m in (layout.parse_module(p, names) for p in (a, b))}
        figures = layout.report(modules)
    finally:
        layout.REPO = old
    assert figures["import_cycles"] == [["kd.a", "kd.b"]]
    assert figures["private_uses"] == [("kd.a", "kd.b._hidden", 1)]
    assert [f[0] for f in figures["functions_over_limit"]] == ["kd.a.f"]
    assert figures["upward_imports"] == [("kd.b", "slurm.job")]


def test_a_row_job_pickled_before_the_layout_change_still_loads() -> None:
    """Jobs queued before the restructuring hold a pickled `slurm.job.RowJob` (submitit's
    DelayedSubmission, recorded in tests/data): it must unpickle to today's class, whose call
    and requeue take the same arguments."""
    from slurm.job import RowJob

    with open(REPO / "tests" / "data" / "rowjob_queued_before_layout.pkl", "rb") as f:
        delayed = pickle.load(f)
    assert type(delayed.function) is RowJob
    assert delayed.args == (
        "/queued/outputs/t/row/row.json",
        "0123456789abcdef",
        "sqlite:////queued/mlflow.db",
    )
    requeued = delayed.function.checkpoint(*delayed.args)
    assert type(requeued.function) is RowJob and requeued.args == delayed.args


@pytest.mark.parametrize(
    "path",
    [
        "kd.train.run",
        "kd.grid.load_grid",
        "kd.grid.Grid",
        "kd.grid.Row",
        "kd.data.generate_dataset",
        "kd.evaluate.evaluate",
        "kd.models.build_model",
        "kd.models.smoke_model_name",
        "kd.tracking.Tracker",
        "kd.tracking.RowRun",
        "kd.tracking.resolve_tracking_uri",
        "slurm.job.RowJob",
        "slurm.launcher.launch",
        "slurm.status.grid_status",
    ],
)
def test_public_import_paths_keep_working(path: str) -> None:
    """The import paths the README and users name still resolve after the split."""
    import importlib

    module, _, name = path.rpartition(".")
    assert hasattr(importlib.import_module(module), name), path
