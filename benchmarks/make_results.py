"""Regenerate the measured tables of benchmarks/RESULTS.md from the committed results.

    python benchmarks/make_results.py            # rewrite the generated part of RESULTS.md
    python benchmarks/make_results.py --check    # exit 1 if RESULTS.md is not up to date

Reads benchmarks/results/<grid>/<cell id>.json (each one a cell's metrics.json, written
there by `unpoison bench --results benchmarks/results/<grid>`), and the papers' numbers
from benchmarks/paper_results.yaml. Only the text between the two markers below is
replaced; everything else in RESULTS.md (the prose) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from unpoison import bench
from unpoison.report import tables

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START = "<!-- generated:start: python benchmarks/make_results.py writes everything down to generated:end -->"
END = "<!-- generated:end -->"
SKELETON = f"""# Measured results

Every number in the tables below comes from a committed `metrics.json` under
`benchmarks/results/`, produced by the command printed above each table, on the machine
and with the versions printed there. `python benchmarks/make_results.py` regenerates
the tables; do not edit them by hand.

{START}
{END}
"""


def load_results(folder: Path) -> list[dict]:
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path} is not valid JSON: {exc}") from None
    return results


def expected_cells(results: list[dict]) -> list[bench.Cell] | None:
    """The cells of the grid the results came from (None when its file is not in the repo)."""
    files = {m.get("bench", {}).get("grid_file") for m in results} - {None, ""}
    for name in files:
        path = Path(name) if Path(name).is_absolute() else REPO / name
        if path.is_file():
            return bench.load_grid(path).cells()
    return None


def in_grid_order(results: list[dict], cells: list[bench.Cell] | None) -> list[dict]:
    """The grid's order (clean baseline first, no defence first), from the grid file when it
    is there, else from the position each cell recorded."""
    if cells is None:
        return sorted(results, key=lambda m: m.get("bench", {}).get("position") or 0)
    rank = {c.id: i for i, c in enumerate(cells)}
    return sorted(results, key=lambda m: rank.get(m.get("bench", {}).get("cell"), len(rank)))


def stale(results: list[dict], cells: list[bench.Cell] | None, folder: Path) -> list[str]:
    """Cells whose committed result was made with other settings than the grid and the
    code give now (`unpoison bench` would rerun them)."""
    if cells is None:
        return []
    by_id = {c.id: c for c in cells}
    return [m["bench"]["cell"] for m in results if m.get("bench", {}).get("cell") in by_id
            and bench.stored_result(folder / f"{m['bench']['cell']}.json", by_id[m["bench"]["cell"]]) is None]


def ca_asr(mean_ca: Any, std_ca: Any, mean_asr: Any, std_asr: Any) -> str:
    return f"{tables.pct_pm(mean_ca, std_ca, 1)} / {tables.pct_pm(mean_asr, std_asr, 1)}"


def comparison_table(part: list[dict], papers: dict[str, Any]) -> str:
    """One row per defence with our CA / ASR per attack, each followed by the papers' rows."""
    dataset = part[0]["dataset"]
    attacks = list(dict.fromkeys(s["attack"] for s in part))
    defenses = list(dict.fromkeys(s["defense"] for s in part))
    ours = {(s["attack"], s["defense"]): s for s in part}
    rows = []
    for defense in defenses:
        cells = []
        for attack in attacks:
            s = ours.get((attack, defense))
            cells.append(ca_asr(s["clean_acc_mean"], s["clean_acc_std"], s["asr_mean"], s["asr_std"]) if s else "")
        rows.append([f"**{defense}**", f"ours ({part[0]['model']}, {part[0]['profile']})", *cells])
        for key, paper in papers.items():
            numbers = paper["ca_asr"].get(defense)
            if paper.get("dataset") != dataset or not numbers or not set(numbers) & set(attacks):
                continue
            cells = [f"{numbers[a][0]:.1f} / {numbers[a][1]:.1f}" if a in numbers else "" for a in attacks]
            rows.append(["", f"{paper['title']} ({paper['network']})", *cells])
    return tables.markdown_table(["defence", "source", *attacks], rows)


def paper_notes(attacks: list[str], papers: dict[str, Any], dataset: str) -> str:
    lines = []
    for paper in papers.values():
        shown = [a for a in attacks if a in paper["attacks"]]
        if paper.get("dataset") != dataset or not shown:
            continue
        names = ", ".join(f"{a} = {paper['attacks'][a]}" for a in shown)
        lines.append(f"- {paper['title']}: {names}; {paper.get('note', '')}".rstrip("; "))
    return ("The papers' attack names for our columns:\n" + "\n".join(lines) + "\n") if lines else ""


def grid_section(name: str, folder: Path, results: list[dict], papers: dict[str, Any]) -> str:
    cells = expected_cells(results)
    results = in_grid_order(results, cells)
    done = {m.get("bench", {}).get("cell") for m in results}
    total = len(cells) if cells is not None else len(results)
    lines = [f"## `{name}`\n", f"{len(results)} of {total} cells measured.\n"]
    lines += bench.provenance(results)
    summary = bench.summarize(results)
    for (dataset, model, profile), part in bench.split_by_setting(summary).items():
        lines.append(f"\n### {dataset}, {model}, profile {profile}: CA / ASR (%), ours beside the papers\n")
        lines.append("Ours: mean \u00b1 std over the seeds listed below; an empty cell was not run.\n")
        lines.append(comparison_table(part, papers))
        lines.append(paper_notes(list(dict.fromkeys(s["attack"] for s in part)), papers, dataset))
        lines.append(f"\n### {dataset}, {model}, profile {profile}: all measurements\n")
        lines.append(bench.summary_table(part))
    if cells is not None and len(done) < len(cells):
        missing = [c.id for c in cells if c.id not in done]
        lines.append(f"\nNot measured yet ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing) + "\n")
    outdated = stale(results, cells, folder)
    if outdated:
        lines.append(f"\n**Stale** ({len(outdated)}: the grid or the code's defaults changed since these ran; "
                     "rerun the grid to replace them): " + ", ".join(f"`{m}`" for m in outdated) + "\n")
    return "\n".join(lines)


def generate(results_root: Path, papers_file: Path) -> str:
    papers = yaml.safe_load(papers_file.read_text())
    sections = []
    for folder in sorted(p for p in results_root.iterdir() if p.is_dir()) if results_root.is_dir() else []:
        results = load_results(folder)
        if results:
            sections.append(grid_section(folder.name, folder, results, papers))
    if not sections:
        return ("No results are committed yet. Run a grid with `--results benchmarks/results/<grid>`, e.g.\n"
                "`unpoison bench --grid configs/quick-cifar10.yaml --out runs/quick-cifar10 "
                "--results benchmarks/results/quick-cifar10`, then this script.\n")
    return "\n".join(sections)


def fill(document: str, generated: str) -> str:
    """Replace what lies between the markers (adding them at the end when absent)."""
    if START not in document or END not in document:
        document = document.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = document.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{generated.strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of <grid>/<cell id>.json")
    parser.add_argument("--papers", default=str(HERE / "paper_results.yaml"))
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    out = Path(args.out)
    current = out.read_text() if out.is_file() else SKELETON
    updated = fill(current, generate(Path(args.results), Path(args.papers)))
    if args.check:
        if updated != current:
            print(f"{out} is out of date: run python benchmarks/make_results.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(updated)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
