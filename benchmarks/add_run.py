"""Commit one `unpoison run` result to benchmarks/results/ so make_results.py tables it.

    python benchmarks/add_run.py runs/badnets-none --folder quick-cifar10-runs \
        --command "unpoison run --profile quick --attack badnets --defense none --out runs/badnets-none"

`unpoison bench --results ...` does this for whole grids; this is for single runs (for
example one measured through a job queue). The run's metrics.json is copied as
<folder>/<dataset>.<attack>.<defense>[.<detector>].<model>.s<seed>.json with the command
recorded in it (make_results.py prints it as the table's provenance). A run of a defence
with non-default settings gets its own row and file with --label (e.g. --label dlp-no-au),
so it is never averaged with the default's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unpoison.bench import nonstandard_rate

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run's output folder (holds metrics.json)")
    parser.add_argument("--folder", required=True, help="benchmarks/results/<folder>")
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--label", default=None, help="the defence's row label when its settings are not the default")
    args = parser.parse_args(argv)
    source = Path(args.run) / "metrics.json"
    if not source.is_file():
        print(f"{source} not found: has the run finished?", file=sys.stderr)
        return 1
    metrics = json.loads(source.read_text())
    metrics["bench"] = {**metrics.get("bench", {}), "command": args.command}
    if args.label:
        metrics["bench"]["spec"] = {**metrics["bench"].get("spec", {}), "defense": args.label}
    rate = nonstandard_rate(metrics)
    rate_part = f"rate{rate:g}" if rate is not None else None
    parts = [metrics["dataset"], metrics["attack"], rate_part, args.label or metrics["defense"], metrics.get("detector"),
             metrics["model"], f"s{metrics['seed']}"]
    target = HERE / "results" / args.folder / (".".join(p for p in parts if p) + ".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
