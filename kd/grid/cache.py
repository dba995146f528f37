"""Loaded grids kept on disk for the commands that only read them (`status`, `table`).

Expanding, checking and keying a 10,000-row grid takes ~1.5 s, every time `launch/status.py`
runs; reading the same `Grid` back from a pickle takes ~0.2 s. The pickle is found by a hash of
everything the load depends on: the grid file's bytes and path, the overrides, `--smoke`,
`--seeds`, the folder the command runs in, the environment variables the grid's `${oc.env:...}`
interpolations read (the whole environment when they cannot be told apart), the Python, PyYAML
and OmegaConf versions, and the source of the `kd` package. Change any of them and the grid is
loaded again. A load that fails is never cached: its problems are reported every time.

Only grids of at least `CACHE_MIN_ROWS` rows are kept: a paper grid loads in milliseconds. What
the cache does not see: the files whose existence a load checks (dataset roots, `init.file`):
a grid read from the cache is shown even if one of them has gone since. The launcher never
reads the cache; it always loads and checks the grid in full. `KDGRID_GRID_CACHE=0` turns the
cache off; `KDGRID_CACHE_DIR` moves it (default `$XDG_CACHE_HOME/kdgrid` or `~/.cache/kdgrid`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd.grid.load import gc_paused, load_grid
from kd.grid.rows import Grid

CACHE_MIN_ROWS = 1000
KEEP_FILES = 16  # the newest cached grids kept; older ones are removed when one is written
_ENV_NAME = re.compile(r"oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)\s*[,}]")


def load_grid_cached(path: str | Path, overrides: Sequence[str] = (), **options: Any) -> Grid:
    """`load_grid(path, overrides, **options)`, read from the cache when that load was made
    before with the same inputs; a new load of a large grid is written to it."""
    if os.environ.get("KDGRID_GRID_CACHE", "1") == "0":
        return load_grid(path, overrides, **options)
    try:
        text = Path(path).read_bytes()
    except OSError:
        return load_grid(path, overrides, **options)  # reports the missing file itself
    file = cache_folder() / f"{cache_key(path, text, overrides, options)}.pickle"
    grid = _read(file)
    if grid is None:
        grid = load_grid(path, overrides, **options)
        if len(grid.rows) >= CACHE_MIN_ROWS:
            _write(file, grid)
    return grid


def keep_for_readers(
    grid: Grid, path: str | Path, overrides: Sequence[str], **options: Any
) -> None:
    """Write `grid` (loaded and fully checked by a launch) where `status`/`table` will look for
    it with these overrides and options (read as they read: `check_data` and `check_models`
    off). The checks only add problems, they never change a row, so the grid is the one those
    commands would load; their first call after a launch is then as fast as the next ones."""
    if os.environ.get("KDGRID_GRID_CACHE", "1") == "0" or len(grid.rows) < CACHE_MIN_ROWS:
        return
    try:
        text = Path(path).read_bytes()
    except OSError:
        return
    read_options = {**options, "check_data": False, "check_models": False}
    _write(cache_folder() / f"{cache_key(path, text, overrides, read_options)}.pickle", grid)


def cache_folder() -> Path:
    from kd.models.name_cache import cache_dir  # kdgrid's cache folder (no torch imported)

    return cache_dir() / "grids"


def cache_key(path: str | Path, text: bytes, overrides: Sequence[str], options: dict) -> str:
    """A hash of every input the loaded grid depends on (module docstring)."""
    import omegaconf
    import yaml

    digest = hashlib.sha256()
    source = text.decode("utf-8", "replace") + "\n".join(overrides)
    for part in (
        str(Path(path).resolve()),
        os.getcwd(),
        repr(tuple(overrides)),
        repr(sorted(options.items())),
        sys.version,
        yaml.__version__,
        omegaconf.__version__,
        repr(_environment_read(source)),
        _kd_source_hash(),
    ):
        digest.update(part.encode() + b"\0")
    digest.update(text)
    return digest.hexdigest()[:40]


def _environment_read(source: str) -> list[tuple[str, str | None]]:
    """The environment variables the grid's interpolations can read: those named in
    `${oc.env:NAME}`, or all of them when an `oc.env` name is not spelled out."""
    if "oc.env" not in source:
        return []
    names = set(_ENV_NAME.findall(source))
    if source.count("oc.env") != len(_ENV_NAME.findall(source)):
        names = set(os.environ)  # a computed name: any variable may matter
    return [(name, os.environ.get(name)) for name in sorted(names)]


@functools.cache
def _kd_source_hash() -> str:
    """The `kd` package's source: any change to how grids load gives new keys."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _read(file: Path) -> Grid | None:
    """The cached grid, or None (missing, unreadable, or not a grid: then it is loaded anew)."""
    try:
        with open(file, "rb") as handle, gc_paused():
            grid = pickle.load(handle)
    except FileNotFoundError:
        return None
    except Exception:  # a truncated or stale file: loaded anew, and overwritten
        return None
    return grid if isinstance(grid, Grid) else None


def _write(file: Path, grid: Grid) -> None:
    """Atomically (a reader sees the old file or the new one), and never an error: a cache
    that cannot be written only costs time."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".tmp", delete=False) as tmp:
            pickle.dump(grid, tmp, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp.name, file)
        _prune(file.parent)
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(tmp.name)


def _prune(folder: Path) -> None:
    files = sorted(folder.glob("*.pickle"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[KEEP_FILES:]:
        with contextlib.suppress(OSError):
            old.unlink()
