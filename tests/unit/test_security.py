"""Secrets in the environment never reach MLflow; YAML is loaded safely."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.grid import GridError, load_grid
from kd.tracking import REDACTED, redact, row_params, row_yaml, secret_values

GRID = """\
name: sec
experiment: kd-sec
defaults:
  student: {model: resnet18}
  data: {dataset: cifar10, root: "/data/${oc.env:HF_TOKEN}/cifar"}
rows:
  - {id: a, label: A}
"""


def test_secret_values_by_name():
    env = {
        "HF_TOKEN": "hf_abcdef123",
        "DB_PASSWORD": "hunter2hunter2",
        "HOME": "/root",
        "API_KEY": "k",
    }
    assert secret_values(env) == ["hunter2hunter2", "hf_abcdef123"]  # short values are ignored


def test_secret_interpolated_into_a_row_is_redacted(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret_42")
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    (row,) = load_grid(path, check_data=False).rows
    assert "hf_supersecret_42" in row.config.data.root  # the job still gets the real value
    params = row_params(row)
    assert params["data.root"] == f"/data/{REDACTED}/cifar"
    assert all("hf_supersecret_42" not in v for v in params.values())
    assert "hf_supersecret_42" not in row_yaml(row)
    assert redact("x hf_supersecret_42 y") == f"x {REDACTED} y"


def test_yaml_python_tags_are_refused(tmp_path: Path):
    path = tmp_path / "grid.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\nrows: []\n")
    with pytest.raises(GridError) as info:
        load_grid(path, check_data=False)
    assert "grid.yaml" in str(info.value)
