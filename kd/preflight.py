"""Pretrained weights a launch needs, checked before anything is submitted.

Every `init: pretrained` student and every teacher given by a timm name (`teacher: {model:
NAME}`) loads timm's pretrained weights when its job starts, on a compute node that often has
no network. So the launcher checks each such tag first: in the Hugging Face cache (jobs then run
with the hub offline, `HF_HUB_OFFLINE=1`), or downloadable from here; `--prefetch` downloads
what is missing once. A weight that is neither is a bad-input error naming the row and the tag.
`--smoke` rows are built from scratch and need none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kd.grid import Row

TIMEOUT_ENV = "KDGRID_HUB_TIMEOUT_S"  # seconds a "can it be downloaded" request may take
DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Need:
    """One row's use of a pretrained tag."""

    row: Row
    role: str  # "init" (the student) or "teacher"
    name: str  # timm name with its tag, as the job builds it

    def where(self) -> str:
        return f"{self.row.grid_file}: row '{self.row.id}' ({self.row.label}): {self.role}"


@dataclass
class WeightsCheck:
    """What the check found: errors (exit 2), notes, and whether every weight is cached."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    all_cached: bool = True
    names: list[str] = field(default_factory=list)  # the distinct tags checked


def pretrained_needs(rows: Iterable[Row]) -> list[Need]:
    """The pretrained tags the rows' jobs load from timm (as kd.train.build resolves them)."""
    needs = []
    for row in rows:
        cfg = row.config
        if cfg.init.source == "pretrained":
            arch, _, tag = cfg.student.model.partition(".")  # as kd.models.split_tag
            tag = tag or cfg.init.tag
            needs.append(Need(row, "init", f"{arch}.{tag}" if tag else arch))
        teacher = cfg.teacher
        by_name = teacher is not None and teacher.model and not teacher.row and not teacher.file
        if by_name and teacher.pretrained:
            needs.append(Need(row, "teacher", teacher.model))
    return needs


def _timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def check_weights(rows: Sequence[Row], *, prefetch: bool = False) -> WeightsCheck:
    """Check (and with `prefetch`, download) the pretrained weights of `rows`."""
    from kd.models import hub

    needs = pretrained_needs(rows)
    result = WeightsCheck(names=sorted({n.name for n in needs}))
    if not needs:
        return result
    sources = {name: hub.weight_source(name) for name in result.names}
    missing = [name for name, src in sources.items() if hub.cached_file(src) is None]
    failed: dict[str, str] = {}
    if prefetch:
        for name in missing:
            # asked first, with the preflight's timeout: the hub client retries a refused
            # connection for ~25 s per file before it gives up
            why = hub.download_problem(sources[name], _timeout())
            if why is not None:
                failed[name] = f"--prefetch failed: cannot be downloaded from here: {why}"
                continue
            try:
                path = hub.prefetch(name)
                print(f"prefetched {name}: {path}")
            except Exception as exc:  # noqa: BLE001 - reported with the rows below
                failed[name] = f"--prefetch failed: {type(exc).__name__}: {exc}"
        missing = list(failed)
    else:
        with ThreadPoolExecutor(max_workers=min(8, len(missing) or 1)) as pool:
            reasons = dict(
                zip(
                    missing,
                    pool.map(lambda n: hub.download_problem(sources[n], _timeout()), missing),
                    strict=True,
                )
            )
        failed = {name: why for name, why in reasons.items() if why is not None}
    result.all_cached = not missing
    for need in needs:
        if need.name in failed:
            result.problems.append(_missing_message(need, sources[need.name], failed[need.name]))
    for name in sorted(set(missing) - set(failed)):
        result.notes.append(
            f"pretrained weights '{name}' are not in the Hugging Face cache yet: each job that "
            "needs them downloads them (compute nodes need network); --prefetch downloads "
            "them once, here, and jobs then run with the hub offline"
        )
    return result


def _missing_message(need: Need, source, reason: str) -> str:
    if source.hf_repo:
        from huggingface_hub import constants

        cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    else:  # weights timm only knows by URL: torch hub's cache
        import torch.hub

        cache = f"torch hub's cache ({torch.hub.get_dir()}/checkpoints)"
    return (
        f"{need.where()}: pretrained weights '{need.name}' ({source.describe()}) are not in "
        f"{cache} and cannot be downloaded from here ({reason}); run launch/grid.py with "
        "--prefetch where there is network, or copy a Hugging Face cache that has them into "
        f"HF_HOME, or point {need.role}.file at a local copy of the weights"
    )
