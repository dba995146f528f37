"""The KD term names and which need a teacher, and the check of a row's term -> weight mapping:
what the grid validator needs, without torch (kd/losses.py holds the terms themselves and fails
at import if the two lists disagree)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

#: term name -> whether it needs a teacher (the order is the one error messages list)
NEEDS_TEACHER: dict[str, bool] = {
    "ce": False,
    "deit_hard": True,
    "deit_soft": True,
    "ikd": True,
    "rkd_distance": True,
    "rkd_angle": True,
    "embed_mse": True,
}


def unknown_term_message(name: object) -> str:
    """Name the closest valid term so a typo in a grid YAML is a one-line fix."""
    valid = ", ".join(NEEDS_TEACHER)
    close = difflib.get_close_matches(str(name), list(NEEDS_TEACHER), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"unknown KD term {name!r}{hint} Valid terms: {valid}"


def check_terms(weights: Mapping[str, float]) -> list[str]:
    """Every problem with a term-to-weight mapping, as messages; never raises.

    The grid validator reports all problems of all rows at once, before anything is launched.
    """
    if not isinstance(weights, Mapping):
        return [f"KD loss weights must be a mapping of term name to weight, got {weights!r}"]
    if not weights:
        return [
            f"no KD terms given; name at least one term with a weight, e.g. {{ce: 1.0}}. "
            f"Valid terms: {', '.join(NEEDS_TEACHER)}"
        ]
    problems: list[str] = []
    usable: list[float] = []
    for name, weight in weights.items():
        if name not in NEEDS_TEACHER:
            problems.append(unknown_term_message(name))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"weight of KD term {name!r} must be a number, got {weight!r}")
        elif not math.isfinite(weight):
            problems.append(f"weight of KD term {name!r} must be finite, got {weight}")
        elif weight < 0:
            problems.append(f"weight of KD term {name!r} must be >= 0, got {weight}")
        else:
            usable.append(float(weight))
    if usable and len(usable) == len(weights) and not any(usable):
        problems.append("all KD term weights are zero; give at least one term a positive weight")
    return problems
