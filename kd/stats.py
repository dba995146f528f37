"""What a row's replicates (`seeds:`) measured, summarised: mean, sample standard deviation,
count, and the 95 % confidence interval of the mean (Student's t, n - 1 degrees of freedom)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample standard deviation (n - 1); None below two values
    low: float | None  # the 95 % interval of the mean; None below two values
    high: float | None

    def contains(self, value: float | None) -> bool | None:
        """Whether `value` lies in the interval; None when either is missing."""
        if value is None or self.low is None or self.high is None:
            return None
        return self.low <= value <= self.high


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± std and the t interval of `values` (one replicate each)."""
    if not values:
        return Summary(0, None, None, None, None)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Summary(1, mean, None, None, None)
    from scipy.stats import t

    std = statistics.stdev(values)
    half = float(t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return Summary(len(values), mean, std, mean - half, mean + half)
