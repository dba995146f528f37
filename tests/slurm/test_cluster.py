"""End-to-end checks of the local SLURM dev cluster brought up by ``slurm/cluster.sh up``.

Outside CI the module is skipped when SLURM is not installed. In CI (``CI=true``) it never
skips: a cluster that is down makes these tests fail.
"""

from __future__ import annotations

import importlib
import subprocess
import time
from pathlib import Path

import pytest
from slurmtools import IN_CI, require_slurm

require_slurm()

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"
NODES = {"n1", "n2"}
PARTITIONS = ("gpu", "debug")
JOB_TIMEOUT_S = 180
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def run(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and never raise on a non-zero exit."""
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


def check(*cmd: str | Path, timeout: float = 120) -> str:
    """Run a command that must succeed; return its stdout."""
    proc = run(*cmd, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


def sbatch(*args: str) -> str:
    """Submit with sbatch --parsable and return the job id."""
    out = check("sbatch", "--parsable", *args)
    return out.strip().split(";")[0]


def sacct_states(job_id: str) -> list[str]:
    """States of the job allocation and its steps, as sacct reports them (may be empty at first)."""
    out = run("sacct", "-j", job_id, "-n", "-P", "-o", "State").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for_job(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Poll sacct until the job's allocation is finished and fully recorded; return its fields.

    A job that ends within a second can reach slurmdbd before its start record: sacct then
    briefly shows COMPLETED with an empty Partition and a partial NodeList. So wait for both a
    terminal State and a Partition.
    """
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,Partition,NodeList").stdout
        line = out.strip().splitlines()[0] if out.strip() else "||"
        state, partition, nodelist = line.split("|")[:3]
        fields = {
            "State": state.split()[0] if state else "",
            "Partition": partition,
            "NodeList": nodelist,
        }
        if fields["State"] in TERMINAL and partition:
            return fields
        time.sleep(0.5)
    squeue = run("squeue", "-j", job_id, "-o", "%i %T %R").stdout
    pytest.fail(f"job {job_id} not finished after {timeout}s (sacct: {fields}; squeue: {squeue})")


def test_status_exits_zero() -> None:
    proc = run("bash", CLUSTER_SH, "status", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for daemon in ("munge", "mariadb", "slurmdbd", "slurmctld", "slurmd n1", "slurmd n2"):
        assert any(
            line.startswith("[cluster]") and daemon in line and "running" in line
            for line in proc.stdout.splitlines()
        ), f"{daemon} not running:\n{proc.stdout}"


def test_sinfo_lists_partitions_and_nodes() -> None:
    out = check("sinfo", "-h", "-N", "-o", "%P %N %t")
    nodes_by_partition: dict[str, set[str]] = {}
    for line in out.splitlines():
        partition, node, _state = line.split()
        nodes_by_partition.setdefault(partition.rstrip("*"), set()).add(node)
    for partition in PARTITIONS:
        assert nodes_by_partition.get(partition) == NODES, out
    assert "gpu*" in out, f"gpu should be the default partition:\n{out}"


@pytest.mark.parametrize("partition", PARTITIONS)
def test_hostname_job_completes(partition: str, tmp_path: Path) -> None:
    out_file = tmp_path / "job.out"
    job_id = sbatch(
        "-p", partition, "-o", str(out_file), "-J", f"kdgrid-test-{partition}", "--wrap", "hostname"
    )
    job = wait_for_job(job_id)
    assert job["State"] == "COMPLETED", (job, sacct_states(job_id))
    assert job["Partition"] == partition
    states = sacct_states(job_id)  # the allocation and its steps (batch, extern)
    assert states and all(s == "COMPLETED" for s in states), states
    assert out_file.read_text().strip(), "job printed no hostname"


def test_two_node_job_runs_on_n1_and_n2(tmp_path: Path) -> None:
    out_file = tmp_path / "job.out"
    job_id = sbatch(
        "-N",
        "2",
        "-o",
        str(out_file),
        "-J",
        "kdgrid-test-2nodes",
        "--wrap",
        'srun hostname && srun bash -c "echo node=\\$SLURMD_NODENAME"',
    )
    job = wait_for_job(job_id)
    assert job["State"] == "COMPLETED", (job, sacct_states(job_id))
    assert job["NodeList"] == "n[1-2]"
    # Drop srun's own notes: a second step started right after the first may print
    # "srun: Job ... step creation temporarily disabled, retrying" before it runs.
    lines = [line for line in out_file.read_text().splitlines() if not line.startswith("srun:")]
    assert {line.removeprefix("node=") for line in lines if line.startswith("node=")} == NODES, (
        lines
    )
    assert len([line for line in lines if not line.startswith("node=")]) == 2, lines


def test_second_up_is_quick_and_says_already_up() -> None:
    start = time.monotonic()
    proc = run("bash", CLUSTER_SH, "up", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already up" in proc.stdout, proc.stdout
    assert all(line.startswith("[cluster]") for line in proc.stdout.splitlines())
    assert elapsed < 10, f"idempotent up took {elapsed:.1f}s"


def _import_submitit():
    """Import submitit; while a system-wide pip install is still running, wait for it."""
    try:
        return importlib.import_module("submitit")
    except ImportError:
        pass
    log = Path("/tmp/pipinstall.log")
    deadline = time.monotonic() + 900
    while log.exists() and time.monotonic() < deadline:
        if any(line.strip() == "done" for line in log.read_text(errors="replace").splitlines()):
            break
        time.sleep(5)
    importlib.invalidate_caches()
    try:
        return importlib.import_module("submitit")
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("submitit is not installed")


def test_submitit_job_returns_value_and_state_from_sacct(tmp_path: Path) -> None:
    submitit = _import_submitit()

    def work(x: int) -> tuple[int, str | None]:
        # defined inside the test, so cloudpickle sends it by value
        import os

        return x * 21, os.environ.get("SLURMD_NODENAME")

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(
        slurm_partition="gpu", timeout_min=10, cpus_per_task=1, name="kdgrid-test-submitit"
    )
    job = executor.submit(work, 2)
    value, node = job.result()
    assert value == 42
    assert node in NODES
    # submitit reads job.state from sacct (through its cached watcher): without accounting it
    # stays UNKNOWN forever.
    deadline = time.monotonic() + 120
    while job.state != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert job.state == "COMPLETED", (job.state, sacct_states(str(job.job_id)))
    assert wait_for_job(str(job.job_id))["State"] == "COMPLETED"
