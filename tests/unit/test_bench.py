"""launch/bench.py: every sub-command runs on tiny inputs and prints well-formed figures.

No test asserts a speed: the figures depend on the machine and its load. What is checked is
that the commands run the project's real code paths (the loop's `train_step`, the row's loader,
the launcher's submit and status) and report positive numbers under the documented keys; and
that the speed-ups behind them change nothing (bulk MLflow runs equal one-by-one runs, the lean
search equals MLflow's search, a bf16 teacher computes what autocast computed).

The `launch` test submits to the real SLURM cluster (slurm/cluster.sh) and checks that every
job it submitted is gone afterwards. Outside CI it is skipped when SLURM is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GRID = str(REPO / "grids" / "table2b.yaml")
HARD_ROW = "2b-6"  # tiny DeiT distilled student <- tiny ConvNeXt teacher, hard distillation
IN_CI = os.environ.get("CI") == "true"
HAVE_SLURM = shutil.which("sbatch") is not None


def _bench_cli():
    spec = importlib.util.spec_from_file_location("launch_bench", REPO / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return _bench_cli()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """--threads sets torch's global thread count: give the next test the usual one back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_json(cli, capsys, *argv: str) -> dict[str, Any]:
    assert cli.main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def positive(result: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert key in result, f"{key} missing from {sorted(result)}"
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_step_reports_project_and_plain_throughput(cli, capsys, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    r = run_json(
        cli,
        capsys,
        "step",
        GRID,
        f"output_dir={out}",
        "--row",
        HARD_ROW,
        "--smoke",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--threads",
        "1",
    )
    assert r["student"] == "deit_tiny_distilled_patch16_224"
    assert r["teacher"] == "convnext_atto"
    assert r["kd"] == {"ce": 0.5, "deit_hard": 0.5}
    assert (r["batch_size"], r["img_size"], r["precision"], r["device"]) == (8, 32, "fp32", "cpu")
    assert r["channels_last"] is True  # train.channels_last (default on) applies on CPU too
    positive(
        r,
        "project_img_per_s",
        "plain_img_per_s",
        "ratio",
        "teacher_share",
        "teacher_ms",
        "project_step_ms",
        "plain_step_ms",
        "flops_per_step",
    )
    assert 0 < r["teacher_share"] <= 1
    assert len(r["project_img_per_s_repeats"]) == len(r["plain_img_per_s_repeats"]) == 2
    assert "mfu" not in r  # CUDA only


def test_step_prints_a_readable_summary(cli, capsys, tmp_path: Path) -> None:
    """Without --json: one line per figure; a row without a teacher has a 0 % teacher share;
    --batch-size overrides the row's batch."""
    argv = ["step", GRID, f"output_dir={tmp_path}/out", "--row", "2b-2", "--smoke"]
    argv += ["--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1"]
    argv += ["--batch-size", "4", "--quiet"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "no teacher" in text and "batch 4 x 32 px" in text
    for label in ("project loop", "plain loop", "ratio", "teacher"):
        assert label in text
    assert "   0.0 %" in text


def test_data_reports_loader_throughput_against_a_demand(cli, capsys, tmp_path: Path) -> None:
    out = f"output_dir={tmp_path}/out"
    r = run_json(
        cli,
        capsys,
        "data",
        GRID,
        out,
        "--row",
        HARD_ROW,
        "--smoke",
        "--workers",
        "0",
        "--demand-steps",
        "2",
    )  # the demand measured with `step`
    positive(r, "loader_img_per_s", "demand_img_per_s", "headroom", "first_batch_s")
    positive(r, "next_epoch_first_batch_s")
    assert r["workers"] == 0 and r["batch_size"] == 8 and r["img_size"] == 32
    assert r["batch_dtype"] == "uint8" and r["bytes_per_image"] == 3 * 32 * 32
    assert isinstance(r["keeps_up"], bool)

    # a bigger generated copy, two loader workers, a given demand
    r = run_json(
        cli,
        capsys,
        *("data", GRID, out, "--row", HARD_ROW, "--smoke", "--workers", "2"),
        *("--generate", "48", "--image-px", "64", "--batches", "4", "--demand", "1e9"),
    )
    positive(r, "loader_img_per_s", "per_worker_img_per_s")
    assert r["images_in_split"] >= 40 and r["workers"] == 2 and r["batches"] == 4
    assert r["demand_img_per_s"] == 1e9 and r["keeps_up"] is False
    assert "test_first_pass_img_per_s" not in r  # only with --test

    # the test loader too: a first pass, then one from its transform cache
    r = run_json(
        cli,
        capsys,
        *("data", GRID, out, "--row", HARD_ROW, "--smoke", "--workers", "2", "--test"),
        *("--generate", "48", "--image-px", "64", "--batches", "3", "--demand", "10"),
    )
    positive(r, "test_first_pass_img_per_s", "test_second_pass_img_per_s", "test_cache_gb")
    assert r["test_cache"] is True and r["test_batches"] == 3
    assert r["test_images_in_split"] >= 20  # --test generates a test split to read (half)


def test_checkpoint_reports_what_an_epoch_end_keeps_training_waiting(
    cli, capsys, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run_json(
        cli,
        capsys,
        *("checkpoint", GRID, f"output_dir={out}", "--row", HARD_ROW, "--smoke"),
        *("--repeats", "2", "--threads", "1"),
    )
    assert r["student"] == "deit_tiny_distilled_patch16_224" and r["device"] == "cpu"
    positive(r, "in_loop_s", "background_blocking_s", "background_write_s", "blocking_ratio")
    positive(r, "state_bytes", "model_bytes", "step_time_ratio_during_write", "student_params")
    assert r["steps_during_write"] >= 1 and r["batch_size"] == 2
    # best.pt + last.pt + state.pt; the state holds the weights and AdamW's two moments
    assert r["bytes_per_epoch"] == 2 * r["model_bytes"] + r["state_bytes"]
    assert r["state_bytes"] > 2.5 * r["model_bytes"]
    assert r["model_bytes"] > 4 * r["student_params"]  # fp32 weights
    folder = Path(r["folder"])  # the row's output folder (--smoke: `<output_dir>-smoke`)
    assert folder.parent == tmp_path and folder.name.startswith("out") and r["repeats"] == 2
    assert not list(folder.glob(".bench-checkpoint-*"))  # the scratch folder is gone

    argv = ["checkpoint", GRID, f"output_dir={out}", "--row", HARD_ROW, "--smoke"]
    assert cli.main([*argv, "--repeats", "1", "--threads", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    for label in ("files per epoch", "written in the loop", "in the background", "blocking ratio"):
        assert label in text


def test_peak_flops_table_knows_the_gpus_mfu_is_computed_for() -> None:
    from bench.step import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_bf16_teacher_computes_what_autocast_computed() -> None:
    """Storing the frozen teacher's conv/linear weights in bf16 once gives bit-identical
    outputs under bf16 autocast (CPU autocast here; the same casts on CUDA)."""
    import timm

    from kd.models import build_model, forward_with_embedding, freeze_teacher
    from kd.train import teacher_weights_bf16

    torch.set_num_threads(1)
    x = torch.randn(2, 3, 32, 32)
    for name in ("convnext_atto", "resnetv2_18x1_bit_smoke"):
        teacher = freeze_teacher(build_model(name, num_classes=4))
        converted = teacher_weights_bf16(copy.deepcopy(teacher))
        convs = [m for m in converted.modules() if type(m) is torch.nn.Conv2d]
        assert all(m.weight.dtype == torch.bfloat16 for m in convs), name
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            a = forward_with_embedding(teacher, x)
            b = forward_with_embedding(converted, x)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.embedding, b.embedding), name
        # norms (and BiT's weight-standardised convolutions) keep fp32
        kinds = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
        norms = [m for m in converted.modules() if isinstance(m, kinds)]
        assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert timm.layers.StdConv2d in {type(m) for m in converted.modules()}
    std = [m for m in converted.modules() if isinstance(m, timm.layers.StdConv2d)]
    assert all(m.weight.dtype == torch.float32 for m in std)


# --------------------------------------------------------------------------------------------
# The launcher's MLflow speed-ups change nothing
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made (3-8 s here), copied for each test."""
    from kd.tracking import Tracker

    path = tmp_path_factory.mktemp("store") / "empty.db"
    Tracker(f"sqlite:///{path}").client.search_experiments(max_results=1)
    return path


def fresh_store(empty_store: Path, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def launch_grid(tmp_path_factory):
    from bench.launch import write_launch_grid
    from kd.grid import load_grid

    folder = tmp_path_factory.mktemp("bulk")
    return folder, load_grid(write_launch_grid(folder, 6, None, "bulk_test"))


def test_bulk_runs_equal_runs_created_one_by_one(launch_grid, empty_store) -> None:
    from kd.tracking import TAG, RowRun, Tracker, row_params, row_yaml

    folder, grid = launch_grid
    tracker = Tracker(fresh_store(empty_store, folder / "bulk.db"))
    experiment = tracker.ensure_experiment(grid.experiment)
    parent = tracker.create_launch_run(experiment, grid.name, grid.file, "slurm", 6)
    one = tracker.create_row_run(experiment, grid.rows[0], executor="slurm", parent_run_id=parent)
    many = tracker.create_row_runs(
        experiment, grid.rows[1:], executor="slurm", parent_run_id=parent
    )
    assert set(many) == {row.id for row in grid.rows[1:]}
    tracker.set_tags_many({run_id: {f"{TAG}.job_id": "7_1"} for run_id in many.values()})
    tracker.set_tags_many({run_id: {f"{TAG}.job_id": "8_2"} for run_id in many.values()})
    tracker.set_tags(one, {f"{TAG}.job_id": "8_2"})

    a = tracker.client.get_run(one)
    for row in grid.rows[1:]:
        b = tracker.client.get_run(many[row.id])
        assert b.info.status == a.info.status == "SCHEDULED"
        assert b.info.run_name == row.run_name and b.info.lifecycle_stage == "active"
        assert b.info.user_id == a.info.user_id and b.info.start_time > 0
        assert set(b.data.tags) == set(a.data.tags)
        for key in a.data.tags:
            if key not in (
                f"{TAG}.id",
                f"{TAG}.label",
                f"{TAG}.key",
                f"{TAG}.output_dir",
                "mlflow.runName",
            ):
                assert b.data.tags[key] == a.data.tags[key], key
        assert b.data.tags[f"{TAG}.key"] == row.key and b.data.tags[f"{TAG}.job_id"] == "8_2"
        assert b.data.tags[f"{TAG}.output_dir"] == str(row.output_dir.resolve())
        # params and row.yaml are the job's to write when it starts, either way
        assert b.data.params == a.data.params == {}
        assert tracker.client.list_artifacts(b.info.run_id) == []
    assert tracker.client.list_artifacts(one) == []
    # what a job writes when it starts, into a bulk-made run: every param, row.yaml
    row, run_id = grid.rows[1], many[grid.rows[1].id]
    RowRun(tracker.uri, run_id).log_row(row)
    run = tracker.client.get_run(run_id)
    assert run.data.params == row_params(row) and run.data.params["key"] == row.key
    assert [f.path for f in tracker.client.list_artifacts(run_id)] == ["row.yaml"]
    text = Path(tracker.client.download_artifacts(run_id, "row.yaml", str(folder)))
    assert text.read_text() == row_yaml(row)
    # a resume under the same key with another placement keeps the params MLflow has (a param
    # cannot change) and writes this start's row.yaml
    data = row.to_dict()
    data["config"]["resources"]["time_min"] += 7
    moved = type(row).from_dict(data)
    assert moved.key == row.key
    RowRun(tracker.uri, run_id).log_row(moved)
    assert tracker.client.get_run(run_id).data.params == row_params(row)
    text = Path(tracker.client.download_artifacts(run_id, "row.yaml", str(folder / "again")))
    assert text.read_text() == row_yaml(moved) != row_yaml(row)
    # the launcher finds them again
    latest = tracker.latest_by_key(experiment)
    assert {latest[row.key].run_id for row in grid.rows[1:]} == set(many.values())


def test_lean_search_equals_mlflow_search(launch_grid, empty_store) -> None:
    from mlflow.entities import Metric

    from kd.tracking import TAG, Tracker
    from kd.tracking.records import latest_by_key

    folder, grid = launch_grid
    tracker = Tracker(fresh_store(empty_store, folder / "search.db"))
    experiment = tracker.ensure_experiment(grid.experiment)
    runs = tracker.create_row_runs(experiment, grid.rows, executor="slurm")
    first, second, third = list(runs.values())[:3]
    tracker.client.log_batch(
        first, metrics=[Metric("val/acc1", 1.0, 0, 1), Metric("val/acc1", 2.0, 0, 2)]
    )
    tracker.client.log_batch(second, metrics=[Metric("val/loss", float("nan"), 0, 1)])
    tracker.mark(second, "FAILED", "boom")
    tracker.client.delete_run(third)  # deleted runs are not found
    mlflow_runs = tracker.client.search_runs(
        [experiment],
        filter_string=f"tags.`{TAG}.grid` = '{grid.name}'",
        order_by=["attributes.start_time DESC"],
    )
    lean = tracker.search_tagged(experiment, f"{TAG}.grid", grid.name, params=True)
    without_params = tracker.search_tagged(experiment, f"{TAG}.grid", grid.name)
    assert [r.data.tags for r in without_params] == [r.data.tags for r in lean]
    assert all(r.data.params == {} for r in without_params)
    # without params a SQLite file is read with sqlite3, with them through SQLAlchemy: alike
    assert [r.info for r in without_params] == [r.info for r in lean]
    for ours, theirs in zip(without_params, lean, strict=True):
        assert ours.data.metrics.keys() == theirs.data.metrics.keys()
        for key, value in theirs.data.metrics.items():
            assert math.isnan(value) == math.isnan(ours.data.metrics[key])
            assert math.isnan(value) or value == ours.data.metrics[key]
    from kd.tracking import sqlite_path, sqlite_read

    raw = sqlite_read.search_tagged(
        sqlite_path(tracker.uri), grid.experiment, f"{TAG}.grid", grid.name
    )  # MLflow's file read without MLflow: the same runs, tags and metrics
    assert raw is not None and [r.info for r in raw] == [r.info for r in without_params]
    for ours, theirs in zip(raw, without_params, strict=True):
        assert ours.data.tags == theirs.data.tags and ours.data.params == {}
        assert ours.data.metrics.keys() == theirs.data.metrics.keys()
        for key, value in theirs.data.metrics.items():
            assert math.isnan(value) == math.isnan(ours.data.metrics[key])
            assert math.isnan(value) or ours.data.metrics[key] == value
    assert [r.info.run_id for r in lean] == [r.info.run_id for r in mlflow_runs]
    assert third not in {r.info.run_id for r in lean} and len(lean) == len(grid.rows) - 1
    for ours, theirs in zip(lean, mlflow_runs, strict=True):
        assert ours.data.tags == dict(theirs.data.tags)
        assert ours.data.params == dict(theirs.data.params)
        assert ours.data.metrics.keys() == theirs.data.metrics.keys()
        for key, value in theirs.data.metrics.items():
            assert (math.isnan(value) and math.isnan(ours.data.metrics[key])) or (
                ours.data.metrics[key] == value
            )
        assert (ours.info.status, ours.info.start_time, ours.info.end_time) == (
            theirs.info.status,
            theirs.info.start_time,
            theirs.info.end_time,
        )
    by_id = {r.info.run_id: r for r in lean}
    assert by_id[first].data.metrics["val/acc1"] == 2.0
    assert by_id[second].info.status == "FAILED"
    keyed = tracker.search_tagged(experiment, f"{TAG}.key")
    assert {r.info.run_id for r in keyed} == {r.info.run_id for r in lean}

    # status reads only the newest run of each key: the runs latest_by_key picks from all
    time.sleep(0.01)
    again = tracker.create_row_runs(experiment, grid.rows[3:5], executor="slurm")  # relaunched
    db = sqlite_path(tracker.uri)
    everything = sqlite_read.search_tagged(db, grid.experiment, f"{TAG}.grid", grid.name)
    newest = sqlite_read.search_tagged(
        db, grid.experiment, f"{TAG}.grid", grid.name, latest_by=f"{TAG}.key"
    )
    picked = {r.run_id for r in latest_by_key(everything).values()}
    assert newest is not None and [r.info.run_id for r in newest] == [
        r.info.run_id for r in everything if r.info.run_id in picked
    ]
    assert set(again.values()) <= picked and len(newest) == len(everything) - 2
    for ours, theirs in zip(
        newest, [r for r in everything if r.info.run_id in picked], strict=True
    ):
        assert (
            ours.data.tags == theirs.data.tags
            and ours.data.metrics.keys() == theirs.data.metrics.keys()
        )


# --------------------------------------------------------------------------------------------
# launch: the real SLURM cluster
# --------------------------------------------------------------------------------------------


def _queued(job_ids: list[str]) -> list[str]:
    if not job_ids:
        return []
    out = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%F"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return sorted({line.strip() for line in out.splitlines() if line.strip()} & set(job_ids))


class _Clock:
    """A clock that moves only when told (`perf_counter` for bench.launch's `time`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


CLOCK = _Clock()


class _Timed:
    """Stand-ins for the tracker and sbatch calls the launch benchmark times."""

    def tags(self) -> None:  # the job-id tags, set from inside submit_rows, from a thread pool
        CLOCK.now += 0.2
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: self.tag(), range(2)))

    def tag(self) -> None:
        CLOCK.now += 0.1

    def submit(self) -> None:
        CLOCK.now += 0.3
        self.tags()


def test_launch_timing_counts_a_nested_call_once_in_its_own_bucket(monkeypatch) -> None:
    import bench.launch

    monkeypatch.setattr(bench.launch, "time", CLOCK)
    buckets: dict[str, float] = {}
    targets = [(_Timed, "tags", "mlflow"), (_Timed, "tag", "mlflow"), (_Timed, "submit", "sbatch")]
    with bench.launch._timed(buckets, targets):
        _Timed().submit()
    # sbatch: its own 0.3 s only; mlflow: the tags (0.2 s) and, counted once, the two tag calls
    assert buckets == {"sbatch": pytest.approx(0.3), "mlflow": pytest.approx(0.4)}
    assert _Timed.__dict__["submit"].__name__ == "submit"  # the originals are back


@pytest.mark.slurm
@pytest.mark.skipif(not HAVE_SLURM and not IN_CI, reason="SLURM is not installed here")
def test_launch_submits_reads_status_and_cancels_everything(cli, capsys, tmp_path: Path) -> None:
    r = run_json(cli, capsys, "launch", "20", "--workdir", str(tmp_path / "work"))
    assert r["rows"] == 20
    positive(r, "validate_s", "submit_s", "status_s", "mlflow_s", "sbatch_s")
    assert r["states"] == {"pending": 20}  # held back with --begin until cancelled
    assert r["sbatch_calls"] == 2  # the teacher's job, then one array for its 19 students
    assert r["cancelled_ok"] is True and len(r["cancelled_jobs"]) == 2
    assert _queued(r["cancelled_jobs"]) == []


def test_record_validates_records_and_reads_status_without_a_cluster(
    cli, capsys, tmp_path: Path, empty_store: Path
) -> None:
    fresh_store(empty_store, tmp_path / "work" / "mlflow.db")  # its tables made already
    r = run_json(cli, capsys, "record", "12", "--workdir", str(tmp_path / "work"))
    assert r["rows"] == 12 and r["runs_found"] == 12
    positive(r, "validate_s", "record_s", "job_tags_s", "status_load_s", "status_read_s")
    positive(r, "status_rows_s", "record_s_cpu", "load_avg_1m")
    assert sum(r["states"].values()) == 12
    from kd.tracking import TAG, Tracker

    tracker = Tracker(r["tracking_uri"])  # the runs are there, each with its job id
    (experiment,) = [e for e in tracker.client.search_experiments() if "bench_record" in e.name]
    runs = tracker.search_tagged(experiment.experiment_id, f"{TAG}.grid")
    assert len(runs) == 12 and all(f"{TAG}.job_id" in run.data.tags for run in runs)


# --------------------------------------------------------------------------------------------
# local: a real row process (slow: marked e2e)
# --------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_local_reports_process_start_to_first_step(cli, capsys, tmp_path: Path) -> None:
    out = f"output_dir={tmp_path}/out"
    r = run_json(cli, capsys, "local", GRID, out, "--row", "2b-2", "--smoke", "--repeats", "1")
    positive(r, "startup_s", "startup_fresh_s", "fork_server_rows_wall_s", "fresh_rows_wall_s")
    if hasattr(os, "fork"):
        positive(r, "warmup_s")


@pytest.mark.parametrize(
    "key, value",
    [
        ("a", "b"),
        ("kdgrid.x", "y" * 9000),
        ("mlflow.runName", ""),
        ("a/b", "c"),
        ("../x", "v"),
        ("a" * 300, "v"),
        ("", "v"),
        ("a\\b", "v"),
    ],
)
def test_bulk_tag_check_is_mlflows(key, value) -> None:
    """The bulk insert checks each tag key once: it accepts, refuses and truncates as MLflow's
    own `_validate_tag` does."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_tag

    from kd.tracking.bulk import _tag_validator

    outcomes = []
    for check in (_tag_validator(_validate_tag), _validate_tag):
        try:
            outcomes.append(check(key, value))
        except MlflowException as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]
