"""`unpoison bench`: a grid of `unpoison run` cells -> results.csv, results.md, plots.

A grid (YAML, see configs/quick-cifar10.yaml) crosses datasets x attacks x defences x
models x seeds; per-cell overrides change a profile, attack parameters or defence
settings where they match. Every cell runs in-process through `unpoison.run.run` into
OUT/runs/<cell id>/, in an order that lets cells share work: per (dataset, model,
seed) the clean baseline first, and per attack the no-defence cell before the
defences, so the backdoored model (and the attacks' reference models) come out of
the model cache (`artifacts.ModelCache`) instead of being trained again.

A cell whose metrics.json exists (and was made from the same settings) is skipped, so
an interrupted grid resumes; a half-finished cell continues from its checkpoints.
`--shard i/n` runs one slice (whole attack groups, so shards do not retrain each
other's backdoored models); `--merge` joins shard folders into the same tables. With
`--results DIR` finished cells are also copied to DIR/<cell id>.json (meant to be
committed: benchmarks/results/<grid>/) and cells found there are not rerun.

The package: `grid` (the YAML, its cells and the checks before running), `execute`
(shards, stored results, running cells, merging shard folders), `results` (tables and
plots of a finished grid).
"""

from .execute import (BenchOptions, cell_dir, command_line, merge, parse_shard, resolved_configs, run_grid, select,
                      shard, stored_result)
from .grid import BenchError, Cell, Grid, Variant, check_cells, load_grid, unavailable
from .results import (collect, command_template, flat_row, nonstandard_rate, provenance, split_by_setting, summarize,
                      summary_table, write_tables)

__all__ = ["BenchError", "BenchOptions", "Cell", "Grid", "Variant", "cell_dir", "check_cells", "collect", "command_line",
           "command_template", "flat_row", "load_grid", "merge", "nonstandard_rate", "parse_shard", "provenance",
           "resolved_configs", "run_grid", "select", "shard", "split_by_setting", "stored_result", "summarize",
           "summary_table", "unavailable", "write_tables"]
