"""Budget curves of the seed defences: CA and ASR against wall time at 1x, 2x and 4x the quick
budget of each method's long stage (DLP: ASSFT epochs, CBD: f_C epochs, D-ST: SS-CTL epochs).

    python benchmarks/budget_curves.py --out /work/runs/budget --dry-run      # the commands
    python benchmarks/budget_curves.py --out /work/runs/budget --lock /work/cpu.lock --cpu 1
    python benchmarks/budget_curves.py --out /work/runs/budget --table-only   # table + figure

Every point is one `unpoison run --profile quick --epochs N --resume` (so a killed point
continues where it stopped; rerunning the script skips finished points). Stages before the
long one come from the model cache where their recipe does not depend on the budget (DLP's
SL model, D-ST's SD model); CBD's f_B is 5 % of f_C's length, so it grows with the budget. The
schedules of the long stages depend on their length (cosine, one-cycle), so a longer point is
trained from the start of its stage, not continued from the shorter one's checkpoint.

The reference lines are the no-defence and clean-training runs of the same poisoned set on the
same machine (run first, `--defense none`). Writes OUT/budget_curves.md (table with each
point's wall time and command) and OUT/budget_curves.png (CA and ASR against wall time).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

# the long stage's quick length; `--epochs` sets it (Defense.main_epochs)
QUICK_EPOCHS = {"dlp": 7, "cbd": 10, "dst": 6}


def points(methods: list[str], multipliers: list[int]) -> list[tuple[str, int, int]]:
    """(method, multiplier, epochs of its long stage) for every point of the curves."""
    return [(m, k, QUICK_EPOCHS[m] * k) for m in methods for k in multipliers]


def command(args, name: str, attack: str, defense: str, epochs: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "unpoison.cli", "run", "--dataset", args.dataset, "--attack", attack,
           "--defense", defense, "--profile", "quick", "--seed", str(args.seed), "--no-progress", "--resume",
           "--monitor", "stages", "--out", str(Path(args.out) / name)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    prefix = []
    if args.lock:
        prefix += ["flock", args.lock]
    if args.cpu is not None:
        prefix += ["taskset", "-c", str(args.cpu), "env", "OMP_NUM_THREADS=1"]
    return prefix + cmd


def runs(args) -> list[tuple[str, dict, list[str]]]:
    """(folder name, what the point is, command) for the references and every point."""
    out = [("clean", {"kind": "clean"}, command(args, "clean", "none", "none", None)),
           (f"none-{args.attack}", {"kind": "no defence"}, command(args, f"none-{args.attack}", args.attack, "none", None))]
    for method, k, epochs in points(args.methods, args.multipliers):
        name = f"{method}-{args.attack}-x{k}"
        out.append((name, {"kind": method, "multiplier": k, "epochs": epochs},
                    command(args, name, args.attack, method, epochs)))
    return out


def load(folder: Path) -> dict | None:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(args, plan) -> str:
    lines = [f"Budget curves: {args.dataset}, {args.attack}, quick profile, seed {args.seed} "
             f"(`python benchmarks/budget_curves.py --out {args.out}`)", "",
             "| run | long stage epochs | CA (%) | ASR (%) | wall (min) | command |", "|---|---|---|---|---|---|"]
    for name, what, cmd in plan:
        m = load(Path(args.out) / name)
        shown = " ".join(shlex.quote(c) for c in cmd[cmd.index(sys.executable) + 3:]) if sys.executable in cmd else ""
        if m is None:
            lines.append(f"| {name} | {what.get('epochs', '-')} | not run | | | `unpoison {shown}` |")
            continue
        asr = "-" if args.attack == "none" or what["kind"] == "clean" else f"{100 * m['asr']:.2f}"
        lines.append(f"| {name} | {what.get('epochs', '-')} | {100 * m['clean_acc']:.2f} | {asr} | "
                     f"{m['wall_seconds'] / 60:.1f} | `unpoison {shown}` |")
    return "\n".join(lines) + "\n"


def figure(args, plan, path: Path) -> bool:
    from matplotlib.figure import Figure

    refs = {what["kind"]: load(Path(args.out) / name) for name, what, _ in plan if what["kind"] in ("clean", "no defence")}
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = {"clean_acc": fig.add_subplot(1, 2, 1), "asr": fig.add_subplot(1, 2, 2)}
    drawn = False
    for method in args.methods:
        found = [(load(Path(args.out) / name), what) for name, what, _ in plan if what["kind"] == method]
        found = [(m, w) for m, w in found if m is not None]
        if not found:
            continue
        drawn = True
        for key, ax in axes.items():
            ax.plot([m["wall_seconds"] / 60 for m, _ in found], [100 * m[key] for m, _ in found], "o-", label=method)
            for m, w in found:
                ax.annotate(f"{w['multiplier']}x", (m["wall_seconds"] / 60, 100 * m[key]), fontsize=8)
    for key, ax in axes.items():
        for kind, style in (("clean", ":"), ("no defence", "--")):
            if refs.get(kind) is not None and not (key == "asr" and kind == "clean"):
                ax.axhline(100 * refs[kind][key], color="grey", linestyle=style, label=kind)
        ax.set_xlabel("wall time (min)")
        ax.set_ylabel({"clean_acc": "CA (%)", "asr": "ASR (%)"}[key])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if drawn:
        fig.savefig(path, dpi=100)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, the table and the figure")
    parser.add_argument("--methods", nargs="+", default=["dlp", "cbd", "dst"], choices=sorted(QUICK_EPOCHS))
    parser.add_argument("--multipliers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lock", default=None, help="run each point under `flock LOCK` (a shared CPU)")
    parser.add_argument("--cpu", type=int, default=None, help="pin each point to this core, one thread")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--table-only", action="store_true", help="only (re)write the table and figure")
    args = parser.parse_args(argv)
    plan = runs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, _, cmd in plan:
        if args.dry_run:
            print(" ".join(shlex.quote(c) for c in cmd))
            continue
        if args.table_only or load(out / name) is not None:
            continue
        print(f"[budget] {name}", file=sys.stderr, flush=True)
        with open(out / f"{name}.log", "a") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            print(f"[budget] {name} failed (exit {done.returncode}); see {out / name}.log", file=sys.stderr)
    if args.dry_run:
        return 0
    (out / "budget_curves.md").write_text(table(args, plan))
    drew = figure(args, plan, out / "budget_curves.png")
    print(f"wrote {out / 'budget_curves.md'}" + (f" and {out / 'budget_curves.png'}" if drew else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
