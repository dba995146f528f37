"""Which process a recorded pid was: pids are reused (32768 of them by default on Linux), so a
pid alone can name an unrelated process once the recorded one has ended."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


@functools.cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> str | None:
    """`<boot id>:<start time>` of a live process (Linux: /proc), None where it cannot be read.
    Recorded beside a pid, it tells that process from a later one with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (command) state ppid ...": the command may hold spaces and parentheses; the start
    # time (in clock ticks since boot) is the 22nd field, the 20th after the command
    fields = stat[stat.rfind(")") + 2 :].split()
    return f"{_boot_id()}:{fields[19]}" if len(fields) > 19 else None


def still_running(pid: int, identity: str | None) -> bool:
    """Is the process recorded as (`pid`, `identity`) still running? Without an identity (an
    older record, no /proc), any live process with that pid counts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if identity is None:
        return True
    now = process_identity(pid)
    return now is None or now == identity


@contextlib.contextmanager
def signals_handled(
    handler: Callable[[int, object], None],
    signums: Iterable[int],
    *,
    replaces: Callable[[object], bool],
) -> Iterator[None]:
    """`handler` for each of `signums` whose current handler `replaces` accepts, until the block
    ends. Nothing changes where signals cannot be handled (not the main thread)."""
    previous = {}
    try:
        for signum in signums:
            if replaces(signal.getsignal(signum)):
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
