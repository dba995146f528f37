"""launch/table.py on the finished table2b smoke grid: the paper's order and labels, measured
values equal to what MLflow recorded, the paper's values beside them, rows that did not run
shown as such, a real PNG, and the table logged to a grid-level run."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from kd.grid import load_grid
from kd.results import cluster_columns

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def table(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "table.py"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_table_from_mlflow_beside_the_paper(table2b_smoke):
    workdir, _ = table2b_smoke
    plot = workdir / "table2b.png"
    result = table(
        workdir, "grids/table2b.yaml", "--smoke", "--format", "json", "--plot", str(plot)
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["label"] for r in rows] == [f"2b-{i}" for i in range(1, 11)]  # the paper's order
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("kd-table2b-smoke")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''")
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if run.info.status == "FINISHED":
            latest[run.data.tags["kdgrid.label"]] = run
    for row in rows:
        run = latest[row["label"]]
        assert row["state"] == "finished"
        assert row["acc1"] == pytest.approx(run.data.metrics["val/acc1"])
        assert row["acc5"] == pytest.approx(run.data.metrics["val/acc5"])
        assert row["loss"] == pytest.approx(run.data.metrics["val/loss"])
        assert row["params_m"] == pytest.approx(run.data.metrics["model/params"] / 1e6)
        assert row["diff_acc1"] == pytest.approx(row["acc1"] - row["paper_acc1"])
    seventh = rows[6]
    assert (seventh["paper_acc1"], seventh["paper_acc5"], seventh["paper_loss"]) == (
        92.52,
        99.15,
        0.36,
    )
    assert seventh["distillation"] == "ConvNext (hard)" and seventh["init"] == "row deit_b_dist"
    with Image.open(plot) as image:
        assert image.size[0] > 300 and len(np.unique(np.asarray(image.convert("L")))) > 10
    logged = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`kdgrid.table_of` = 'table2b'"
    )
    assert len(logged) == 1
    artifacts = {a.path for a in client.list_artifacts(logged[0].info.run_id, "table")}
    assert artifacts == {"table/table2b.json", "table/table2b.png"}


def test_markdown_and_csv_list_rows_that_did_not_run(table2b_smoke):
    workdir, _ = table2b_smoke
    # table2a never ran in this store: every row is listed, none dropped, state "not run".
    md = table(workdir, "grids/table2a.yaml", "--smoke", "--no-log")
    assert md.returncode == 0, md.stderr
    lines = [line for line in md.stdout.splitlines() if line.startswith("| 2a-")]
    assert len(lines) == 4 and all(line.rstrip().endswith("not run |") for line in lines)
    assert "| 84.55 |" in md.stdout  # the paper's acc@1 of 2a-1 is still shown
    csv_out = table(workdir, "grids/table2b.yaml", "--smoke", "--format", "csv", "--no-log")
    parsed = list(csv.reader(io.StringIO(csv_out.stdout)))
    assert parsed[0][:3] == ["label", "model", "distillation"] and len(parsed) == 11


def test_vit2cnn_table_has_clustering_columns():
    grid = load_grid(REPO / "grids" / "vit2cnn.yaml", smoke=True)
    assert cluster_columns(grid) == [
        "cluster/cub/nmi",
        "cluster/cub/ari",
        "cluster/cifar10/nmi",
        "cluster/cifar10/ari",
    ]


def test_bad_grid_is_exit_2(tmp_path):
    (tmp_path / "g.yaml").write_text("name: [unclosed\n")
    result = table(tmp_path, "g.yaml")
    assert result.returncode == 2
    assert "g.yaml:2:1: YAML syntax error" in result.stderr and "Traceback" not in result.stderr
