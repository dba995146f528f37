"""kd.codesnap: the code a launch snapshots (committed and uncommitted, nothing else), its
content-addressed folder, the manifest and diff jobs tag their runs with, and the note status
and table print; and `code_version`, which joins the content key only when set."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from codecopy import GIT_ID

from kd.codesnap import CODE_DIR, DIFF, MANIFEST, code_note, read_code, snapshot


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_ID, "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small checkout: the three packages, pyproject.toml, and what must never be copied."""
    root = tmp_path / "checkout"
    files = {
        "kd/__init__.py": "",
        "kd/train/runner.py": "VALUE = 1\n",
        "slurm/job.py": "JOB = 1\n",
        "launch/grid.py": "print('grid')\n",
        "pyproject.toml": "[project]\nname = 'x'\n",
        "README.md": "docs are not code\n",
        ".gitignore": "outputs/\nmlflow.db\n*.log\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "first")
    (root / "outputs" / "g").mkdir(parents=True)
    (root / "outputs" / "g" / "best.pt").write_text("weights")
    (root / "mlflow.db").write_text("db")
    (root / "kd" / "debug.log").write_text("ignored by .gitignore")
    return root


def test_a_clean_checkout_is_copied_with_its_commit(project: Path, tmp_path: Path) -> None:
    code = snapshot(tmp_path / "out", project)
    assert code.root == (tmp_path / "out" / CODE_DIR / code.hash).resolve()
    assert sorted(code.files) == [
        "kd/__init__.py",
        "kd/train/runner.py",
        "launch/grid.py",
        "pyproject.toml",
        "slurm/job.py",
    ]
    assert (code.root / "kd" / "train" / "runner.py").read_text() == "VALUE = 1\n"
    head = subprocess.run(
        ["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    manifest = json.loads((code.root / MANIFEST).read_text())
    assert (manifest["commit"], manifest["dirty"], manifest["hash"]) == (head, False, code.hash)
    assert (code.root / DIFF).read_text() == ""
    for absent in ("outputs", "mlflow.db", "kd/debug.log", "README.md", ".git"):
        assert not (code.root / absent).exists(), absent


def test_uncommitted_changes_are_in_the_snapshot_and_its_diff(
    project: Path, tmp_path: Path
) -> None:
    (project / "kd" / "train" / "runner.py").write_text("VALUE = 2\n")  # edited, not committed
    (project / "kd" / "new.py").write_text("NEW = 1\n")  # untracked, not ignored
    code = snapshot(tmp_path / "out", project)
    assert (code.root / "kd" / "train" / "runner.py").read_text() == "VALUE = 2\n"
    assert (code.root / "kd" / "new.py").read_text() == "NEW = 1\n"
    assert code.dirty is True
    diff = (code.root / DIFF).read_text()
    assert "-VALUE = 1\n+VALUE = 2" in diff and "+NEW = 1" in diff, diff
    assert read_code(code.root).dirty is True  # a job reads the manifest, not git


def test_identical_code_reuses_its_folder_and_other_code_gets_its_own(
    project: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = snapshot(out, project)
    again = snapshot(out, project)
    assert again.root == first.root and again.hash == first.hash
    (project / "slurm" / "job.py").write_text("JOB = 2\n")
    edited = snapshot(out, project)
    assert edited.hash != first.hash
    assert sorted(p.name for p in (out / CODE_DIR).iterdir()) == sorted([first.hash, edited.hash])
    assert (first.root / "slurm" / "job.py").read_text() == "JOB = 1\n"  # the old one untouched


def test_code_outside_git_is_still_snapshotted(tmp_path: Path) -> None:
    root = tmp_path / "installed"
    (root / "kd").mkdir(parents=True)
    (root / "kd" / "__init__.py").write_text("")
    (root / "kd" / "__pycache__").mkdir()
    (root / "kd" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    code = snapshot(tmp_path / "out", root)
    assert code.files == ("kd/__init__.py",)
    assert (code.commit, code.dirty) == ("unknown", None)


def test_note_for_rows_trained_by_other_code(project: Path) -> None:
    current = read_code(project)
    assert code_note({"kdgrid.code_hash": current.hash}, current, "kdgrid") is None
    assert code_note({}, current, "kdgrid") is None  # runs from before code hashes
    tags = {
        "kdgrid.code_hash": "0123",
        "kdgrid.commit": "abcdef0123456789",
        "kdgrid.code_dirty": "true",
    }
    note = code_note(tags, current, "kdgrid")
    assert note == (
        f"trained by code 0123 (commit abcdef012345, uncommitted changes), "
        f"not this checkout's {current.hash}"
    )


def test_rows_trained_by_other_code_are_noted_once_per_code() -> None:
    from kd.codesnap import other_code_lines

    old, older = "trained by code A (commit a), not B's", "trained by code C (commit c), not B's"
    notes = [(f"r{i}", old) for i in range(12)] + [("t (T)", older)]
    assert other_code_lines(notes) == [
        f"12 finished row(s) {old}: r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, ... (+2 more)",
        f"1 finished row(s) {older}: t (T)",
    ]
    assert other_code_lines([]) == []


def _keys(tmp_path: Path, extra: str = "") -> dict[str, str]:
    from kd.grid import load_grid

    path = tmp_path / "g.yaml"
    path.write_text(
        extra
        + """
defaults:
  student: {model: resnet18}
  init: scratch
  data: {dataset: imagefolder, root: /nonexistent}
rows:
  - {id: teacher, label: T}
  - {id: student, label: S, teacher: {row: teacher}, kd: {ce: 0.5, ikd: 0.5}}
"""
    )
    grid = load_grid(path, check_data=False)
    return {row.id: row.key for row in grid.rows}


def test_code_version_joins_the_content_key_only_when_set(tmp_path: Path) -> None:
    plain = _keys(tmp_path)
    v1 = _keys(tmp_path, "code_version: '1'\n")
    v1_number = _keys(tmp_path, "code_version: 1\n")
    v2 = _keys(tmp_path, "code_version: '2'\n")
    assert v1 == v1_number
    for row in ("teacher", "student"):  # a student's key holds its teacher's
        assert len({plain[row], v1[row], v2[row]}) == 3, row


def test_a_code_version_that_is_not_a_string_is_bad_input(tmp_path: Path) -> None:
    from kd.grid import GridError

    with pytest.raises(GridError, match=r"code_version: must be a string"):
        _keys(tmp_path, "code_version: [1, 2]\n")
