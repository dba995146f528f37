"""kd.preflight and kd.models.hub: which pretrained tags a launch's rows load, found in a real
Hugging Face hub cache (built here with a tiny timm model's weights) or reported missing with
the row and the tag. (A model built with the hub offline from that cache: tests/e2e.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from codecopy import TINY_PRETRAINED, make_hf_cache

from kd.grid import load_grid
from kd.models import hub
from kd.preflight import check_weights, pretrained_needs

GRID = """
name: pre
experiment: kd-pre
defaults:
  student: {model: test_resnet}
  init: scratch
  data: {dataset: imagefolder, root: /nonexistent, img_size: 32}
rows:
  - {id: scratch_row, label: A}
  - {id: pretrained_row, label: B, init: pretrained, student: {model: TINY}}
  - {id: tagged_row, label: C, init: {pretrained: r160_in1k}}
  - {id: from_row, label: D, init: {row: scratch_row}, teacher: {row: pretrained_row}, kd: {ce: 0.5, ikd: 0.5}}
  - {id: named_teacher, label: E, teacher: {model: TINY}, kd: {ce: 0.5, ikd: 0.5}}
  - {id: teacher_no_weights, label: F, teacher: {model: test_resnet, pretrained: false}, kd: {ce: 0.5, ikd: 0.5}}
""".replace("TINY", TINY_PRETRAINED)


@pytest.fixture
def grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "pre.yaml"
    path.write_text(GRID)
    return path


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home, made the cache huggingface_hub reads in this process."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the network from a unit test
    return home


def test_the_rows_that_load_pretrained_weights_and_their_tags(grid_file: Path) -> None:
    grid = load_grid(grid_file, check_data=False)
    needs = [(n.row.id, n.role, n.name) for n in pretrained_needs(grid.rows)]
    assert needs == [
        ("pretrained_row", "init", TINY_PRETRAINED),
        ("tagged_row", "init", TINY_PRETRAINED),  # the model's name plus init's tag
        ("named_teacher", "teacher", TINY_PRETRAINED),
    ]
    smoke = load_grid(grid_file, smoke=True, check_data=False)
    assert pretrained_needs(smoke.rows) == []  # tiny models from scratch: no weights


def test_timm_reads_the_tag_from_its_hub_repo() -> None:
    source = hub.weight_source(TINY_PRETRAINED)
    assert source.hf_repo == f"timm/{TINY_PRETRAINED}"
    assert source.hf_files == ("model.safetensors", "pytorch_model.bin")  # timm's order


def test_cached_weights_pass_and_jobs_may_run_offline(grid_file: Path, hf_cache: Path) -> None:
    make_hf_cache(hf_cache)
    grid = load_grid(grid_file, check_data=False)
    check = check_weights(grid.rows)
    assert (check.problems, check.notes, check.all_cached) == ([], [], True)
    assert check.names == [TINY_PRETRAINED]


def test_missing_weights_name_each_row_and_tag(grid_file: Path, hf_cache: Path) -> None:
    grid = load_grid(grid_file, check_data=False)
    check = check_weights(grid.rows)
    assert not check.all_cached
    assert len(check.problems) == 3
    first = check.problems[0]
    assert f"row 'pretrained_row' (B): init: pretrained weights '{TINY_PRETRAINED}'" in first
    assert "HF_HUB_OFFLINE is set here" in first  # why it cannot be downloaded
    for hint in ("--prefetch", "HF_HOME", "init.file"):
        assert hint in first, hint
    assert "row 'named_teacher' (E): teacher:" in check.problems[2]
    assert "teacher.file" in check.problems[2]
