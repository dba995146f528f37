"""The paper's table rebuilt from MLflow: one line per grid row, measured beside reported.

Rows keep the grid's (the paper's) order; a row that has not finished is shown with its state,
never dropped. Measured values are the last epoch's validation metrics of the row's latest
finished run; `diff` is measured minus paper. A finished row trained from a teacher (or init)
checkpoint that has since been replaced by a rerun is marked stale (kd/provenance.py).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kd.codesnap import code_note, read_code
from kd.grid import Grid, Row
from kd.provenance import stale_rows
from kd.tracking import TAG, RunSummary


@dataclass(frozen=True)
class RowHeading:
    """The columns that name a table's line, in every table (one run, or replicates)."""

    label: str
    id: str
    model: str
    distillation: str
    recipe: str
    init: str
    img_size: int


@dataclass(frozen=True)
class TableRow(RowHeading):
    state: str  # finished, or the state of the latest run (running, failed, ...) or not run
    acc1: float | None
    acc5: float | None
    loss: float | None
    params_m: float | None  # measured parameter count, millions
    paper_acc1: float | None
    paper_acc5: float | None
    paper_loss: float | None
    paper_params: str | None
    extra: Mapping[str, float]  # e.g. clustering NMI/ARI
    stale: str | None = None  # why a finished row no longer matches its dependencies' runs
    other_code: str | None = None  # a finished row trained by other code than the checkout

    @property
    def diff_acc1(self) -> float | None:
        if self.acc1 is None or self.paper_acc1 is None:
            return None
        return self.acc1 - self.paper_acc1


def cluster_columns(grid: Grid) -> list[str]:
    """NMI and ARI columns for every dataset a row of the grid clusters (vit2cnn's table)."""
    names = dict.fromkeys(name for row in grid.rows for name in row.config.evaluate.cluster)
    return [f"cluster/{name}/{metric}" for name in names for metric in ("nmi", "ari")]


def _describe(row: Row) -> tuple[str, str, str]:
    cfg = row.config
    model = cfg.paper.model or cfg.student.model
    terms = [t for t, w in cfg.kd.items() if w > 0 and t != "ce"]
    if cfg.paper.distillation:
        distillation = cfg.paper.distillation
    elif cfg.teacher is not None and terms:
        distillation = f"{cfg.teacher.row or cfg.teacher.model} ({'+'.join(terms)})"
    else:
        distillation = "No"
    init = cfg.init.source if cfg.init.source != "row" else f"row {cfg.init.row}"
    return model, distillation, init


def build_table(
    grid: Grid, runs: Mapping[str, RunSummary], extra_metrics: Sequence[str] = ()
) -> list[TableRow]:
    table = []
    stale_reasons = stale_rows(grid, {key: summary.record for key, summary in runs.items()})
    checkout = read_code()
    for row in grid.rows:
        summary = runs.get(row.key)
        state = "not run" if summary is None else summary.record.status.lower()
        finished = summary is not None and summary.record.status == "FINISHED"
        stale = stale_reasons.get(row.id)
        metrics = summary.metrics if finished else {}
        params = metrics.get("model/params")
        model, distillation, init = _describe(row)
        paper = row.config.paper
        table.append(
            TableRow(
                label=row.label,
                id=row.id,
                model=model,
                distillation=distillation,
                recipe=row.config.recipe or "-",
                init=init,
                img_size=row.config.data.img_size,
                state=state,
                acc1=metrics.get("val/acc1"),
                acc5=metrics.get("val/acc5"),
                loss=metrics.get("val/loss"),
                params_m=params / 1e6 if params is not None else None,
                paper_acc1=paper.acc1,
                paper_acc5=paper.acc5,
                paper_loss=paper.loss,
                paper_params=paper.params,
                extra={name: metrics[name] for name in extra_metrics if name in metrics},
                stale=stale,
                other_code=code_note(summary.record.tags, checkout, TAG) if finished else None,
            )
        )
    return table


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


COLUMNS = [
    "label", "model", "distillation", "recipe", "init", "img", "params (M)", "paper params",
    "acc@1", "paper acc@1", "diff", "acc@5", "paper acc@5", "test loss", "paper loss", "state",
]  # fmt: skip


def _cells(row: TableRow, extra: Sequence[str]) -> list[str]:
    cells = [
        row.label,
        row.model,
        row.distillation,
        row.recipe,
        row.init,
        str(row.img_size),
        _num(row.params_m, 1),
        row.paper_params or "-",
        _num(row.acc1),
        _num(row.paper_acc1),
        _num(row.diff_acc1, signed=True),
        _num(row.acc5),
        _num(row.paper_acc5),
        _num(row.loss, 3),
        _num(row.paper_loss, 3),
        f"{row.state} (stale)" if row.stale else row.state,
    ]
    return cells + [_num(row.extra.get(name), 3) for name in extra]


def to_markdown(table: Sequence[TableRow], extra: Sequence[str] = ()) -> str:
    headers = COLUMNS + list(extra)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cells(row, extra)) + " |" for row in table]
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[TableRow], extra: Sequence[str] = ()) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS + list(extra))
    for row in table:
        writer.writerow(_cells(row, extra))
    return out.getvalue()


def to_json(table: Sequence[TableRow]) -> str:
    return json.dumps([asdict(r) | {"diff_acc1": r.diff_acc1} for r in table], indent=1)


def plot(table: Sequence[TableRow], path: str | Path, title: str) -> Path:
    """Measured against paper acc@1 per row, as grouped bars; unfinished rows have no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in table]
    xs = range(len(table))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(table) + 2), 4))
    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [r.paper_acc1 or 0 for r in table],
        width,
        label="paper",
        color="#9aa5b1",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [r.acc1 or 0 for r in table],
        width,
        label="measured",
        color="#2f6fba",
    )
    for x, row in zip(xs, table, strict=True):
        if row.acc1 is None:
            ax.text(x + width / 2, 1, row.state, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=45 if len(table) > 8 else 0)
    ax.set_ylabel("acc@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
