"""What a row's run records about the row and where it came from: its tags (commit, host, the
launcher), its resolved config as flat params, and the row as YAML, secrets redacted."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd import config as C
from kd.processes import process_identity
from kd.tracking.records import TAG
from kd.tracking.redaction import redact, secret_values

if TYPE_CHECKING:
    from kd.grid import Row

PARAM_MAX_CHARS = 6000


@functools.cache
def project_commit() -> str:
    """The kdgrid git commit the row ran with ('unknown' outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_tags() -> dict[str, str]:
    """What code this process runs (its launch's snapshot, or the checkout): the commit, the
    content hash `status`/`table` compare with the checkout, and whether it had uncommitted
    changes (the diff itself is an artifact, `RowRun.log_code_diff`)."""
    from kd.codesnap import running_code

    code = running_code()
    dirty = "unknown" if code.dirty is None else str(code.dirty).lower()
    return {
        f"{TAG}.commit": code.commit,
        f"{TAG}.code_hash": code.hash,
        f"{TAG}.code_dirty": dirty,
        f"{TAG}.code_dir": str(code.root),  # where it was imported from: a snapshot, a checkout
        "mlflow.source.git.commit": code.commit,
    }


def launcher_identity() -> dict[str, str]:
    """`kdgrid.launcher_started`: tells this launcher from a later process with its pid."""
    identity = _process_identity_once(os.getpid())
    return {f"{TAG}.launcher_started": identity} if identity else {}


@functools.cache
def _process_identity_once(pid: int) -> str | None:
    """This process's identity, read from /proc once, not once per row of a 1000-row grid
    (keyed by pid: a forked child reads its own)."""
    return process_identity(pid)


def row_tags(row: Row, executor: str, parent_run_id: str | None) -> dict[str, str]:
    """The tags of a row's run: what it is (grid, id, label, content key), which commit, and
    which launcher on which host scheduled it."""
    tags = {
        f"{TAG}.grid": row.grid,
        f"{TAG}.grid_file": row.grid_file,
        f"{TAG}.id": row.id,
        f"{TAG}.label": row.label,
        f"{TAG}.key": row.key,
        **code_tags(),
        f"{TAG}.executor": executor,
        f"{TAG}.launch_host": socket.gethostname(),
        f"{TAG}.launcher_pid": str(os.getpid()),
        **launcher_identity(),
        f"{TAG}.smoke": str(row.smoke).lower(),
        # where the row writes: rows that read its checkpoint find it here (kd.plan)
        f"{TAG}.output_dir": str(_resolved(os.getcwd(), row.config.output_dir) / row.id),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


@functools.lru_cache(maxsize=64)
def _resolved(cwd: str, output_dir: str) -> Path:
    """A grid's output folder made absolute once, not once per row (`Path.resolve` of 10,000
    row folders took ~0.7 s of a launch); `cwd` is part of the key, as a relative folder
    depends on it."""
    return Path(cwd, output_dir).resolve()


def row_params(
    row: Row, *, tree: dict[str, Any] | None = None, secrets: list[str] | None = None
) -> dict[str, str]:
    """The resolved row config as flat dotted params, the same keys in every row.

    Every registered KD term appears (weight 0 when unused) and an absent teacher is spelled
    out with null fields, so MLflow's compare view lines rows up key by key. `tree` (the
    config as `C.to_dict` gives it) and `secrets` spare a many-row caller recomputing them.
    """
    from kd.losses import TERMS  # torch: only when params are written

    tree = dict(C.to_dict(row.config) if tree is None else tree)  # top-level keys replaced below
    tree["kd"] = {name: float(row.config.kd.get(name, 0.0)) for name in TERMS}
    if tree["teacher"] is None:
        tree["teacher"] = C.to_dict(C.TeacherConfig())
    flat = C.flatten(tree)
    flat["key"] = row.key
    flat["smoke"] = row.smoke
    secrets = secret_values() if secrets is None else secrets
    return {
        k: redact("" if v is None else str(v), secrets)[:PARAM_MAX_CHARS]
        for k, v in sorted(flat.items())
    }


def row_yaml(row: Row) -> str:
    """The resolved row (`row.to_dict()`) as YAML, secrets redacted: the run's `row.yaml`,
    which reads back into the same row (libyaml's emitter when PyYAML has it)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return redact(yaml.dump(row.to_dict(), Dumper=dumper, sort_keys=False), secret_values())
