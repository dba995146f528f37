"""The local executor runs the code that was launched, and the weights it was promised.

- A launch from inside a throwaway copy of the checkout, which is then edited so that any process
  importing the trainer from it fails at once: every row still finishes (imported from the
  launch's snapshot under outputs/<grid>/code/<hash>/), its run names that code, and
  status/table say the rows were trained by other code than the checkout now holds.
- `init: pretrained` rows against a real Hugging Face cache holding a tiny timm model: an empty
  cache (and no way to download: the hub endpoint refuses) is exit 2 naming row and tag, with
  nothing created; a cache with the weights passes, and the rows run with the hub offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from codecopy import REPO, TINY_PRETRAINED, break_training, copy_checkout, make_hf_cache
from slurmtools import generate_data, mlflow_client, row_runs, write_grid

# A hub endpoint that refuses at once: "can it be downloaded" fails fast and surely.
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_TRACKING"))}
    return {**env, **NO_HUB, **extra}


def _grid(folder: Path, name: str, data: Path, student_init: object = "scratch") -> Path:
    rows = [
        {"id": "teacher", "label": "T"},
        {
            "id": "student",
            "label": "S",
            "teacher": {"row": "teacher"},
            "kd": {"ce": 0.5, "ikd": 0.5},
            "init": student_init,
            "student": {
                "model": TINY_PRETRAINED if student_init == "pretrained" else "test_resnet"
            },
        },
    ]
    return write_grid(folder, name, rows, data, epochs=1)


def _cli(launch_dir: Path, script: str, workdir: Path, *args: str, env: dict[str, str]):
    return subprocess.run(
        [sys.executable, str(launch_dir / script), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_data(tmp_path_factory.mktemp("data") / "data", 4)


def test_rows_run_the_launched_code_after_the_checkout_is_edited(
    tmp_path: Path, data: Path
) -> None:
    checkout = copy_checkout(tmp_path / "checkout")
    workdir = checkout  # launched from inside the checkout, as the README does
    grid = _grid(workdir / "testgrids", "snap", data)
    # every row a fresh interpreter (no fork server importing the code up front), one at a
    # time: the student starts after the edit, from whatever PYTHONPATH leads it to
    env = _env(KDGRID_LOCAL_FORKSERVER="0")
    launcher = subprocess.Popen(
        [sys.executable, str(checkout / "launch" / "grid.py"), str(grid), "--executor", "local"]
        + ["--max-parallel", "1"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    code_root = workdir / "outputs" / "snap" / "code"
    deadline = time.monotonic() + 120
    while not list(code_root.glob("*/CODE.json")) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no code snapshot after 120 s"
        time.sleep(0.05)
    break_training(checkout)
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out
    (snapshot,) = code_root.iterdir()
    manifest = json.loads((snapshot / "CODE.json").read_text())
    runs = {r.data.tags["kdgrid.id"]: r for r in row_runs(workdir, "kd-test-snap")}
    assert set(runs) == {"teacher", "student"}
    for run in runs.values():
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["kdgrid.code_dir"] == str(snapshot), tags  # imported from the snapshot
        assert tags["kdgrid.code_hash"] == manifest["hash"] == snapshot.name
        assert tags["kdgrid.code_dirty"] == "false"  # the copy was committed before the launch
    # the edited checkout itself cannot train any more: the edit was real
    broken = _cli(checkout / "launch", "train.py", workdir, str(grid), "--row", "teacher", env=env)
    assert broken.returncode != 0 and "edited after the launch" in broken.stderr, broken.stderr
    status = _cli(checkout / "launch", "status.py", workdir, str(grid), env=env)
    assert status.returncode == 0, status.stderr
    assert "2 finished row(s) were trained by other code than this checkout" in status.stdout
    table = _cli(checkout / "launch", "table.py", workdir, str(grid), "--no-log", env=env)
    assert table.returncode == 0, table.stderr
    assert f"2 finished row(s) trained by code {snapshot.name}" in table.stderr, table.stderr
    assert "(commit " in table.stderr and ": teacher (T), student (S)" in table.stderr


def test_missing_pretrained_weights_stop_the_launch(tmp_path: Path, data: Path) -> None:
    workdir = tmp_path / "work"
    grid = _grid(workdir, "noweights", data, student_init="pretrained")
    env = _env(HF_HOME=str(tmp_path / "empty-hf"))
    for extra in ([], ["--prefetch"]):
        proc = _cli(
            Path(__file__).parents[2] / "launch", "grid.py", workdir, str(grid), "--executor",
            "local", *extra, env=env,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stdout + proc.stderr
        message = proc.stderr
        assert f"row 'student' (S): init: pretrained weights '{TINY_PRETRAINED}'" in message
        assert "--prefetch" in message and "init.file" in message
        assert ("--prefetch failed" if extra else "cannot be downloaded from here") in message
        assert sorted(p.name for p in workdir.iterdir()) == ["noweights.yaml"]  # nothing made


def test_cached_pretrained_weights_run_offline(tmp_path: Path, data: Path) -> None:
    workdir = tmp_path / "work"
    grid = _grid(workdir, "cached", data, student_init="pretrained")
    hf_home = tmp_path / "hf"
    make_hf_cache(hf_home)
    launch_dir = Path(__file__).parents[2] / "launch"
    env = _env(HF_HOME=str(hf_home))
    proc = _cli(launch_dir, "grid.py", workdir, str(grid), "--executor", "local", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pretrained weights in the Hugging Face cache: {TINY_PRETRAINED}" in proc.stdout
    assert "jobs run with HF_HUB_OFFLINE=1" in proc.stdout
    runs = {r.data.tags["kdgrid.id"]: r for r in row_runs(workdir, "kd-test-cached")}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    snapshot = runs["student"].data.tags["kdgrid.code_dir"]
    assert Path(snapshot).parent == workdir / "outputs" / "cached" / "code"  # via the fork server
    client = mlflow_client(workdir)
    assert client.get_run(runs["student"].info.run_id).data.params["init.source"] == "pretrained"


def test_a_model_built_offline_reads_the_cached_weights(tmp_path: Path) -> None:
    """What a job does: `build_model(..., source="pretrained")` -> timm.create_model(
    pretrained=True) -> the hub cache, with HF_HUB_OFFLINE=1 and no network."""
    home = tmp_path / "hf"
    state = make_hf_cache(home, seed=3)
    code = f"""
import json, torch
from kd.models import build_model
model = build_model({TINY_PRETRAINED!r}, num_classes=1000, source="pretrained")
got = model.state_dict()
print(json.dumps({{k: bool(torch.equal(got[k], v)) for k, v in torch.load({str(tmp_path / "sd.pt")!r}).items()}}))
"""
    import torch

    torch.save(state, tmp_path / "sd.pt")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    equal = json.loads(proc.stdout.strip().splitlines()[-1])
    assert equal and all(equal.values()), [k for k, v in equal.items() if not v]
