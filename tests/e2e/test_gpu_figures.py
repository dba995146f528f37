"""tools/gpu_figures.sh, the one command a session lent a GPU runs, run end to end on the CPU:
four benchmark processes, so it is an end-to-end test, not a unit one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_gpu_figures_script_runs_every_part_and_reports_a_failed_one(tmp_path: Path) -> None:
    """tools/gpu_figures.sh is what a session lent a GPU runs, once, in minutes: each of its
    parts must work before it gets there. QUICK=1 DEVICE=cpu runs them on tiny inputs."""
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(tmp_path / "out")}
    script = [str(REPO / "tools" / "gpu_figures.sh")]

    def run(*parts: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", *script, *parts], env=env, capture_output=True, text=True, timeout=600
        )

    done = run("info", "step", "data", "checkpoint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 part(s) failed" in done.stdout
    step = json.loads((tmp_path / "out" / "step.json").read_text())
    assert step["device"] == "cpu" and step["ratio"] > 0
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert data["demand_img_per_s"] == round(step["project_img_per_s"])  # the step's, measured
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["bytes_per_epoch"] > 0
    assert torch.__version__ in (tmp_path / "out" / "info.txt").read_text()
    bad = run("info", "no-such-part")  # the parts after a failed one still run
    assert bad.returncode == 1 and "unknown part 'no-such-part'" in bad.stdout
    assert "1 part(s) failed" in bad.stdout
