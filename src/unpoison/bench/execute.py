"""Running a grid: shards and filters, a cell's folder and whether its stored result is still
valid, running the cells through `unpoison.run.run`, and merging shard folders."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..distributed import is_main, main_decides
from ..io import atomic_write_text, write_json
from ..runtime import TimeBudgetSpent
from ..report import tables
from .grid import MATCH_KEYS, BenchError, Cell, Grid

CELL_FILES = ("metrics.json", "report.html", "trigger.npz", "scores.npz", "log.jsonl")  # what a merge copies


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise BenchError(f"--shard takes I/N with 1 <= I <= N (e.g. 2/4), got {text!r}")
    return int(match[1]), int(match[2])


def shard(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """Slice `index` (1-based) of `count`. Whole groups (cells sharing a backdoored model)
    are dealt to the least-loaded shard, largest first; with fewer groups than shards,
    cells are dealt one by one. Every shard computes the same partition from the grid."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    if len(groups) < count:
        return [cell for i, cell in enumerate(cells) if i % count == index - 1]
    loads = [0] * count
    owner: dict[tuple, int] = {}
    for key in sorted(groups, key=lambda k: -len(groups[k])):  # sorted() is stable: grid order breaks ties
        target = loads.index(min(loads))
        owner[key] = target
        loads[target] += len(groups[key])
    return [cell for cell in cells if owner[cell.group] == index - 1]


def select(cells: Sequence[Cell], only: Sequence[str] | None) -> list[Cell]:
    """Keep cells matching every `KEY=V1,V2` filter (keys: dataset, attack, defense, model, seed)."""
    rule: dict[str, list] = {}
    for text in only or []:
        key, _, values = text.partition("=")
        if key not in MATCH_KEYS or not values:
            raise BenchError(f"--only takes KEY=V1[,V2...] with KEY one of {', '.join(MATCH_KEYS)}, got {text!r}")
        rule[key] = [int(v) if key == "seed" else v for v in values.split(",")]
    return [c for c in cells if c.matches(rule)]


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.id


def stored_result(path: Path, cell: Cell) -> dict | None:
    """The metrics at `path` if they exist and were made from this cell's settings, and
    with the attack and defence configuration the current code resolves them to (so a
    changed profile or default reruns the cell instead of leaving an old number)."""
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if metrics.get("bench", {}).get("spec") != _plain(cell.spec()):
        return None
    expected = resolved_configs(cell)
    if expected:
        attack, defense = metrics.get("attack_config") or {}, metrics.get("defense_config")
        # attacks add what they find while poisoning (TrojanNN's activations, WaNet's noise
        # count) to their description: compare only what the settings alone determine
        if defense != expected["defense_config"] or any(
                attack.get(k) != v for k, v in expected["attack_config"].items() if v is not None):
            return None
    return metrics


def resolved_configs(cell: Cell) -> dict[str, Any] | None:
    """attack_config and defense_config as `unpoison run` would record them for this cell
    now, before it runs; None where a method is not installed here (results can still be
    merged)."""
    from ..attacks import build_attack
    from ..defenses import build_defense

    try:
        return _plain({"attack_config": build_attack(cell.attack_name, **cell.attack_params).describe(),
                       "defense_config": build_defense(cell.defense_name, cell.profile, cell.model,
                                                       **cell.defense_params).describe()})
    except (ValueError, TypeError, ImportError):
        return None


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


@dataclass
class BenchOptions:
    data_root: str | None = None
    device: str = "auto"
    precision: str = "auto"
    progress: bool = False
    results: str | None = None     # committed results folder (benchmarks/results/<grid>)
    command: str = ""              # the command line, recorded with every cell
    deadline: float | None = None  # time.time() at which to stop (`--budget`): the cell running
                                   # then stops at its next epoch end, after its checkpoint


def run_grid(grid: Grid, out: str | Path, cells: Sequence[Cell], options: BenchOptions) -> dict[str, list[str]]:
    """Run `cells` (a selection of grid.cells()) into OUT; returns {'ran','skipped','failed',
    'left'} ids ('left': not finished when the time budget ran out; the same call again
    continues them, the interrupted cell from its last finished epoch)."""
    from ..report import write_report
    from ..run import RunConfig, run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"source": grid.source, "grid": grid.raw})
    position = {c.id: i for i, c in enumerate(grid.cells())}
    outcome: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": [], "left": []}
    for i, cell in enumerate(cells, 1):
        if outcome["left"] or options.deadline is not None and main_decides(time.time() >= options.deadline):
            outcome["left"].append(cell.id)
            continue
        folder = cell_dir(out, cell)
        tag = f"[bench] {i}/{len(cells)} {cell.id}"
        if stored_result(folder / "metrics.json", cell):
            print(f"{tag}: done already, skipped", file=sys.stderr, flush=True)
            outcome["skipped"].append(cell.id)
            continue
        committed = Path(options.results) / f"{cell.id}.json" if options.results else None
        if committed is not None and (found := stored_result(committed, cell)):
            write_json(folder / "metrics.json", found)
            print(f"{tag}: found in {options.results}, not rerun", file=sys.stderr, flush=True)
            outcome["skipped"].append(cell.id)
            continue
        # a folder holding this very cell's spec was interrupted mid-run: continue from its checkpoints
        same_spec = _read_json(folder / "cell.json") == _plain(cell.spec())
        write_json(folder / "cell.json", cell.spec())
        print(f"{tag}: {'resuming' if same_spec else 'running'} (profile {cell.profile})", file=sys.stderr, flush=True)
        config = RunConfig(
            dataset=cell.dataset, attack=cell.attack_name, defense=cell.defense_name, model=cell.model,
            profile=cell.profile, seed=cell.seed, out=str(folder), data_root=options.data_root,
            device=options.device, precision=options.precision, compile=bool(cell.options.get("compile", False)),
            train_subset=cell.options.get("train_subset"), test_subset=cell.options.get("test_subset"),
            attack_params=dict(cell.attack_params), defense_params=dict(cell.defense_params), resume=same_spec,
            progress=options.progress, monitor=str(cell.options.get("monitor", "auto")),
            share_models=bool(cell.options.get("share_models", True)), report=False,
            detector=cell.detector, detector_params=dict(cell.detector_params), deadline=options.deadline)
        try:
            metrics = run(config)
        except TimeBudgetSpent:
            print(f"{tag}: time budget spent; its checkpoints are kept for the next call", file=sys.stderr, flush=True)
            outcome["left"].append(cell.id)
            continue
        except Exception as exc:  # one broken cell must not stop a night-long grid
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            print(f"{tag}: FAILED ({type(exc).__name__}: {exc}); traceback in {folder / 'error.txt'}",
                  file=sys.stderr, flush=True)
            outcome["failed"].append(cell.id)
            continue
        (folder / "error.txt").unlink(missing_ok=True)
        if is_main():   # a finished cell never resumes: its checkpoints are dead weight in a slot's folder
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        metrics["bench"] = {"grid": grid.name, "grid_file": grid.source, "cell": cell.id,
                            "position": position.get(cell.id), "spec": cell.spec(), "command": options.command}
        write_json(folder / "metrics.json", metrics)
        if committed is not None:
            write_json(committed, metrics)
        if cell.options.get("report", True):
            write_report(folder)
        shown = " ".join(f"{k}={tables.pct(metrics.get(k))}%" for k in ("clean_acc", "asr", "robust_acc"))
        print(f"{tag}: {shown} in {tables.duration(metrics['wall_seconds'])}", file=sys.stderr, flush=True)
        outcome["ran"].append(cell.id)
    return outcome


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def merge(sources: Sequence[str | Path], out: str | Path) -> Grid:
    """Join bench folders of one grid (e.g. its shards) into OUT; returns the grid."""
    out = Path(out)
    grids = [_read_json(Path(s) / "grid.json") for s in sources]
    if any(g is None for g in grids):
        missing = [str(s) for s, g in zip(sources, grids) if g is None]
        raise BenchError(f"not bench output folders (no grid.json): {', '.join(missing)}")
    if any(g["grid"] != grids[0]["grid"] for g in grids):
        raise BenchError("these folders were made from different grids; merge shards of one grid only")
    grid = Grid.from_dict(grids[0]["grid"], grids[0]["source"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", grids[0])
    for cell in grid.cells():
        target = cell_dir(out, cell)
        for source in sources:
            folder = cell_dir(Path(source), cell)
            if not stored_result(folder / "metrics.json", cell):
                continue
            if folder.resolve() != target.resolve():  # OUT may be one of the sources
                target.mkdir(parents=True, exist_ok=True)
                for name in CELL_FILES:
                    if (folder / name).is_file():
                        shutil.copy2(folder / name, target / name)
                break
    return grid


def command_line(argv: Sequence[str]) -> str:
    return "unpoison " + shlex.join(argv)
