"""MLflow's run-comparison page, in a real headless Chromium, for rows of the table2b smoke grid:
the rows are shown side by side with the params that differ between them; a screenshot is saved."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1200",
    "--virtual-time-budget=20000",
]


def chromium() -> str:
    """Debian's chromium; installed here when missing and we may (CI runs as root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "update", "-q"], check=False, capture_output=True, env=env, timeout=600
        )
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"],
            check=True,
            capture_output=True,
            env=env,
            timeout=900,
        )
        found = shutil.which("chromium")
    if not found:
        pytest.fail("headless Chromium is needed: apt-get install chromium")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(table2b_smoke):
    workdir, _ = table2b_smoke
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.terminate()
        pytest.fail("mlflow ui did not answer within 3 minutes")
    yield uri
    process.terminate()
    process.wait(timeout=30)


def render(browser: str, url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    """The page's text after its scripts ran (and a screenshot, when asked)."""
    profile = tmp_path / "chromium-profile"
    args = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        subprocess.run(
            [*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True
        )
    dom = subprocess.run(
        [*args, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
    ).stdout
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


def test_compare_view_shows_rows_and_differing_params(mlflow_ui, tmp_path):
    browser = chromium()
    client = MlflowClient(tracking_uri=mlflow_ui)
    experiment = client.get_experiment_by_name("kd-table2b-smoke")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''", max_results=100
    )
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        latest[run.data.tags["kdgrid.label"]] = run
    chosen = [latest[label] for label in ("2b-5", "2b-6", "2b-8")]
    url = (
        f"{mlflow_ui}/#/compare-runs?runs={urllib.parse.quote(json.dumps([r.info.run_id for r in chosen]))}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment.experiment_id]))}"
    )
    screenshot = Path(os.environ.get("KDGRID_SCREENSHOT_DIR", tmp_path)) / "mlflow-compare.png"
    text = render(browser, url, tmp_path, screenshot)

    assert "Comparing 3 Runs" in text
    for run in chosen:
        assert run.info.run_name in text  # "<label> <id>"
    params = [r.data.params for r in chosen]
    differing = sorted(k for k in params[0] if len({p.get(k) for p in params}) > 1)
    assert {"kd.deit_hard", "kd.deit_soft", "student.model", "teacher.row"} <= set(differing)
    for key in differing:
        assert key in text, key
    for value in ("deit_tiny_distilled_patch16_224", "resnetv2_18x1_bit_smoke", "convnext_b"):
        assert value in text, value
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1600, 1200)
        assert len(np.unique(np.asarray(image.convert("L").resize((64, 48))))) > 10  # not blank
