"""The baselines' tables for RESULTS.md, from committed single-run results (issue 19).

    python benchmarks/baseline_tables.py benchmarks/results/baselines-cpu

Prints two Markdown tables: defences (CA / ASR beside the DLP paper's Table 3, and wall time
as a ratio to the no-defence run: the shortest no-defence wall time among the runs, i.e. the
one measured with the core to itself), and detectors (AUROC, recall at 10 %
flagged, the detector's own flags). Each row's command is in its JSON (`bench.command`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def main(folder: str) -> int:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    paper = yaml.safe_load((HERE / "paper_results.yaml").read_text())["dlp-table3"]["ca_asr"]
    none_wall = {m["attack"]: m["wall_seconds"] for m in runs if m["defense"] == "none" and not m.get("detector")}
    print("| attack | defence | CA | ASR | DLP Table 3 CA / ASR | wall / no-defence | repair stages (s) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in runs:
        if m.get("detector"):
            continue
        label = m.get("bench", {}).get("spec", {}).get("defense", m["defense"])
        ref = paper.get(m["defense"], {}).get(m["attack"])
        shown_ref = f"{ref[0]:.2f} / {ref[1]:.2f}" if ref and label == m["defense"] else "-"
        repair = sum(s["seconds"] for s in m["stages"] if s["name"] != "train")
        # the no-defence training time measured on a quiet core (the shortest no-defence run)
        base = min(none_wall.values()) if none_wall else None
        # a repair baseline reuses the cached no-defence model: its cost is that model plus the repair
        ratio = "1.00" if m["defense"] == "none" else (
            f"{(base + repair) / base:.2f} (+{repair / base:.2f})" if base else "-")
        print(f"| {m['attack']} | {label} | {pct(m['clean_acc'])} | {pct(m['asr'])} | {shown_ref} | {ratio} | "
              f"{repair:.0f} | {(m['notes'] or [''])[-1][:90]} |")
    print()
    print("| attack | detector | AUROC | recall at 10 % flagged | flagged | precision | recall | seconds (model cached) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in runs:
        if not m.get("detector"):
            continue
        d = m["detection"]
        label = m.get("bench", {}).get("spec", {}).get("defense", m["detector"])
        seconds = sum(s["seconds"] for s in m["stages"] if s["name"] != "train")
        print(f"| {m['attack']} | {label} | {d['auroc']:.4f} | {pct(d.get('recall_at_10_percent'))} | "
              f"{d['n_flagged']} | {pct(d['precision'])} | {pct(d['recall'])} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
