"""Fuzzing (hypothesis) of the grid loader and of the four launch scripts' command lines, in
this process: any bytes, any YAML, any override and any option value end in a Grid, a
GridError or exit status 0/1/2 with a message; never another exception (a traceback), and
bad input creates nothing. How many cases were tried is printed at the end of the session.

Bounded: `max_examples` per property (KDGRID_FUZZ_EXAMPLES, default 60) and a per-case
deadline keep the whole file to seconds; tests/e2e/test_fuzz_cli.py runs more, as processes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzing import (
    FUZZ_COUNTS,
    FUZZ_FAILURES,
    Outcome,
    broken_grids,
    command_lines,
    files_under,
    load_script,
    overrides,
    run_main,
    yaml_texts,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd.data import generate_dataset
from kd.grid import Grid, GridError, load_grid

EXAMPLES = int(os.environ.get("KDGRID_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=30_000,  # ms per case: a hang fails the case (a shared CI machine can be slow)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # the same cases on every machine: a failure is reproduced by its seed
    derandomize=True,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return generate_dataset(
        "imagefolder", tmp_path_factory.mktemp("fuzzdata") / "d", num_classes=2, image_size=16
    ).root


@pytest.fixture(scope="module")
def valid_grid(tmp_path_factory: pytest.TempPathFactory, data_root: str) -> Path:
    import yaml
    from fuzzing import VALID_GRID

    grid = {**VALID_GRID, "defaults": {**VALID_GRID["defaults"]}}
    grid["defaults"]["data"] = {**grid["defaults"]["data"], "root": str(data_root)}
    path = tmp_path_factory.mktemp("fuzzgrid") / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    load_grid(path)  # valid as written: the strategies break it
    return path


def loads_or_says_why(path: Path, overrides: list[str] = ()) -> None:
    """The property of the loader: a Grid, or a GridError whose every problem is a message
    naming the file (or the override)."""
    what = "grid files and overrides"
    FUZZ_COUNTS[what] += 1
    with counted_failure(what):
        try:
            grid = load_grid(path, overrides)
        except GridError as exc:
            assert exc.problems, "a GridError without problems"
            for problem in exc.problems:
                assert problem.strip() and "Traceback" not in problem
                assert str(path) in problem or repr(str(path)) in problem, problem
            return
        assert isinstance(grid, Grid) and grid.rows


@contextlib.contextmanager
def counted_failure(what: str) -> Iterator[None]:
    """Counts a case that fails the property (for the summary), then lets it fail the test."""
    try:
        yield
    except BaseException:
        FUZZ_FAILURES[what] += 1
        raise


@pytest.fixture(autouse=True)
def warm(valid_grid: Path) -> None:
    """The first load imports timm's model registry (seconds): not inside a timed case."""


def test_any_bytes_as_a_grid_file(tmp_path: Path):
    @FUZZ
    @given(st.binary(max_size=300))
    def case(data: bytes) -> None:
        path = tmp_path / "grid.yaml"
        path.write_bytes(data)
        loads_or_says_why(path)

    case()


def test_any_yaml_like_text_as_a_grid_file(tmp_path: Path):
    @FUZZ
    @given(yaml_texts())
    def case(text: str) -> None:
        path = tmp_path / "grid.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        loads_or_says_why(path)

    case()


def test_a_valid_grid_broken_anywhere(tmp_path: Path, data_root: str):
    @FUZZ
    @given(broken_grids(str(data_root)))
    def case(text: str) -> None:
        path = tmp_path / "grid.yaml"
        path.write_text(text)
        loads_or_says_why(path)

    case()


def test_any_overrides(valid_grid: Path):
    @FUZZ
    @given(st.lists(overrides(), min_size=1, max_size=4))
    def case(given_overrides: list[str]) -> None:
        loads_or_says_why(valid_grid, given_overrides)

    case()


# ---- the command lines, through each script's main(argv)


class Recorder:
    """Stands in for what a valid command line would start (a launch, a cancel, a training):
    the fuzz test checks that the command got there only with sane values."""

    def __init__(self) -> None:
        self.calls = 0

    def launch(self, grid, options) -> int:
        self.calls += 1
        assert options.max_parallel >= 1 and options.array_parallelism >= 1
        assert options.rows is None or options.rows
        return 0

    def cancel_rows(self, grid, rows, uri) -> list[str]:
        self.calls += 1
        assert rows
        return []

    def run(self, row, tracking_uri) -> dict[str, float]:
        self.calls += 1
        return {"val/acc1": 0.0}


def check_command(outcome: Outcome, created: set[str], argv: list[str]) -> None:
    FUZZ_COUNTS["command lines"] += 1
    with counted_failure("command lines"):
        check_outcome(outcome, created, argv)


def check_outcome(outcome: Outcome, created: set[str], argv: list[str]) -> None:
    assert outcome.error is None, f"{argv}: {type(outcome.error).__name__}: {outcome.error}"
    assert outcome.status in (0, 1, 2), (argv, outcome.status, outcome.stderr)
    assert "Traceback" not in outcome.stdout + outcome.stderr, argv
    if outcome.status == 2:
        assert outcome.stderr.strip(), f"{argv}: exit 2 without a message"
        assert not created, f"{argv}: bad input created {sorted(created)}"


@pytest.mark.parametrize("script", ["grid", "status", "table", "train"])
def test_any_command_line(script: str, valid_grid: Path, monkeypatch: pytest.MonkeyPatch):
    import kd.train
    import slurm.launcher
    import slurm.status

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recorder = Recorder()
    monkeypatch.setattr(slurm.launcher, "launch", recorder.launch)
    monkeypatch.setattr(slurm.status, "cancel_rows", recorder.cancel_rows)
    monkeypatch.setattr(kd.train, "run", recorder.run)
    module = load_script(script)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        @FUZZ
        @given(command_lines(script, str(valid_grid), folder))
        def case(argv: list[str]) -> None:
            with tempfile.TemporaryDirectory(dir=folder) as work:
                cwd = Path(work)
                outcome = run_main(module, argv, cwd)
                check_command(outcome, files_under(cwd), argv)

        case()
