"""`unpoison bench`: run a grid of cells (or one shard of it), or merge shard folders."""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import add_runtime_options


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a grid of attacks x defences x models x seeds: results.csv/.md, plots",
                       description="Run every cell of a grid (configs/*.yaml) with `unpoison run`, skipping cells "
                                   "already done, and write OUT/results.csv, OUT/results.md and OUT/plots/. "
                                   "Merge shard folders with --merge DIR... --out DIR.")
    p.add_argument("--grid", help="grid YAML (e.g. configs/quick-cifar10.yaml)")
    p.add_argument("--out", required=True, help="output folder (cells go to OUT/runs/<cell id>/)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only slice I of N (1 <= I <= N)")
    p.add_argument("--only", action="append", metavar="KEY=V1,V2",
                   help="run only matching cells (keys: dataset, attack, defense, model, seed); repeatable")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="committed results folder (e.g. benchmarks/results/quick-cifar10): cells found there "
                        "are not rerun, finished cells are copied there as <cell id>.json")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="run the cells whose attack and defence exist, skip the others (default: refuse the grid)")
    p.add_argument("--profile", choices=["smoke", "quick", "paper"], default=None,
                   help="run the grid at this profile instead of its own (e.g. smoke: the whole grid in minutes, "
                        "to check that every cell runs)")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes (the running cell at its next epoch end, after its "
                        "checkpoint); the same command again continues the grid (exit status 3 while cells are left)")
    p.add_argument("--list", action="store_true", help="print the cells and whether each is done, then stop")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="join these bench folders (shards of one grid) into --out and write its tables")
    p.add_argument("--data-root", default=None, help="folder with the datasets (default: $UNPOISON_DATA)")
    add_runtime_options(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench

    if args.merge:
        if args.grid or args.shard:
            raise SystemExit("--merge takes bench folders and --out only")
        grid = bench.merge(args.merge, args.out)
        return _finish(bench.write_tables(args.out, grid), args.out)
    if not args.grid:
        raise SystemExit("unpoison bench needs --grid GRID.yaml (or --merge DIR... to join shards)")

    grid = bench.load_grid(args.grid)
    if args.profile:  # into the grid itself, so grid.json (and a later --merge) knows it too
        grid = bench.Grid.from_dict({**grid.raw, "profile": args.profile}, grid.source)
    cells = bench.select(grid.cells(), args.only)
    if args.shard:
        cells = bench.shard(cells, *bench.parse_shard(args.shard))
    if args.list:
        from pathlib import Path

        for cell in cells:
            done = bench.stored_result(bench.cell_dir(Path(args.out), cell) / "metrics.json", cell)
            print(f"{'done' if done else 'todo'}  {cell.id}  profile={cell.profile}")
        return 0

    skipped = []
    if args.skip_unavailable:
        skipped = bench.unavailable(cells)
        cells = [c for c in cells if c not in skipped]
    problems = bench.check_cells(cells)
    if problems:
        print("unpoison bench: the grid cannot run as written:\n  " + "\n  ".join(problems)
              + ("\n(--skip-unavailable runs the cells whose methods exist)" if not args.skip_unavailable else ""),
              file=sys.stderr)
        return 2
    for cell in skipped:
        print(f"[bench] skipped (method not available): {cell.id}", file=sys.stderr)

    command = [f"--grid {args.grid}", f"--out {args.out}"]
    command += [f"--profile {args.profile}"] if args.profile else []
    command += [f"--shard {args.shard}"] if args.shard else []
    command += [f"--only {o}" for o in args.only or []]
    command += [f"--results {args.results}"] if args.results else []
    deadline = time.time() + 60 * args.budget if args.budget is not None else None
    options = bench.BenchOptions(data_root=args.data_root, device=args.device, precision=args.precision,
                                 progress=not args.no_progress, results=args.results,
                                 command="unpoison bench " + " ".join(command), deadline=deadline)
    try:
        outcome = bench.run_grid(grid, args.out, cells, options)
    except KeyboardInterrupt:
        print("[bench] interrupted: run the same command again to continue (finished cells are kept; the "
              "interrupted one resumes from its last finished epoch)", file=sys.stderr)
        _finish(bench.write_tables(args.out, grid), args.out)
        return 130
    print(f"[bench] ran {len(outcome['ran'])}, skipped {len(outcome['skipped'])} done, "
          f"failed {len(outcome['failed'])}, left {len(outcome['left'])}", file=sys.stderr)
    _finish(bench.write_tables(args.out, grid), args.out)
    if outcome["failed"]:
        print("[bench] failed cells (see OUT/runs/<cell>/error.txt; rerun to retry): " + ", ".join(outcome["failed"]),
              file=sys.stderr)
    if outcome["left"]:
        print(f"[bench] time budget spent with {len(outcome['left'])} cells left: run the same command again "
              f"(same --out) to continue", file=sys.stderr)
        return 3
    return 1 if outcome["failed"] else 0


def _finish(written: dict, out: str) -> int:
    print(f"[bench] {written['finished']} cells in {out}/results.md and results.csv"
          + (f"; {len(written['missing'])} not finished" if written["missing"] else ""), file=sys.stderr)
    return 0
