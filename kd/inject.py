"""Fault injection for tests: pauses at the moments where a kill or a race can strike, each set
by an environment variable (unset in normal use: then nothing waits).

SUBMIT_PAUSE=S   the launcher waits S s after each sbatch call, before its job ids are recorded
RECORD_PAUSE=S   ... after they are in the journal (submissions.jsonl), before the runs' tags
LOCAL_START_PAUSE=S  the local executor, about to start a row it found SCHEDULED, waits up to
                 S s, until the row's run is closed (a `--cancel` in that window)
RUN_START_PAUSE=S    a row job, about to mark its run RUNNING, waits up to S s, until the run
                 is closed (a `--cancel` while the job starts)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

SUBMIT_PAUSE = "KDGRID_INJECT_SUBMIT_PAUSE_S"
RECORD_PAUSE = "KDGRID_INJECT_RECORD_PAUSE_S"
LOCAL_START_PAUSE = "KDGRID_INJECT_LOCAL_START_PAUSE_S"
RUN_START_PAUSE = "KDGRID_INJECT_RUN_START_PAUSE_S"
POLL_S = 0.2


def pause(
    variable: str,
    until: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Wait the seconds `variable` says, or less: until `until()` is true. `log` is told first
    (a test waits for that line to act in the window)."""
    value = os.environ.get(variable)
    if not value:
        return
    if log is not None:
        log(f"fault injection: {variable}={value}: paused")
    deadline = time.monotonic() + float(value)
    while time.monotonic() < deadline:
        if until is not None and until():
            return
        time.sleep(POLL_S)
