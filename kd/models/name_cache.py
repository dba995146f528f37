"""The names timm knows, cached on disk per installed timm, so that checking a grid's model
names (`launch/grid.py --dry-run`) needs no `import timm` (which imports torch and torchvision:
~2-5 s) after the first time.

The cache file is keyed by where timm is installed, its version and the modification time of its
package: another timm (an upgrade, another virtual environment) reads or writes another file.
`KDGRID_CACHE_DIR` moves the folder (default `$XDG_CACHE_HOME/kdgrid`, else `~/.cache/kdgrid`);
deleting it is always safe. An unreadable cache is ignored, a cache that cannot be written is
skipped: names are then listed by timm, as without a cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

FORMAT = 1


def cache_dir() -> Path:
    if os.environ.get("KDGRID_CACHE_DIR"):
        return Path(os.environ["KDGRID_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdgrid"


def cache_file() -> Path | None:
    """This timm's cache file (None when timm is not installed), found without importing timm."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    version_file = package / "version.py"
    version = version_file.read_text() if version_file.is_file() else ""
    stamp = f"{package}|{version}|{os.stat(package / '__init__.py').st_mtime_ns}|{FORMAT}"
    return cache_dir() / f"timm-names-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.json"


def read_names() -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]] | None:
    """(architectures, architecture -> pretrained tags) from the cache, or None."""
    try:
        path = cache_file()
        if path is None or not path.is_file():
            return None
        data = json.loads(path.read_text())
        return tuple(data["models"]), {a: tuple(t) for a, t in data["tags"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_names(models: tuple[str, ...], tags: dict[str, tuple[str, ...]]) -> None:
    """Write the cache atomically (a concurrent reader sees the old file or the new one)."""
    try:
        path = cache_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".timm-names-")
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {"models": list(models), "tags": {a: list(t) for a, t in tags.items()}}, handle
            )
        os.replace(tmp, path)
    except OSError:
        return
