"""Fixtures shared by every tier (tests/unit, tests/e2e, tests/slurm), and the fault-injection
summary printed at the end of a session. Each tier's own conftest marks its tests."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Fault injection: every test that takes the `fault` fixture is one case of the summary printed
# at the end of the session (cases tried, survived, data lost).


@dataclass
class FaultOutcome:
    case: str  # what was injected, and how kdgrid is expected to recover
    where: str  # "slurm" or "local"
    survived: bool | None = None  # the test passed: kdgrid recovered as it should
    lost: int | None = None  # epochs, metrics, checkpoints or finished rows lost (audited)
    detail: str = ""  # how it went: e.g. which epoch the row resumed after


FAULT_OUTCOMES: list[FaultOutcome] = []  # as reported (this process or, with -n, the workers)
SUMMARY_PROPERTY = "kdgrid_summary"  # a test report's user property carrying the summaries' data
FUZZ_REPORTED: dict[str, Counter[str]] = {"counts": Counter(), "failures": Counter()}
_fuzz_sent: dict[str, Counter[str]] = {"counts": Counter(), "failures": Counter()}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (`-n N --dist loadgroup`), every SLURM test goes to one worker and runs
    there in order, as without -n: they share the one cluster (its limits, its queue), while the
    other workers take the unit and end-to-end tests beside them."""
    slurm_dir = REPO / "tests" / "slurm"
    for item in items:
        if item.get_closest_marker("slurm") or slurm_dir in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> FaultOutcome:
    """Records this test as a fault-injection case. The test sets `where`, `lost` (from its
    audit of MLflow and the row folder) and `detail`; `survived` is whether it passed."""
    name = request.node.name.removeprefix("test_").replace("_", " ")
    doc = (request.node.function.__doc__ or name).strip().split("\n\n")[0]
    outcome = FaultOutcome(case=" ".join(doc.split()).rstrip("."), where="local")
    request.node.fault_outcome = outcome
    return outcome


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    outcome = getattr(item, "fault_outcome", None)
    # the test's own result, or a failure in setup or teardown; once False it stays False
    if (
        outcome is not None
        and (report.when == "call" or report.failed)
        and outcome.survived is not False
    ):
        outcome.survived = report.passed
    if report.when == "teardown":
        # The summaries travel in the report: with -n they are printed by the controller,
        # which runs no test itself.
        payload = _fuzz_since_last_report()
        if outcome is not None:
            payload["fault"] = dataclasses.asdict(outcome)
        if payload:
            report.user_properties = [*report.user_properties, (SUMMARY_PROPERTY, payload)]
    return report


def _fuzz_since_last_report() -> dict[str, dict[str, int]]:
    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is None:
        return {}
    payload = {}
    for name, counter in (("counts", fuzzing.FUZZ_COUNTS), ("failures", fuzzing.FUZZ_FAILURES)):
        new = counter - _fuzz_sent[name]
        _fuzz_sent[name] += new
        if new:
            payload[f"fuzz_{name}"] = dict(new)
    return payload


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, payload in report.user_properties:
        if key != SUMMARY_PROPERTY:
            continue
        if "fault" in payload:
            FAULT_OUTCOMES.append(FaultOutcome(**payload["fault"]))
        for name in ("counts", "failures"):
            FUZZ_REPORTED[name].update(payload.get(f"fuzz_{name}", {}))


def pytest_terminal_summary(terminalreporter) -> None:
    fuzz_summary(terminalreporter)
    if not FAULT_OUTCOMES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection")
    for o in FAULT_OUTCOMES:
        survived = {True: "survived", False: "NOT SURVIVED", None: "not run"}[o.survived]
        lost = "?" if o.lost is None else str(o.lost)
        write(f"  [{o.where:<5}] {survived:<12} lost {lost:>2}  {o.case}")
        if o.detail:
            write(f"                                 {o.detail}")
    tried = len(FAULT_OUTCOMES)
    survived = sum(o.survived is True for o in FAULT_OUTCOMES)
    lost = sum(o.lost or 0 for o in FAULT_OUTCOMES)
    unaudited = sum(o.lost is None for o in FAULT_OUTCOMES)
    write(
        f"fault injection: {tried} cases tried, {survived} survived, data lost: {lost}"
        + (f" ({unaudited} not audited: the test failed before its audit)" if unaudited else "")
    )


def fuzz_summary(terminalreporter) -> None:
    """How many cases the fuzz tests (tests/fuzzing.py) tried, whatever pytest's -s/-q."""
    counts, failures = FUZZ_REPORTED["counts"], FUZZ_REPORTED["failures"]
    if not counts:
        return
    terminalreporter.section("fuzzing")
    parts = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    terminalreporter.write_line(
        f"fuzz: {sum(counts.values())} cases tried ({parts}); "
        f"{sum(failures.values())} failed the property (tracebacks, other exit statuses, "
        "silent exit 2, files created by bad input)"
    )
