"""The grid language: one YAML file (+ CLI overrides) -> validated, frozen, named rows.

    name: table2b                 # grid name (tags, output folder)
    experiment: kd-table2b        # MLflow experiment
    defaults: {...}               # the base row (see kd.config.RowConfig)
    recipes: {deit: {...}}        # named partial rows, picked by a row's `recipe`
    axes: {values: {...}, ...}    # a product of axes -> rows (optional)
    rows: [{id: ..., label: ...}] # explicit rows (optional)

A row is `defaults` <- its recipe <- the row itself <- CLI overrides, then interpolated by
OmegaConf and checked against `kd.config`. Every problem of every row is collected and raised
at once as a `GridError`, before anything runs. Rows that reference other rows (`teacher.row`,
`init.row`) form a DAG; the content `key` of a row hashes what changes its result, with
references replaced by the referenced row's key, so a changed teacher changes its students'
keys too.

    parse.py    the YAML file and the overrides (Hydra's grammar)
    trees.py    plain-dict trees: dotted keys, merges, overrides applied, interpolation
    axes.py     `axes:` -> rows
    compose.py  one row's tree: defaults <- recipe <- row <- overrides; the grid's sections
    checks.py   checks across keys and rows (ids, references, KD terms, models, files, data)
    keys.py     dependency order and content keys
    rows.py     Row, Grid, GridError
    load.py     load_grid: all of the above in order
"""

from kd.grid.keys import content_key
from kd.grid.load import load_grid
from kd.grid.rows import (
    Grid,
    GridError,
    Row,
    dependency_checkpoint,
    row_dependencies,
    split_row_names,
)

__all__ = [
    "Grid",
    "GridError",
    "Row",
    "content_key",
    "dependency_checkpoint",
    "load_grid",
    "row_dependencies",
    "split_row_names",
]
