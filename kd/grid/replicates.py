"""`seeds: N` (or `--seeds N`): every row of the grid becomes N replicates, one per seed.

Replicate `i` of row `r` has the id `r@s<i>` and the label `<label>@s<i>`, and trains with
`train.seed` = the row's seed + i; everything else is the row's, so replicate 0 has the row's own
content key (a single-seed run of the row counts as its first replicate). A replicate's
`teacher: {row: t}` and `init: {row: t}` read `t@s<i>`: the replicate of the same seed index,
so each seed is a whole copy of the table and the spread between seeds includes the teachers'.
A row (or a recipe, or `defaults`) may set its own `seeds:`; `seeds: 1` keeps it a single row
(id unchanged) that every replicate of its readers reads: one teacher for all student seeds.
`@` is kept for these ids: a row's own id may not contain it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kd.grid.trees import copy_tree

MARK = "@s"
MAX_SEEDS = 100


def replicate_id(row_id: str, index: int) -> str:
    return f"{row_id}{MARK}{index}"


def check_seeds(value: Any, where: str, problems: list[str]) -> int:
    """The number of replicates `seeds:`/`--seeds` asks for (1 when absent or wrong)."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEEDS:
        problems.append(
            f"{where}: must be a whole number of replicates per row between 1 and "
            f"{MAX_SEEDS}, got {value!r}"
        )
        return 1
    return value


def reserved_id_problem(row: Mapping[str, Any], where: str) -> str | None:
    """A row id holding the replicate mark would collide with another row's replicate."""
    row_id = row.get("id")
    if isinstance(row_id, str) and "@" in row_id:
        return (
            f"{where}: id: '{row_id}' contains '@', which only replicate ids (`<id>@s<i>`, "
            "from `seeds:`) may hold; rename the row"
        )
    return None


def replicate(
    row: Mapping[str, Any],
    seeds: int,
    counts: Mapping[str, int],
    where: str,
    problems: list[str],
) -> list[tuple[dict[str, Any], int]]:
    """The `seeds` replicates of one composed row tree, with their seed index (the row itself,
    unchanged, when `seeds` is 1). `counts`: each row id -> its number of replicates, for the
    rows that `teacher.row`/`init.row` name: a row of one is read by every replicate, a row of
    several by the replicate of the same index (so it needs at least as many)."""
    if seeds == 1:
        return [(dict(row), 0)]
    out = []
    train = row.get("train") if isinstance(row.get("train"), Mapping) else {}
    base_seed = train.get("seed", 0)
    for index in range(seeds):
        copy = copy_tree(dict(row))
        copy["id"] = replicate_id(str(row.get("id", "")), index)
        copy["label"] = f"{row.get('label', '')}{MARK}{index}"
        if isinstance(base_seed, int) and not isinstance(base_seed, bool):
            copy.setdefault("train", {})["seed"] = base_seed + index
        for section in ("teacher", "init"):
            ref = copy.get(section)
            if not (isinstance(ref, dict) and isinstance(ref.get("row"), str)):
                continue
            dep_count = counts.get(ref["row"], 1)  # an unknown row is reported by name later
            if dep_count == 1:
                continue
            if dep_count < seeds:
                if index == 0:
                    problems.append(
                        f"{where}: {section}.row: row '{ref['row']}' has {dep_count} replicates, "
                        f"fewer than this row's {seeds}; give it at least as many (or `seeds: 1`, "
                        "one that every replicate reads)"
                    )
                continue
            ref["row"] = replicate_id(ref["row"], index)
        out.append((copy, index))
    return out
