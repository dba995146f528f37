"""Bad input, through the real command line: a catalogue of malformed grids and command lines.

Every case runs `python launch/grid.py GRID ...` in its own empty folder (with the tracking store
there, `--tracking-uri sqlite:///<folder>/mlflow.db`) and must end the same way:

- exit status 2 and no Python traceback;
- a message on stderr that names the grid file, the row (where there is one) and the key, and
  says what to do;
- nothing created or touched: the folder holds exactly the inputs it held before (no MLflow
  database, so no run; no output folder, no lock file, no generated data), and the shared
  inputs (dataset copies, checkpoints) are untouched;
- for the SLURM cases (`--executor slurm`, against the dev cluster): no job submitted.

Nothing trains: each case is validation only, a fraction of a second once torch and timm are
imported; so the catalogue runs the script in processes forked from one that imported them
(`ForkServer`), and a few cases again as plain `python launch/grid.py` processes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fuzzing import closed_port
from slurmtools import require_slurm

from kd.data import generate_dataset

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
CLOSED_PORT = closed_port()  # a real localhost port nothing listens on

# A valid grid: a teacher row and a student distilled from it, on a generated ImageFolder copy.
# Each case breaks one thing in it. `{name}` (unique per case: SLURM job names derive from it),
# `{data}` and the other fields of `Inputs` are filled in by `grid_text`.
BASE = """\
name: {name}
experiment: kd-{name}
defaults:
  student: {model: resnet18}
  init: scratch
  data: {dataset: imagefolder, root: {data}, img_size: 32, num_workers: 0}
  train: {epochs: 1, batch_size: 4}
  resources: {gpus_per_node: 0}
  output_dir: outputs
recipes:
  fast: {train: {epochs: 2}}
rows:
  - {id: teacher, label: T, student: {model: resnet34}}
  - {id: student, label: S, recipe: fast, teacher: {row: teacher}, kd: {ce: 0.5, ikd: 0.5}}
"""


@dataclass(frozen=True)
class Inputs:
    """Files the cases point at, shared by all cases, outside their folders."""

    folder: Path
    data: Path  # a valid ImageFolder copy
    cub_bad_line: Path  # a CUB copy whose images.txt has a malformed line
    cub_missing_image: Path  # a CUB copy whose images.txt lists an image that is not there
    resnet18: Path  # state dict of resnet18 (another architecture for deit students)
    deit: Path  # state dict of deit_tiny_patch16_224
    corrupt: Path  # random bytes
    truncated: Path  # the first half of a real checkpoint
    pickled_code: Path  # a checkpoint with a pickled Python object besides the tensors


@dataclass(frozen=True)
class Case:
    id: str
    # What to break: replacements in BASE (old -> new), or a whole grid text.
    replace: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    args: tuple[str, ...] = ()
    # What the message line must hold besides the file: the row, the key, and the fragments
    # (the problem and what to do about it).
    row: str | None = None
    key: str | None = None
    fragments: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # what stderr must not say (a problem hiding behind another)
    slurm: bool = False
    grid_name: str = "grid.yaml"  # the file passed on the command line
    create_grid: bool = True
    data: bytes | None = None  # the grid file's bytes, for files that are not text
    tracking_uri: str | None = None  # instead of the case folder's SQLite store
    names_file: bool = True  # the problem is the grid file's (else an option's: no file named)


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    grid: Path
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    jobs: list[str] = field(default_factory=list)  # SLURM jobs named after the case's grid


def D(*pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(zip(pairs[::2], pairs[1::2], strict=True))


T_ROW = "  - {id: teacher, label: T, student: {model: resnet34}}"
FIX_YAML = "fix the YAML there"

CASES = [
    # ---- the grid file itself
    Case("yaml-syntax", text="name: x\nrows: [\n  {id: a, label: A}\n", fragments=("YAML syntax error", FIX_YAML)),
    Case("yaml-bad-indent", replace=D("  init: scratch", "    init: scratch"), fragments=("YAML syntax error", FIX_YAML)),
    Case("yaml-duplicate-key", replace=D("  init: scratch", "  init: scratch\n  init: pretrained"), fragments=("duplicate key 'init'", "keep one")),
    Case("yaml-python-tag", text="name: !!python/object/apply:os.system ['touch pwned']\nrows: []\n", fragments=("a value tagged", "python/object/apply", "a grid holds only text")),
    Case("grid-file-missing", create_grid=False, fragments=("cannot read the grid file", "check the path")),
    Case("grid-not-a-mapping", text="- 1\n- 2\n", fragments=("must be a YAML mapping",)),
    Case("grid-not-utf8", data=b"name: x\nrows: [\xff\xfe]\n", fragments=(":2: not UTF-8 text", "save it as UTF-8")),
    Case("grid-binary", data=bytes(range(256)) * 4, fragments=("not UTF-8 text",)),
    Case("grid-control-character", text="name: x\x07\n", fragments=("character #x0007 is not allowed",)),
    Case("grid-empty", text="", fragments=("the grid file is empty",)),
    Case("grid-deeply-nested", text="name: " + "[" * 5000 + "]" * 5000 + "\n", fragments=("nested deeper than 50 levels", FIX_YAML)),
    Case("grid-alias-bomb", text="".join(f"{k}: &{k} [{', '.join([f'*{p}' if p else 'lol'] * 9)}]\n" for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True)), fragments=("once its aliases (*name) are expanded",)),
    Case("grid-self-alias", text="name: x\nrows: &r [*r]\n", fragments=("refers to a value that contains it",)),
    Case("grid-binary-tag", replace=D("name: {name}", "name: !!binary aGk="), fragments=("tagged 'tag:yaml.org,2002:binary'",)),
    Case("grid-number-key", replace=D("  init: scratch", "  init: scratch\n  1: 2"), fragments=("key '1' is not a name",)),
    Case("grid-is-a-folder", create_grid=False, grid_name="", fragments=("cannot read the grid file", "Is a directory")),
    # ---- unknown or misspelt keys
    Case("unknown-top-level-key", replace=D("recipes:", "recipies:"), key="top-level key 'recipies'", fragments=("unknown key", "did you mean 'recipes'?")),
    Case("unknown-row-key", replace=D(T_ROW, T_ROW[:-1] + ", trian: {epochs: 2}}"), row="teacher", key="trian", fragments=("unknown key", "did you mean 'train'?")),
    Case("misspelt-nested-key", replace=D(T_ROW, T_ROW[:-1] + ", train: {lrr: 0.1}}"), row="teacher", key="train.lrr", fragments=("unknown key", "did you mean 'train.lr'?")),
    Case("unknown-recipe-key", replace=D("fast: {train: {epochs: 2}}", "fast: {train: {epochz: 2}}"), row="student", key="train.epochz", fragments=("unknown key", "did you mean 'train.epochs'?")),
    Case("unknown-defaults-key", replace=D("  init: scratch", "  init: scratch\n  studnet: {drop_path: 0.1}"), row="teacher", key="studnet", fragments=("unknown key", "did you mean 'student'?")),
    Case("unknown-axes-key", replace=D("rows:", "axes:\n  values: {train.lr: [0.1, 0.2]}\n  exlude: [{lr: 0.2}]\nrows:"), key="axes.exlude", fragments=("unknown key", "did you mean 'exclude'?")),
    Case("unknown-axes-value-key", replace=D("rows:", "axes:\n  values: {train.lrr: [0.1, 0.2]}\n  id: 'sweep_{lrr}'\nrows:"), row="sweep_0.1", key="train.lrr", fragments=("unknown key", "did you mean 'train.lr'?")),
    # ---- wrong types and ranges
    Case("wrong-type", replace=D("epochs: 1,", "epochs: ten,"), row="teacher", key="train.epochs", fragments=("must be int, got 'ten'",)),
    Case("out-of-range", replace=D(T_ROW, T_ROW[:-1] + ", train: {lr: 20}}"), row="teacher", key="train.lr", fragments=("must be in (0, 10), got 20",)),
    Case("unknown-dataset-name", replace=D("dataset: imagefolder", "dataset: cub2011"), row="teacher", key="data.dataset", fragments=("must be one of 'cub'",), absent=("CUB-200-2011",)),
    Case("negative-gpus", replace=D("gpus_per_node: 0", "gpus_per_node: -1"), row="teacher", key="resources.gpus_per_node", fragments=("must be >= 0, got -1",)),
    Case("not-a-bool", replace=D("batch_size: 4}", "batch_size: 4, ema: sometimes}"), row="teacher", key="train.ema", fragments=("must be bool, got 'sometimes'",)),
    # ---- models, KD terms, recipes
    Case("unknown-timm-model", replace=D("model: resnet34", "model: resnet_34"), row="teacher", key="student.model", fragments=("unknown timm model 'resnet_34'", "did you mean")),
    Case("unknown-pretrained-tag", replace=D("model: resnet34", "model: resnet34.a9_in1k"), row="teacher", key="student.model", fragments=("unknown pretrained tag 'a9_in1k'", "valid tags")),
    Case("unknown-kd-term", replace=D("ikd: 0.5", "ikdd: 0.5"), row="student", key="kd", fragments=("unknown KD term 'ikdd'", "did you mean 'ikd'?")),
    Case("kd-term-without-teacher", replace=D("teacher: {row: teacher}", "teacher: null"), row="student", key="teacher", fragments=("ikd need a teacher", "set `teacher: {row: ID}`")),
    Case("unknown-recipe", replace=D("recipe: fast", "recipe: fsat"), row="student", key="recipe", fragments=("unknown recipe 'fsat'", "did you mean 'fast'?")),
    Case("bad-interpolation", replace=D("root: {data}", "root: '${oc.env:KDGRID_TEST_UNSET_VAR}'"), row="teacher", key="data.root", fragments=("KDGRID_TEST_UNSET_VAR", "export it, or give a default")),
    # ---- the row graph
    Case("dependency-cycle", replace=D(T_ROW, T_ROW[:-1] + ", init: {row: student}}"), row="teacher", key="teacher.row/init.row", fragments=("dependency cycle", "cannot (indirectly) depend on itself")),
    Case("missing-teacher-row", replace=D("teacher: {row: teacher}", "teacher: {row: teachr}"), row="student", key="teacher.row", fragments=("no row 'teachr' in this grid", "did you mean 'teacher'?")),
    Case("missing-init-row", replace=D(T_ROW, T_ROW[:-1] + ", init: {row: nowhere}}"), row="teacher", key="init.row", fragments=("no row 'nowhere' in this grid",)),
    Case("duplicate-id", replace=D("id: student", "id: teacher"), row="teacher", key="id", fragments=("duplicate id 'teacher'", "ids must be unique")),
    Case("duplicate-label", replace=D("label: S", "label: T"), row="student", key="label", fragments=("duplicate label 'T'", "also row 'teacher'")),
    # ---- datasets
    Case("missing-dataset-root", replace=D("root: {data}", "root: {folder}/no-such-dataset"), row="teacher', 'student", key="data", fragments=("no-such-dataset does not exist", "set `root` to the extracted dataset")),
    Case("malformed-index-file", replace=D("dataset: imagefolder, root: {data}", "dataset: cub, root: {cub_bad_line}"), row="teacher', 'student", key="data", fragments=("images.txt line 3", "fix the line or re-extract")),
    Case("index-lists-missing-image", replace=D("dataset: imagefolder, root: {data}", "dataset: cub, root: {cub_missing_image}"), row="teacher', 'student", key="data", fragments=("images.txt line 2 lists image", "which does not exist", "re-extract")),
    # ---- checkpoint files
    Case("init-file-missing", replace=D(T_ROW, T_ROW[:-1] + ", init: {file: {folder}/nope.pt}}"), row="teacher", key="init.file", fragments=("no checkpoint file at", "fix the path")),
    Case("init-file-corrupt", replace=D(T_ROW, T_ROW[:-1] + ", init: {file: {corrupt}}}"), row="teacher", key="init.file", fragments=("cannot read checkpoint", "corrupt.pt", "save it again")),
    Case("init-file-truncated", replace=D(T_ROW, T_ROW[:-1] + ", init: {file: {truncated}}}"), row="teacher", key="init.file", fragments=("cannot read checkpoint", "truncated.pt", "save it again")),
    Case("init-file-pickled-code", replace=D(T_ROW, T_ROW[:-1] + ", init: {file: {pickled_code}}}"), row="teacher", key="init.file", fragments=("pickled Python objects", "refused", "Re-save only the state dict")),
    Case("teacher-file-corrupt", replace=D("teacher: {row: teacher}", "teacher: {model: resnet34, file: {corrupt}}"), row="student", key="teacher.file", fragments=("cannot read checkpoint", "corrupt.pt")),
    Case("init-file-other-architecture", replace=D(T_ROW, T_ROW.replace("resnet34", "deit_tiny_patch16_224")[:-1] + ", init: {file: {resnet18}}}"), row="teacher", key="init.file", fragments=("does not fit model 'deit_tiny_patch16_224'", "missing keys", "trained for this architecture")),
    Case("teacher-file-other-architecture", replace=D("teacher: {row: teacher}", "teacher: {model: resnet34, file: {deit}}"), row="student", key="teacher.file", fragments=("does not fit model 'resnet34'", "unexpected keys")),
    # ---- command lines
    Case("override-naming-no-key", args=("train.epoch=3",), row="teacher", key="train.epoch", fragments=("did you mean 'train.epochs'?", "+train.epoch=")),
    Case("override-plus-on-existing-key", args=("+train.epochs=3",), row="teacher", key="train.epochs", fragments=("override '+train.epochs=3'", "already exists", "write 'train.epochs=...'", "'++train.epochs=...'")),
    Case("override-malformed", args=("train.epochs=[1,2",), key="override 'train.epochs=[1,2'", fragments=("no viable alternative", "write key=value")),
    Case("override-without-key", args=("=3",), key="override '=3'", fragments=("no key before '='", "write key=value")),
    Case("override-wrong-type", args=("train.epochs=abc",), row="teacher", key="train.epochs", fragments=("must be int, got 'abc'",)),
    Case("cli-time-zero", args=("--time", "0"), names_file=False, key="--time '0'", fragments=("must be between 1 and",)),
    Case("cli-rows-empty", args=("--rows", ""), names_file=False, key="--rows ''", fragments=("empty", "give a value")),
    Case("cli-rows-only-commas", args=("--rows", ",,"), names_file=False, key="--rows ',,'", fragments=("no row name",)),
    Case("cli-max-parallel-negative", args=("--max-parallel", "-3"), names_file=False, key="--max-parallel '-3'", fragments=("must be between 1 and",)),
    Case("cli-array-parallelism-not-a-number", args=("--array-parallelism", "lots"), names_file=False, key="--array-parallelism 'lots'", fragments=("whole number",)),
    Case("cli-json-without-dry-run", args=("--json",), names_file=False, key="--json", fragments=("only with --dry-run",)),
    # ---- tracking stores: checked before anything is created (no outputs/ folder, no database)
    Case("tracking-uri-unknown-scheme", tracking_uri="foo://bar", names_file=False, key="--tracking-uri 'foo://bar'", fragments=("unknown scheme 'foo'", "sqlite:///")),
    Case("tracking-uri-closed-port", tracking_uri=f"http://127.0.0.1:{CLOSED_PORT}", names_file=False, key="--tracking-uri", fragments=("cannot reach 127.0.0.1", "launch/server.py start")),
    Case("tracking-uri-missing-folder", tracking_uri="sqlite:////proc/no-such-folder/mlflow.db", names_file=False, key="--tracking-uri", fragments=("folder /proc/no-such-folder does not exist",)),
    Case("tracking-uri-not-sqlite", tracking_uri="sqlite:///{corrupt}", names_file=False, key="--tracking-uri", fragments=("is not a SQLite database",)),
    Case("tracking-uri-in-grid", replace=D("experiment: kd-{name}", "experiment: kd-{name}\ntracking_uri: 'htp://host:5000'"), tracking_uri="", names_file=False, key="tracking_uri 'htp://host:5000'", fragments=("unknown scheme 'htp'",)),
    Case("output-dir-under-a-file", replace=D("output_dir: outputs", "output_dir: {corrupt}/outputs"), key="output_dir", fragments=("is not a writable folder",)),
    Case("rows-unknown", args=("--rows", "teachr"), key="--rows", fragments=("no row with id or label 'teachr'", "did you mean 'teacher'?")),
    Case("rows-unfinished-dependency", args=("--rows", "student"), row="student", key="depends on row 'teacher'", fragments=("has never run", "add it with --rows student,teacher")),
    # ---- SLURM fields (against the dev cluster's sinfo)
    Case("slurm-unknown-partition", args=("--partition", "gpuu"), slurm=True, row="teacher", key="resources.partition", fragments=("no partition 'gpuu'", "did you mean 'gpu'?", "sinfo lists")),
    Case("slurm-gpus-on-cpu-partition", replace=D("gpus_per_node: 0", "gpus_per_node: 1, partition: debug"), slurm=True, row="teacher", key="resources.gpus_per_node", fragments=("has no GPUs", "set resources.gpus_per_node=0")),
    Case("slurm-metachar-partition", replace=D("gpus_per_node: 0", "gpus_per_node: 0, partition: 'gpu;touch pwned'"), slurm=True, row="teacher", key="resources.partition", fragments=("characters SLURM does not accept", "only")),
    Case("slurm-metachar-account", args=("--account", "lab$(touch pwned)"), slurm=True, row="teacher", key="resources.account", fragments=("characters SLURM does not accept", "only")),
    Case("slurm-metachar-qos", replace=D("gpus_per_node: 0", "gpus_per_node: 0, qos: 'normal`touch pwned`'"), slurm=True, row="teacher", key="resources.qos", fragments=("characters SLURM does not accept", "only")),
    Case("slurm-metachar-sbatch-extra", replace=D("gpus_per_node: 0", "gpus_per_node: 0, sbatch_extra: {comment: 'a\nb --wrap=touch pwned'}"), slurm=True, row="teacher", key="resources.sbatch_extra.comment", fragments=("unsafe value",)),
    Case("slurm-reserved-sbatch-flag", replace=D("gpus_per_node: 0", "gpus_per_node: 0, sbatch_extra: {wrap: 'touch pwned'}"), slurm=True, row="teacher", key="resources.sbatch_extra.wrap", fragments=("not an sbatch flag this launcher lets a grid set",)),
]  # fmt: skip
SLURM_CASES = [c for c in CASES if c.slurm]
LOCAL_CASES = [c for c in CASES if not c.slurm]


# ---------------------------------------------------------------------------------------------
# Inputs and running


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    import timm

    folder = tmp_path_factory.mktemp("inputs")
    data = generate_dataset("imagefolder", folder / "data", num_classes=2, image_size=16)
    cub_bad = Path(generate_dataset("cub", folder / "cub-bad", num_classes=2, image_size=16).root)
    lines = (cub_bad / "images.txt").read_text().splitlines()
    lines[2] = "three images/missing-its-id.jpg"  # line 3: the id is not a number
    (cub_bad / "images.txt").write_text("\n".join(lines) + "\n")
    cub_gone = Path(generate_dataset("cub", folder / "cub-gone", num_classes=2, image_size=16).root)
    second = (cub_gone / "images.txt").read_text().splitlines()[1].split(maxsplit=1)[1]
    (cub_gone / "images" / second).unlink()  # listed on line 2, gone from the disk
    resnet18 = folder / "resnet18.pt"
    torch.save({"model": timm.create_model("resnet18", num_classes=10).state_dict()}, resnet18)
    deit = folder / "deit.pt"
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    torch.save({"model": model.state_dict()}, deit)
    corrupt = folder / "corrupt.pt"
    corrupt.write_bytes(secrets.token_bytes(4096))
    truncated = folder / "truncated.pt"
    truncated.write_bytes(resnet18.read_bytes()[: resnet18.stat().st_size // 2])
    pickled_code = folder / "pickled_code.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Path("/")}, pickled_code)
    return Inputs(
        folder=folder,
        data=Path(data.root),
        cub_bad_line=cub_bad,
        cub_missing_image=cub_gone,
        resnet18=resnet18,
        deit=deit,
        corrupt=corrupt,
        truncated=truncated,
        pickled_code=pickled_code,
    )


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: relative path -> (size, mtime in ns)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(folder))] = (
            info.st_size if path.is_file() else 0,
            info.st_mtime_ns,
        )
    return out


def slurm_jobs(job_name: str) -> list[str]:
    """Jobs of this name queued, running, or recorded by accounting."""
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=False
    ).stdout
    jobs = [line.split()[0] for line in queued.splitlines() if line.split()[-1:] == [job_name]]
    recorded = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID", "--name", job_name, "-S", "now-1hours"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sorted(set(jobs) | {line.strip() for line in recorded.splitlines() if line.strip()})


def grid_text(case: Case, inputs: Inputs, name: str) -> str:
    text = BASE if case.text is None else case.text
    for old, new in case.replace:
        assert text.count(old) == 1, (case.id, old)
        text = text.replace(old, new)
    values = {
        "name": name,
        "data": inputs.data,
        "folder": inputs.folder,
        "cub_bad_line": inputs.cub_bad_line,
        "cub_missing_image": inputs.cub_missing_image,
        "resnet18": inputs.resnet18,
        "deit": inputs.deit,
        "corrupt": inputs.corrupt,
        "truncated": inputs.truncated,
        "pickled_code": inputs.pickled_code,
    }
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


# The command line runs in a fresh process per case: either `python launch/grid.py ...` itself,
# or, for the whole catalogue, the same script run as `__main__` in a child forked from one
# Python process that imported torch, timm and the project once (the import is ~4 s of CPU per
# process here; the catalogue's checks themselves take a fraction of a second each). The child
# is the real script from its first line: its own argv, working directory, stdout, stderr and
# exit status; an exception escaping it prints its traceback, as the interpreter would.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
sys.path.insert(0, sys.argv[1])
import hydra.core.override_parser.overrides_parser, kd.grid, kd.models, kd.plan, kd.tracking
import slurm.launcher, slurm.submit, timm, torch
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = job["argv"]
            try:
                runpy.run_path(job["argv"][0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                if isinstance(exc.code, int) or exc.code is None:
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    return env


class ForkServer:
    def __init__(self, logs: Path):
        self.logs = logs
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER, str(REPO)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=cli_env(),
            text=True,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], cwd: Path, tag: str) -> tuple[int, str, str]:
        out, err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
        job = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        status = json.loads(self.process.stdout.readline())["status"]
        return status, out.read_text(), err.read_text()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory):
    server = ForkServer(tmp_path_factory.mktemp("cli-logs"))
    yield server
    server.close()


def run_case(case: Case, inputs: Inputs, workdir: Path, server: ForkServer | None) -> Outcome:
    """`launch/grid.py` on the case's grid in `workdir`, through `server` or as `python ...`."""
    name = f"bad-{case.id}-{secrets.token_hex(3)}"
    grid = workdir / case.grid_name
    if case.data is not None:
        grid.write_bytes(case.data)
    elif case.create_grid:
        grid.write_text(grid_text(case, inputs, name))
    executor = "slurm" if case.slurm else "local"
    uri = f"sqlite:///{workdir}/mlflow.db" if case.tracking_uri is None else case.tracking_uri
    uri = uri.replace("{corrupt}", str(inputs.corrupt))
    argv = [str(REPO / "launch" / "grid.py"), str(grid), *case.args, "--executor", executor,
            *(["--tracking-uri", uri] if uri else [])]  # fmt: skip
    before = tree(workdir)
    if server is not None:
        status, stdout, stderr = server.run(argv, workdir, case.id)
    else:
        done = subprocess.run(
            [sys.executable, *argv], cwd=workdir, env=cli_env(), capture_output=True, text=True,
            timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    jobs = slurm_jobs(f"kd-{name}") if case.slurm else []
    return Outcome(status, stdout, stderr, grid, before, tree(workdir), jobs)


@pytest.fixture(scope="module")
def untouched_inputs(inputs: Inputs):
    """The shared dataset copies and checkpoints are read, never written."""
    before = tree(inputs.folder)
    yield inputs
    assert tree(inputs.folder) == before, "a case changed the shared inputs"


# ---------------------------------------------------------------------------------------------
# The checks every case passes


def check(case: Case, outcome: Outcome) -> None:
    output = outcome.stdout + outcome.stderr
    assert outcome.status == 2, f"{case.id}: exit {outcome.status}\n{output}"
    assert "Traceback" not in output, output
    for fragment in case.absent:
        assert fragment not in outcome.stderr, outcome.stderr
    # The line of the problem: the file, then the row and the key, then what is wrong and what
    # to do. Other problems may be listed beside it (all are reported at once).
    wanted = [str(outcome.grid)] if case.names_file else []
    if case.row is not None:
        wanted.append(f"'{case.row}'")
    if case.key is not None:
        wanted.append(case.key)
    wanted += case.fragments
    lines = [line for line in outcome.stderr.splitlines() if all(w in line for w in wanted)]
    assert lines, f"{case.id}: no line of stderr holds all of {wanted}:\n{outcome.stderr}"
    line = lines[0]
    at = 0
    for part in wanted[:3] if case.names_file else ():  # file, then row, then key
        at = line.index(part, at)
    # Nothing was created or touched: no MLflow store (so no run), no output folder, no lock.
    assert outcome.after == outcome.before, (
        f"{case.id}: files changed: {sorted(set(outcome.after) ^ set(outcome.before))}"
    )


def test_catalogue_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c.id for c in LOCAL_CASES])
def test_bad_input_exits_2_and_says_where_and_what_to_do(
    case: Case, untouched_inputs: Inputs, fork_server: ForkServer, tmp_path: Path
):
    check(case, run_case(case, untouched_inputs, tmp_path, fork_server))


@pytest.mark.slurm
@pytest.mark.parametrize("case", SLURM_CASES, ids=[c.id for c in SLURM_CASES])
def test_bad_slurm_fields_exit_2_and_submit_nothing(
    case: Case, untouched_inputs: Inputs, fork_server: ForkServer, tmp_path: Path
):
    require_slurm()  # SLURM cases run wherever SLURM does, and always in CI
    outcome = run_case(case, untouched_inputs, tmp_path, fork_server)
    check(case, outcome)
    assert outcome.jobs == [], f"{case.id}: jobs were submitted: {outcome.jobs}"


# A few cases once more as plain `python launch/grid.py ...` processes: the catalogue's way of
# running the script must not be what makes it pass.
PLAIN = [
    "yaml-syntax",
    "init-file-other-architecture",
    "rows-unfinished-dependency",
    "grid-not-utf8",
    "grid-deeply-nested",
    "cli-rows-empty",
    "tracking-uri-unknown-scheme",
    "tracking-uri-closed-port",
]


@pytest.mark.parametrize("case_id", PLAIN)
def test_plain_process(case_id: str, untouched_inputs: Inputs, tmp_path: Path):
    case = next(c for c in CASES if c.id == case_id)
    check(case, run_case(case, untouched_inputs, tmp_path, None))


@pytest.mark.slurm
def test_plain_process_slurm(untouched_inputs: Inputs, tmp_path: Path):
    require_slurm()  # SLURM cases run wherever SLURM does, and always in CI
    case = next(c for c in CASES if c.id == "slurm-metachar-partition")
    outcome = run_case(case, untouched_inputs, tmp_path, None)
    check(case, outcome)
    assert outcome.jobs == []
