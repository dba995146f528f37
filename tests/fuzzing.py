"""Property-based fuzzing of everything that reaches the launcher (hypothesis): the strategies
(grid files, overrides, command lines), the in-process runner of the launch scripts' `main`,
and the count of cases tried, printed in the session's terminal summary.

The property everywhere: no exception escapes (no traceback), the exit status is 0, 1 or 2,
a status 2 comes with a message on stderr, and bad input creates nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
FUZZ_COUNTS: Counter[str] = Counter()  # what was tried -> how many cases (terminal summary)
FUZZ_FAILURES: Counter[str] = Counter()  # ... and how many of them failed the property

# A valid grid, as a tree: the strategies break it one or more places at a time.
VALID_GRID = {
    "name": "fuzz",
    "defaults": {
        "student": {"model": "resnet18"},
        "init": "scratch",
        "data": {"dataset": "imagefolder", "root": "DATA", "img_size": 32, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 4},
        "resources": {"gpus_per_node": 0},
        "output_dir": "outputs",
    },
    "recipes": {"fast": {"train": {"epochs": 2}}},
    "rows": [
        {"id": "teacher", "label": "T", "student": {"model": "resnet34"}},
        {
            "id": "student",
            "label": "S",
            "recipe": "fast",
            "teacher": {"row": "teacher"},
            "kd": {"ce": 0.5, "ikd": 0.5},
        },
    ],
}

KEYS = [
    "name", "experiment", "tracking_uri", "defaults", "recipes", "axes", "rows", "id", "label",
    "recipe", "student", "model", "init", "teacher", "row", "file", "kd", "ce", "ikd",
    "deit_hard", "data", "dataset", "root", "img_size", "train", "epochs", "lr", "batch_size",
    "resources", "gpus_per_node", "time_min", "partition", "output_dir", "evaluate", "cluster",
    "values", "exclude", "paper", "acc1", "sbatch_extra", "source", "tag", "<<",
]  # fmt: skip
DOTTED = [
    "train.epochs", "train.lr", "train.batch_size", "student.model", "init", "init.row",
    "teacher.row", "teacher", "kd.ce", "kd.ikd", "kd", "data.root", "data.dataset",
    "data.img_size", "resources.time_min", "resources.gpus_per_node", "resources.partition",
    "output_dir", "name", "experiment", "tracking_uri", "recipes.fast.train.epochs", "axes",
    "rows", "defaults", "evaluate.cluster.cub", "train.nope", "id", "label", "paper.acc1",
]  # fmt: skip
TRICKY_TEXT = [
    "", " ", "0", "-1", "-3", "1", "2", "1e999", "-1e999", "nan", "inf", "1e-4", "9" * 30,
    "null", "true", "[]", "{}", "[1,2]", "{a: 1}", "a,b", "${oc.env:KDGRID_FUZZ_UNSET}",
    "${nope}", "'", '"', "\\", "resnet18", "teacher", "student", "T", "S", "outputs",
    "/", "/dev/null", "/proc/nope/x", "..", "ü", "\u202e", "a b", "=", "~", "+", "--rows",
]  # fmt: skip


def scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(TRICKY_TEXT),
        st.text(max_size=12),
    )


def trees() -> st.SearchStrategy:
    keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=12,
    )


def paths_in(tree: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) to a value of `tree`."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += paths_in(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            out += paths_in(value, (*prefix, index))
    return out


@st.composite
def broken_grids(draw: st.DrawFn, data_root: str) -> str:
    """The valid grid with a few values replaced, added or removed, as YAML text."""
    import copy

    grid = copy.deepcopy(VALID_GRID)
    grid["defaults"]["data"]["root"] = data_root
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(paths_in(grid)))
        parent = grid
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(trees())
        else:
            parent[path[-1]] = draw(trees())
    return yaml.safe_dump(grid, allow_unicode=draw(st.booleans()))


def yaml_texts() -> st.SearchStrategy[str]:
    """YAML-looking text: fragments a hand-written grid is made of, in any order."""
    pieces = st.sampled_from(
        [
            "name: x\n", "rows:\n", "  - {id: a, label: A}\n", "defaults: {}\n", "- ", ": ",
            "&a ", "*a ", "!!str ", "!!binary aGk= ", "!!python/name:os.system ", "[", "]",
            "{", "}", "\n", "  ", "\t", "'", '"', "#", "---\n", "...\n", "? ", "<<: *a\n",
            "%YAML 1.2\n", "\ufeff", "\x85", "\u2028", "1e999", ".nan", "~", "|\n", ">\n",
        ]
    )  # fmt: skip
    return st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=30).map("".join)


def overrides() -> st.SearchStrategy[str]:
    prefix = st.sampled_from(["", "+", "++", "~"])
    key = st.one_of(st.sampled_from(DOTTED), st.text(max_size=8))
    value = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=10))
    sep = st.sampled_from(["=", "=", "=", ""])
    return st.tuples(prefix, key, sep, value).map("".join)


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tracking_uris(folder: Path) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                f"sqlite:///{folder}/fuzz.db", "sqlite:///", "sqlite://", "sqlite:////proc/x/m.db",
                "sqlite:////etc/passwd", "foo://bar", "databricks", f"http://127.0.0.1:{closed_port()}",
                "http://[::1", "http://localhost:99999", "https://", "file:///proc/nope/x",
                "postgresql://127.0.0.1:1/db", "", " ", "mlruns",
            ]
        ),
        st.text(max_size=10),
    )  # fmt: skip


# Each script's options and the values tried for them (beside random text).
OPTION_VALUES = {
    "--rows": ["", ",", "teacher", "T,S", "nope", "teacher,,student", "S [x]"],
    "--max-parallel": ["-3", "0", "1", "2", "abc", "1e9", "99999999999999999999", "2.5"],
    "--array-parallelism": ["-1", "0", "10", "x", "10000000"],
    "--time": ["0", "-5", "60", "1.5", "abc", "999999999"],
    "--partition": ["", "gpu", "a b", "gpu;rm"],
    "--account": ["", "lab"],
    "--qos": ["", "normal"],
    "--executor": ["local", "slurm", "auto", "nope", ""],
    "--watch": ["-1", "0", "nan", "inf", "1e308", "x", "0.5"],
    "--format": ["md", "csv", "json", "xml", ""],
    "--plot": ["", "x.png", "x.txt", "/proc/nope/x.png", ".", "dir/x.png"],
    "--metrics": ["", ",", "cluster/cub/nmi", "a,,b"],
    "--row": ["", "teacher", "S", "nope", ","],
}
FLAGS = {
    "grid": ["--dry-run", "--json", "--smoke", "--rerun-failed", "--force", "--cancel"],
    "status": ["--smoke", "--json", "--watch"],
    "table": ["--smoke", "--no-log"],
    "train": ["--smoke"],
}
VALUED = {
    "grid": ["--rows", "--max-parallel", "--array-parallelism", "--time", "--partition",
             "--account", "--qos", "--executor", "--tracking-uri"],
    "status": ["--watch", "--tracking-uri"],
    "table": ["--format", "--plot", "--metrics", "--tracking-uri"],
    "train": ["--row", "--tracking-uri"],
}  # fmt: skip


@st.composite
def command_lines(draw: st.DrawFn, script: str, grid: str, folder: Path) -> list[str]:
    """An argv for `script` (without the program name): the grid (or another file), options
    with odd values, overrides, in any order."""
    argv = [draw(st.sampled_from([grid, grid, grid, "/nonexistent.yaml", str(folder), ""]))]
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        kind = draw(st.sampled_from(["flag", "valued", "override", "junk"]))
        if kind == "flag":
            argv.append(draw(st.sampled_from(FLAGS[script])))
        elif kind == "valued":
            option = draw(st.sampled_from(VALUED[script]))
            values = (
                tracking_uris(folder)
                if option == "--tracking-uri"
                else st.one_of(st.sampled_from(OPTION_VALUES[option]), st.text(max_size=8))
            )
            argv += [option, draw(values)]
        elif kind == "override":
            argv.append(draw(overrides()))
        else:
            argv.append(draw(st.text(max_size=8)))
    if script == "train" and "--row" not in argv and draw(st.booleans()):
        argv += ["--row", "teacher"]
    return argv


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    error: BaseException | None  # an exception that escaped main: a traceback for the user


def load_script(name: str) -> ModuleType:
    """launch/NAME.py as a module, for its `main(argv)`."""
    spec = importlib.util.spec_from_file_location(
        f"launch_{name}_fuzz", REPO / "launch" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module: ModuleType, argv: list[str], cwd: Path) -> Outcome:
    """`module.main(argv)` in `cwd`, its stdout and stderr captured; SystemExit (argparse) is
    its exit status, any other exception is recorded, not raised."""
    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    error = None
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = module.main(argv)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            except Exception as exc:  # noqa: BLE001 - the property under test
                status, error = -1, exc
    finally:
        os.chdir(before)
    return Outcome(status, out.getvalue(), err.getvalue(), error)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
