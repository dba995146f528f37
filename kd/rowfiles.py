"""The names of the files kdgrid writes, in one place: a row's folder and a grid's output folder.

A row's folder is `<output_dir>/<row id>/`; the launcher, the job, the training loop, status and
the checkpoint readers of other rows all find files there by these names, so a name is changed
here or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kd.grid import Row

# A row's folder: <output_dir>/<row id>/
ROW_JSON = "row.json"  # the resolved row the job trains (written by the launcher)
ROW_YAML = "row.yaml"  # the same row as YAML, also logged to MLflow
TRAIN_LOG = "train.log"  # the local executor's log of the row
STATE = "state.pt"  # everything to resume after the last saved epoch
STATE_INFO = "state.json"  # run id, key and epoch of state.pt, readable without torch
BEST = "best.pt"  # timm-style {"model": state_dict} of the best epoch: what dependents read
LAST = "last.pt"  # the same for the last epoch
PROGRESS = "progress.json"  # epoch, step and ETA, for the local executor's display
CLUSTER_DIR = "cluster"  # t-SNE maps of the embedding clustering

CHECKPOINTS = (STATE, STATE_INFO, BEST, LAST, PROGRESS)  # written atomically every epoch

# A grid's output folder: <output_dir>/
SUBMISSIONS = "submissions.jsonl"  # one line per submitted row: key, run id, executor, job id
LAUNCH_LOCK = ".launch.lock"  # two launches of one grid take turns
SLURM_DIR = "slurm"  # submitit's job folders and SLURM logs


def best_checkpoint(row_folder: Path) -> Path:
    """The checkpoint a dependent row reads from another row's folder."""
    return row_folder / BEST


def saved_state_info(row: Row, run_id: str | None) -> dict[str, Any] | None:
    """What the row's folder says of its saved state (state.json: run id, key, epoch), when
    that state is this run's and this row's (same content key); else None. Read without torch."""
    try:
        info = json.loads((row.output_dir / STATE_INFO).read_text())
    except (OSError, ValueError):
        return None
    if info.get("run_id") != run_id or info.get("key") != row.key:
        return None
    return info
