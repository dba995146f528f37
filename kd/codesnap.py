"""The project's code as a launch submits it: one content-addressed snapshot per launch.

A job runs whatever code its interpreter imports when it starts. A student held behind its
teacher for hours would otherwise run the checkout as edited since, tagged with the launcher's
commit. So a launch copies the code its jobs import (the `kd`, `slurm` and `launch` packages and
pyproject.toml: the files `git ls-files -co --exclude-standard` lists there, committed or not,
never outputs, data or mlflow.db) once, into `<output_dir>/code/<hash>/`, and its jobs and their
requeues import from that copy. Identical code has the same hash and reuses the folder.

Not submitit's `helpers.RsyncSnapshot`: it copies only committed files (uncommitted changes, the
common case while iterating, would silently not be what runs), clones the git history into
every snapshot, is keyed by the caller's folder rather than the content, and `chdir`s the whole
launcher process into the snapshot (relative output folders, data roots and the SQLite store of
a grid would then resolve inside it). This module needs no rsync and no torch.

Each snapshot holds `CODE.json` (hash, commit, dirty flag, files) and `uncommitted.diff`; a job
reads them to tag its run (`kd.tracking.code_tags`), and `status`/`table` compare a finished
run's hash with the current checkout's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kd.config import first_of

PACKAGES = ("kd", "slurm", "launch")
EXTRA_FILES = ("pyproject.toml",)
CODE_DIR = "code"  # under a grid's output folder
MANIFEST = "CODE.json"
DIFF = "uncommitted.diff"
_SKIP_PARTS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class CodeInfo:
    """Which code: its content hash, the git commit it came from and its uncommitted changes."""

    root: Path
    hash: str  # of the files' paths and contents (not of the commit)
    commit: str  # "unknown" outside a git checkout
    dirty: bool | None  # uncommitted changes in the files; None when unknown (no git)
    files: tuple[str, ...]
    diff: str  # `git diff HEAD` of the files, untracked ones included

    def describe(self) -> str:
        state = {True: " with uncommitted changes", False: "", None: ""}[self.dirty]
        return f"code {self.hash} (commit {self.commit[:12]}{state})"


def project_root() -> Path:
    """The folder holding this process's `kd` package: a checkout, or a snapshot."""
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode in ok else None


def _wanted(path: str) -> bool:
    parts = Path(path).parts
    return not (_SKIP_PARTS & set(parts)) and not path.endswith(_SKIP_SUFFIXES)


def code_files(root: Path) -> tuple[list[str], bool]:
    """The project's code files under `root` (relative, sorted) and whether git listed them."""
    listed = _git(
        root, "ls-files", "-co", "--exclude-standard", "-z", "--", *PACKAGES, *EXTRA_FILES
    )
    if listed is not None and listed:
        names = {n for n in listed.split("\0") if n and _wanted(n) and (root / n).is_file()}
        return sorted(names), True
    names = {n for n in EXTRA_FILES if (root / n).is_file()}
    for package in PACKAGES:
        for path in (root / package).rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and _wanted(rel):
                names.add(rel)
    return sorted(names), False


def content_hash(root: Path, files: list[str] | tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()[:16]


def _diff(root: Path, files: list[str]) -> str:
    """Uncommitted changes of `files` against HEAD: tracked edits, and untracked files whole."""
    tracked = _git(root, "diff", "HEAD", "--binary", "--", *PACKAGES, *EXTRA_FILES) or ""
    untracked = _git(root, "ls-files", "-o", "--exclude-standard", "-z", "--", *PACKAGES) or ""
    parts = [tracked]
    for name in sorted(n for n in untracked.split("\0") if n in set(files)):
        parts.append(
            _git(root, "diff", "--no-index", "--binary", "--", "/dev/null", name, ok=(0, 1)) or ""
        )
    return "".join(parts)


def read_code(root: Path | None = None) -> CodeInfo:
    """The code of a checkout (or snapshot) as it is on disk now."""
    root = (root or project_root()).resolve()
    manifest = root / MANIFEST
    if manifest.is_file():
        return _from_manifest(root)
    files, from_git = code_files(root)
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() if from_git else ""
    diff = _diff(root, files) if commit else ""
    return CodeInfo(
        root=root,
        hash=content_hash(root, files),
        commit=commit or "unknown",
        dirty=bool(diff) if commit else None,
        files=tuple(files),
        diff=diff,
    )


def _from_manifest(root: Path) -> CodeInfo:
    data = json.loads((root / MANIFEST).read_text())
    diff_path = root / DIFF
    return CodeInfo(
        root=root,
        hash=data["hash"],
        commit=data["commit"],
        dirty=data["dirty"],
        files=tuple(data["files"]),
        diff=diff_path.read_text() if diff_path.is_file() else "",
    )


@functools.cache
def running_code() -> CodeInfo:
    """The code this process runs (read once): its snapshot's manifest, or its checkout."""
    return read_code(project_root())


def snapshot(output_dir: Path, root: Path | None = None) -> CodeInfo:
    """Copy the code of `root` (default: this process's checkout) into
    `output_dir/code/<hash>/`, once: a folder with that hash is reused as it is. The copy is
    made in a temporary folder and renamed into place, so a folder that exists is whole."""
    code = read_code(root)
    parent = Path(output_dir).resolve() / CODE_DIR
    final = parent / code.hash
    if (final / MANIFEST).is_file():
        return _from_manifest(final)
    tmp = parent / f".tmp-{code.hash}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in code.files:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(code.root / name, target)
        target.chmod(0o444)  # a snapshot is read, never edited
    if content_hash(tmp, code.files) != code.hash:  # a file changed while it was copied
        shutil.rmtree(tmp, ignore_errors=True)
        return snapshot(output_dir, root)
    (tmp / DIFF).write_text(code.diff)
    manifest = {"hash": code.hash, "commit": code.commit, "dirty": code.dirty}
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": list(code.files)}, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:  # another launch made the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
    return _from_manifest(final)


def code_note(tags: dict[str, str] | None, current: CodeInfo, tag_prefix: str) -> str | None:
    """Why a finished run was trained by other code than `current`, or None when it was not
    (or the run predates code hashes)."""
    tags = tags or {}
    trained = tags.get(f"{tag_prefix}.code_hash")
    if not trained or trained == current.hash:
        return None
    commit = tags.get(f"{tag_prefix}.commit", "unknown")[:12]
    dirty = ", uncommitted changes" if tags.get(f"{tag_prefix}.code_dirty") == "true" else ""
    return f"trained by code {trained} (commit {commit}{dirty}), not this checkout's {current.hash}"


def other_code_lines(notes: Sequence[tuple[str, str]], limit: int = 10) -> list[str]:
    """(row name, `code_note`) pairs -> one line per code the rows were trained by, with its
    row count and the first `limit` rows: a relaunch after an edit notes once, not per row."""
    by_note: dict[str, list[str]] = {}
    for name, note in notes:
        by_note.setdefault(note, []).append(name)
    return [
        f"{len(names)} finished row(s) {note}: {first_of(names, limit)}"
        for note, names in by_note.items()
    ]
