"""The table of a grid with replicates (`seeds: N`): one line per row, its replicates' acc@1
summarised (mean ± std, n, 95 % t interval, kd/stats.py) and whether the paper's number lies in
that interval; the plot draws each row's mean with its interval as an error bar. A row with
`paper.baseline` also gets its gain over that row: the mean and t interval of the per-seed
differences (seed i against seed i), beside the paper's own gain.

Only finished replicates are counted; the state column says how many of the row's replicates
finished and what the others are doing, so a mean over fewer seeds is never hidden.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kd.grid import Grid
from kd.results import RowHeading, TableRow
from kd.stats import Summary, summarize


@dataclass(frozen=True)
class AggregateRow(RowHeading):  # label and id: the row's, before replication
    acc1: Summary  # over the finished replicates
    acc1_values: tuple[float, ...]  # each finished replicate's acc@1, in seed order
    acc5: float | None  # means over the finished replicates
    loss: float | None
    paper_acc1: float | None
    state: str  # "3/3 finished", "2/3 finished, 1 running"
    stale: tuple[str, ...] = ()  # ids of replicates trained from a since replaced checkpoint
    # `paper.baseline`: acc@1 minus the baseline row's, seed by seed (the seeds both finished)
    baseline: str | None = None  # the baseline row's label
    gain: Summary = Summary(0, None, None, None, None)
    paper_gain: float | None = None  # the paper's acc@1 minus the baseline's paper acc@1

    @property
    def paper_in_interval(self) -> bool | None:
        return self.acc1.contains(self.paper_acc1)


def _unreplicated(text: str) -> str:
    """'teacher@s0 (ikd)' -> 'teacher (ikd)': the row a replicate's teacher or init replicates."""
    return re.sub(r"@s[0-9]+", "", text)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _state(lines: Sequence[TableRow]) -> str:
    counts: dict[str, int] = {}
    for line in lines:
        state = f"{line.state} (stale)" if line.stale else line.state
        counts[state] = counts.get(state, 0) + 1
    finished = counts.pop("finished", 0)
    others = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"{finished}/{len(lines)} finished" + (f", {others}" if others else "")


def _by_seed(grid: Grid, done: Sequence[TableRow]) -> dict[int, float]:
    """Seed index -> acc@1 of a row's finished replicates (a row without replicates: seed 0)."""
    return {
        grid.replicate_of[line.id][2] if line.id in grid.replicate_of else 0: line.acc1
        for line in done
        if line.acc1 is not None
    }


def _gain(
    row: AggregateRow, seeds: dict[int, float], baseline: AggregateRow, base_seeds: dict[int, float]
) -> AggregateRow:
    """`row` with its paired gain over `baseline`: the t interval of the per-seed differences.
    Pairing removes what the two rows' seeds share (initial weights, batch order), so a gain
    can be clear while the rows' own intervals overlap."""
    shared = sorted(seeds.keys() & base_seeds.keys())
    papers = (row.paper_acc1, baseline.paper_acc1)
    return dataclasses.replace(
        row,
        baseline=baseline.label,
        gain=summarize([seeds[i] - base_seeds[i] for i in shared]),
        paper_gain=None if None in papers else papers[0] - papers[1],
    )


def aggregate(grid: Grid, table: Sequence[TableRow]) -> list[AggregateRow]:
    """`results.build_table`'s lines grouped by the row they replicate, in grid order; a row
    with `paper.baseline` also gets its gain over that row, paired by seed."""
    by_id = {line.id: line for line in table}
    out = []
    seeds: dict[str, dict[int, float]] = {}
    baselines: dict[str, str] = {}
    for base_id, rows in grid.replicate_groups().items():
        if rows[0].config.paper.baseline is not None:
            baselines[base_id] = rows[0].config.paper.baseline
        lines = [by_id[row.id] for row in rows]
        done = [line for line in lines if line.state == "finished" and line.acc1 is not None]
        first = lines[0]
        label = grid.replicate_of[first.id][1] if first.id in grid.replicate_of else first.label
        values = tuple(line.acc1 for line in done if line.acc1 is not None)
        seeds[base_id] = _by_seed(grid, done)
        out.append(
            AggregateRow(
                label=label,
                id=base_id,
                model=first.model,
                distillation=_unreplicated(first.distillation),
                recipe=first.recipe,
                init=_unreplicated(first.init),
                img_size=first.img_size,
                acc1=summarize(values),
                acc1_values=values,
                acc5=_mean([line.acc5 for line in done if line.acc5 is not None]),
                loss=_mean([line.loss for line in done if line.loss is not None]),
                paper_acc1=first.paper_acc1,
                state=_state(lines),
                stale=tuple(line.id for line in lines if line.stale),
            )
        )
    by_base = {row.id: row for row in out}
    return [
        _gain(row, seeds[row.id], by_base[baselines[row.id]], seeds[baselines[row.id]])
        if baselines.get(row.id) in by_base
        else row
        for row in out
    ]


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = [
    "label", "model", "distillation", "recipe", "init", "img", "acc@1 mean ± std", "n",
    "95% interval", "paper acc@1", "paper in interval", "gain over baseline (paired)",
    "paper gain", "acc@1 per seed", "acc@5", "test loss", "state",
]  # fmt: skip


def _gain_cell(row: AggregateRow) -> str:
    """'+0.51 [+0.32, +0.70] over C-CE, 3 seeds'; '-' without a baseline or a shared seed."""
    g = row.gain
    if row.baseline is None or g.mean is None:
        return "-"
    interval = "" if g.low is None else f" [{g.low:+.2f}, {g.high:+.2f}]"
    return f"{g.mean:+.2f}{interval} over {row.baseline}, {g.n} seed{'s' * (g.n != 1)}"


def _cells(row: AggregateRow) -> list[str]:
    s = row.acc1
    inside = row.paper_in_interval
    return [
        row.label,
        row.model,
        row.distillation,
        row.recipe,
        row.init,
        str(row.img_size),
        "-" if s.mean is None else _num(s.mean) + ("" if s.std is None else f" ± {s.std:.2f}"),
        str(s.n),
        "-" if s.low is None else f"[{s.low:.2f}, {s.high:.2f}]",
        _num(row.paper_acc1),
        "-" if inside is None else ("yes" if inside else "no"),
        _gain_cell(row),
        "-" if row.paper_gain is None else f"{row.paper_gain:+.2f}",
        ", ".join(f"{v:.2f}" for v in row.acc1_values) or "-",
        _num(row.acc5),
        _num(row.loss, 3),
        row.state,
    ]


def to_markdown(rows: Sequence[AggregateRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[AggregateRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    writer.writerows(_cells(row) for row in rows)
    return out.getvalue()


def to_json(rows: Sequence[AggregateRow]) -> str:
    return json.dumps(
        [asdict(r) | {"paper_in_interval": r.paper_in_interval} for r in rows], indent=1
    )


def plot(rows: Sequence[AggregateRow], path: str | Path, title: str) -> Path:
    """Each row's mean acc@1 with its 95 % interval as an error bar, every replicate as a dot,
    and the paper's number as a cross; the y axis spans the values (not 0-100), so that
    differences of a point between rows stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = [row for row in rows if row.baseline is not None]
    fig, axes = plt.subplots(
        1, 2 if gains else 1, figsize=(max(6, 0.8 * (len(rows) + len(gains)) + 3), 4.5),
        width_ratios=[len(rows), max(len(gains), 2)] if gains else None, squeeze=False,
    )  # fmt: skip
    ax = axes[0][0]
    shown: set[str] = set()

    def once(label: str) -> str | None:  # each legend entry once
        if label in shown:
            return None
        shown.add(label)
        return label

    for x, row in enumerate(rows):
        s = row.acc1
        if s.mean is None:
            ax.text(x, 0.02, row.state, rotation=90, ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform())  # fmt: skip
            continue
        error = None if s.low is None else [[s.mean - s.low], [s.high - s.mean]]
        ax.errorbar([x], [s.mean], yerr=error, fmt="o", color="#2f6fba", capsize=5,
                    label=once("measured mean, 95% interval"))  # fmt: skip
        ax.scatter([x] * len(row.acc1_values), row.acc1_values, s=12, color="#7fa7d6",
                   zorder=3, label=once("one seed"))  # fmt: skip
    papers = [(x, r.paper_acc1) for x, r in enumerate(rows) if r.paper_acc1 is not None]
    if papers:
        ax.scatter(*zip(*papers, strict=True), marker="x", s=50, color="#c0392b", zorder=4,
                   label="paper / reference")  # fmt: skip
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right")
    ax.set_ylabel("acc@1 (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if gains:
        _plot_gains(axes[0][1], gains)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_gains(ax, rows: Sequence[AggregateRow]) -> None:
    """Each row's gain over its baseline, paired by seed, with its 95 % interval, beside the
    paper's gain: an interval clear of the zero line is an ordering that holds at 95 %."""
    for x, row in enumerate(rows):
        g = row.gain
        if g.mean is None:
            continue
        error = None if g.low is None else [[g.mean - g.low], [g.high - g.mean]]
        ax.errorbar([x], [g.mean], yerr=error, fmt="o", color="#2f6fba", capsize=5,
                    label="measured" if x == 0 else None)  # fmt: skip
    papers = [(x, r.paper_gain) for x, r in enumerate(rows) if r.paper_gain is not None]
    if papers:
        ax.scatter(*zip(*papers, strict=True), marker="x", s=50, color="#c0392b", zorder=4,
                   label="paper / reference")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{r.label} - {r.baseline}" for r in rows], rotation=30,
                  ha="right")  # fmt: skip
    ax.set_ylabel("acc@1 gain, paired by seed (points)")
    ax.set_title("gain over the baseline row, 95% interval")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
