"""`unpoison bench`: a grid of `unpoison run` cells -> results.csv, results.md, plots.

A grid (YAML, see configs/quick-cifar10.yaml) crosses datasets x attacks x defences x
models x seeds; per-cell overrides change a profile, attack parameters or defence
settings where they match. Every cell runs in-process through `unpoison.run.run` into
OUT/runs/<cell id>/, in an order that lets cells share work: per (dataset, model,
seed) the clean baseline first, and per attack the no-defence cell before the
defences, so the backdoored model (and the attacks' reference models) come out of
run.py's model cache instead of being trained again.

A cell whose metrics.json exists (and was made from the same settings) is skipped, so
an interrupted grid resumes; a half-finished cell continues from its checkpoints.
`--shard i/n` runs one slice (whole attack groups, so shards do not retrain each
other's backdoored models); `--merge` joins shard folders into the same tables. With
`--results DIR` finished cells are also copied to DIR/<cell id>.json (meant to be
committed: benchmarks/results/<grid>/) and cells found there are not rerun.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .attacks.base import DEFAULT_RATE
from .io import write_csv, write_json, atomic_write_text
from .report import tables

GRID_KEYS = {"name", "description", "profile", "datasets", "models", "seeds", "attacks", "defenses", "run",
             "overrides", "exclude", "detectors"}
RUN_OPTIONS = {"train_subset", "test_subset", "monitor", "share_models", "report", "compile"}
OVERRIDE_KEYS = {"where", "profile", "attack_params", "set", "run"}
MATCH_KEYS = ("dataset", "attack", "defense", "model", "seed")
LABEL = re.compile(r"^[A-Za-z0-9_+-]+$")
CELL_FILES = ("metrics.json", "report.html", "trigger.npz", "scores.npz", "log.jsonl")  # what a merge copies


class BenchError(ValueError):
    pass


# ---------------------------------------------------------------------------- the grid
@dataclass
class Variant:
    """An attack or a defence as the grid names it: a label, the registry name, settings."""
    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, entry: Any, kind: str) -> "Variant":
        settings_key = "params" if kind == "attack" else "set"
        if isinstance(entry, str):
            variant = cls(entry, entry)
        elif isinstance(entry, dict) and "name" in entry and set(entry) <= {"label", "name", settings_key}:
            variant = cls(str(entry.get("label", entry["name"])), str(entry["name"]), dict(entry.get(settings_key) or {}))
        else:
            raise BenchError(f"a grid {kind} is a name or {{label, name, {settings_key}}}, got {entry!r}")
        if not LABEL.match(variant.label):
            raise BenchError(f"{kind} label {variant.label!r} may hold only letters, digits, '_', '+' and '-'")
        return variant


@dataclass
class Cell:
    dataset: str
    attack: str            # labels, as in the grid (several labels may share one registry name)
    defense: str
    model: str
    seed: int
    profile: str
    attack_name: str
    defense_name: str
    attack_params: dict[str, Any] = field(default_factory=dict)
    defense_params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    # a detection-only cell (`run --detector`): the defence is "none", its label "detect-<detector>"
    detector: str | None = None
    detector_params: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.dataset}.{self.attack}.{self.defense}.{self.model}.s{self.seed}"

    @property
    def group(self) -> tuple:
        """Cells of one group share a backdoored model: they belong on the same shard."""
        return (self.dataset, self.model, self.seed, self.profile, self.attack)

    def spec(self) -> dict[str, Any]:
        """Everything the cell's numbers depend on; a stored result with another spec is stale."""
        return {"dataset": self.dataset, "attack": self.attack, "attack_name": self.attack_name,
                "attack_params": self.attack_params, "defense": self.defense, "defense_name": self.defense_name,
                "defense_params": self.defense_params, "model": self.model, "seed": self.seed,
                "profile": self.profile,
                "options": {k: v for k, v in self.options.items() if k in ("train_subset", "test_subset")},
                **({"detector": self.detector, "detector_params": self.detector_params} if self.detector else {})}

    def matches(self, where: dict[str, Any]) -> bool:
        for key, wanted in where.items():
            values = wanted if isinstance(wanted, list) else [wanted]
            if getattr(self, key) not in values:
                return False
        return True


@dataclass
class Grid:
    name: str
    profile: str
    datasets: list[str]
    models: list[str]
    seeds: list[int]
    attacks: list[Variant]
    defenses: list[Variant]
    run_options: dict[str, Any]
    overrides: list[dict[str, Any]]
    exclude: list[dict[str, Any]]
    detectors: list[Variant] = field(default_factory=list)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> "Grid":
        if not isinstance(raw, dict):
            raise BenchError(f"{source or 'grid'}: a grid is a YAML mapping")
        unknown = set(raw) - GRID_KEYS
        if unknown:
            raise BenchError(f"{source or 'grid'}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"a grid has {', '.join(sorted(GRID_KEYS))}")
        for key in ("attacks", "defenses"):
            if not raw.get(key):
                raise BenchError(f"{source or 'grid'}: '{key}' must list at least one entry")
        name = str(raw.get("name") or Path(source).stem or "grid")
        grid = cls(
            name=name, profile=str(raw.get("profile", "quick")),
            datasets=[str(d) for d in _as_list(raw.get("datasets", ["cifar10"]))],
            models=[str(m) for m in _as_list(raw.get("models", ["wrn16-1"]))],
            seeds=[int(s) for s in _as_list(raw.get("seeds", [0]))],
            attacks=[Variant.parse(a, "attack") for a in raw["attacks"]],
            defenses=[Variant.parse(d, "defense") for d in raw["defenses"]],
            run_options=dict(raw.get("run") or {}), overrides=list(raw.get("overrides") or []),
            exclude=list(raw.get("exclude") or []),
            detectors=[Variant.parse(d, "detector") for d in raw.get("detectors") or []], source=source, raw=raw)
        grid._check_shape()
        return grid

    def _check_shape(self) -> None:
        where = f"grid {self.name}"
        for kind, variants in (("attack", self.attacks), ("defense", self.defenses)):
            labels = [v.label for v in variants]
            if len(set(labels)) != len(labels):
                raise BenchError(f"{where}: {kind} labels must be unique, got {labels}")
        _check_run_options(self.run_options, where)
        for rule in self.overrides:
            if not isinstance(rule, dict) or set(rule) - OVERRIDE_KEYS or "where" not in rule:
                raise BenchError(f"{where}: an override is {{where: {{...}}, profile, attack_params, set, run}}, "
                                 f"got {rule!r}")
            _check_match(rule["where"], where)
            _check_run_options(rule.get("run") or {}, where)
        for rule in self.exclude:
            _check_match(rule, where)

    def cells(self) -> list[Cell]:
        """Every cell, in the order that lets later cells reuse earlier cells' models."""
        # stable sorts: the clean baseline first, and the plain no-defence model before anything else
        attacks = sorted(self.attacks, key=lambda v: (v.name != "none", bool(v.params)))
        defenses = sorted(self.defenses, key=lambda v: (v.name != "none", bool(v.params)))
        cells = []
        for dataset in self.datasets:
            for model in self.models:
                for seed in self.seeds:
                    for attack in attacks:
                        for defense in defenses:
                            cell = Cell(dataset, attack.label, defense.label, model, seed, self.profile,
                                        attack.name, defense.name, dict(attack.params), dict(defense.params),
                                        dict(self.run_options))
                            if any(cell.matches(rule) for rule in self.exclude):
                                continue
                            cells.append(self._override(cell))
                        for detector in self.detectors:   # detection-only cells, after the attack's defences
                            cell = Cell(dataset, attack.label, f"detect-{detector.label}", model, seed, self.profile,
                                        attack.name, "none", dict(attack.params), {}, dict(self.run_options),
                                        detector.name, dict(detector.params))
                            if not any(cell.matches(rule) for rule in self.exclude):
                                cells.append(self._override(cell))
        return cells

    def _override(self, cell: Cell) -> Cell:
        for rule in self.overrides:
            if cell.matches(rule["where"]):
                cell.profile = str(rule.get("profile", cell.profile))
                cell.attack_params.update(rule.get("attack_params") or {})
                (cell.detector_params if cell.detector else cell.defense_params).update(rule.get("set") or {})
                cell.options.update(rule.get("run") or {})
        return cell


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _check_run_options(options: dict, where: str) -> None:
    unknown = set(options) - RUN_OPTIONS
    if unknown:
        raise BenchError(f"{where}: unknown run option(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(RUN_OPTIONS))}")


def _check_match(rule: Any, where: str) -> None:
    if not isinstance(rule, dict) or set(rule) - set(MATCH_KEYS):
        raise BenchError(f"{where}: a match rule uses keys {', '.join(MATCH_KEYS)}, got {rule!r}")


def load_grid(path: str | Path) -> Grid:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BenchError(f"grid file {path} not found")
    return Grid.from_dict(yaml.safe_load(path.read_text()), str(path))


# ---------------------------------------------------------------------------- checks before hours of work
def check_cells(cells: Sequence[Cell]) -> list[str]:
    """Problems that would make cells fail (unknown or not-yet-available names, bad
    parameters), one readable line each; [] when every cell can run."""
    from .attacks import ATTACKS, build_attack
    from .data import DATASETS
    from .defenses import DEFENSES, build_defense
    from .models import build_model
    from .profiles import PROFILES

    problems: dict[str, None] = {}
    for cell in cells:
        for kind, registry, name in (("attack", ATTACKS, cell.attack_name), ("defence", DEFENSES, cell.defense_name)):
            if name not in registry.entries:
                problems[f"unknown {kind} {name!r}; known: {', '.join(registry.entries)}"] = None
            elif name not in registry.available():
                problems[f"{kind} {name!r} is not available in this installation (its module is not there yet); "
                         f"available: {', '.join(registry.available())}"] = None
        if cell.detector is not None:
            from .detect import DETECTORS

            if cell.detector not in DETECTORS.available():
                problems[f"unknown detector {cell.detector!r}; known: {', '.join(DETECTORS.available())}"] = None
        if cell.dataset not in DATASETS:
            problems[f"unknown dataset {cell.dataset!r}; known: {', '.join(DATASETS)}"] = None
        if cell.profile not in PROFILES:
            problems[f"unknown profile {cell.profile!r}; known: {', '.join(PROFILES)}"] = None
    if problems:
        return list(problems)
    seen: set[str] = set()
    for cell in cells:  # every distinct configuration is built once (cheap) to catch typos in settings
        for key, build in ((json.dumps(["a", cell.attack_name, cell.attack_params], sort_keys=True, default=str),
                            lambda: build_attack(cell.attack_name, **cell.attack_params)),
                           (json.dumps(["d", cell.defense_name, cell.profile, cell.defense_params], sort_keys=True,
                                       default=str),
                            lambda: build_defense(cell.defense_name, cell.profile, **cell.defense_params)),
                           (f"m/{cell.model}", lambda: build_model(cell.model, 10))):
            if key in seen:
                continue
            seen.add(key)
            try:
                build()
            except (ValueError, TypeError) as exc:
                problems[f"cell {cell.id}: {exc}"] = None
    return list(problems)


def unavailable(cells: Sequence[Cell]) -> list[Cell]:
    from .attacks import ATTACKS
    from .defenses import DEFENSES

    attacks, defenses = set(ATTACKS.available()), set(DEFENSES.available())
    return [c for c in cells if c.attack_name not in attacks or c.defense_name not in defenses]


# ---------------------------------------------------------------------------- shards, filters, status
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
    from .attacks import build_attack
    from .defenses import build_defense

    try:
        return _plain({"attack_config": build_attack(cell.attack_name, **cell.attack_params).describe(),
                       "defense_config": build_defense(cell.defense_name, cell.profile,
                                                       **cell.defense_params).describe()})
    except (ValueError, TypeError, ImportError):
        return None


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------- running
@dataclass
class BenchOptions:
    data_root: str | None = None
    device: str = "auto"
    precision: str = "auto"
    progress: bool = False
    results: str | None = None     # committed results folder (benchmarks/results/<grid>)
    command: str = ""              # the command line, recorded with every cell


def run_grid(grid: Grid, out: str | Path, cells: Sequence[Cell], options: BenchOptions) -> dict[str, list[str]]:
    """Run `cells` (a selection of grid.cells()) into OUT; returns {'ran','skipped','failed'} ids."""
    from .report import write_report
    from .run import RunConfig, run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"source": grid.source, "grid": grid.raw})
    position = {c.id: i for i, c in enumerate(grid.cells())}
    outcome: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": []}
    for i, cell in enumerate(cells, 1):
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
            detector=cell.detector, detector_params=dict(cell.detector_params))
        try:
            metrics = run(config)
        except Exception as exc:  # one broken cell must not stop a night-long grid
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            print(f"{tag}: FAILED ({type(exc).__name__}: {exc}); traceback in {folder / 'error.txt'}",
                  file=sys.stderr, flush=True)
            outcome["failed"].append(cell.id)
            continue
        (folder / "error.txt").unlink(missing_ok=True)
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


# ---------------------------------------------------------------------------- tables
ROW_FIELDS = ("cell", "dataset", "model", "attack", "defense", "seed", "profile", "attack_name", "defense_name",
              "n_train", "n_poisoned", "clean_acc", "asr", "robust_acc", "auroc", "tpr_at_fpr_5",
              "recall_at_10_percent", "precision", "recall", "n_flagged", "n_trusted_poisoned", "wall_seconds", "device")


def collect(out: str | Path, grid: Grid) -> tuple[list[dict], list[Cell]]:
    """(finished results in grid order, cells not finished) of a bench folder."""
    results, missing = [], []
    for cell in grid.cells():
        metrics = stored_result(cell_dir(Path(out), cell) / "metrics.json", cell)
        if metrics is None:
            missing.append(cell)
        else:
            results.append(metrics)
    return results, missing


def nonstandard_rate(metrics: dict) -> float | None:
    """The run's poison rate when it is not the papers' standard one (None otherwise)."""
    rate = metrics.get("poison_rate")
    if metrics.get("attack") in (None, "none") or rate is None or abs(rate - DEFAULT_RATE) < 1e-9:
        return None
    return rate


def flat_row(metrics: dict) -> dict[str, Any]:
    """One results.csv row: the cell's labels and measurements (fractions, not percent)."""
    spec = metrics.get("bench", {}).get("spec", {})
    detection = metrics.get("detection") or {}
    # a detection-only run (`run --detector`) is its own row, never averaged into the defence's
    label = f"{metrics['detector']} (detector only)" if metrics.get("detector") else metrics.get("defense")
    attack = metrics.get("attack")
    if nonstandard_rate(metrics) is not None:
        attack = f"{attack} (rate {nonstandard_rate(metrics):g})"   # never averaged with the standard-rate cell
    row = {"cell": metrics.get("bench", {}).get("cell"), "attack": spec.get("attack", attack),
           "defense": spec.get("defense", label), "attack_name": metrics.get("attack"),
           "defense_name": metrics.get("defense")}
    for key in ("dataset", "model", "seed", "profile", "n_train", "n_poisoned", "clean_acc", "asr", "robust_acc",
                "wall_seconds", "device"):
        row[key] = metrics.get(key)
    for key in ("auroc", "tpr_at_fpr_5", "recall_at_10_percent", "precision", "recall", "n_flagged",
                "n_trusted_poisoned"):
        row[key] = detection.get(key)
    return row


def summarize(results: Iterable[dict]) -> list[dict]:
    """Mean and std over seeds per (dataset, model, profile, attack, defence), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for metrics in results:
        row = flat_row(metrics)
        groups.setdefault((row["dataset"], row["model"], row["profile"], row["attack"], row["defense"]), []).append(row)
    summary = []
    for (dataset, model, profile, attack, defense), rows in groups.items():
        entry = {"dataset": dataset, "model": model, "profile": profile, "attack": attack, "defense": defense,
                 "seeds": [r["seed"] for r in rows], "n": len(rows)}
        for key in ("clean_acc", "asr", "robust_acc", "auroc", "precision", "wall_seconds"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = tables.mean_std(r[key] for r in rows)
        summary.append(entry)
    return summary


def summary_table(summary: Sequence[dict]) -> str:
    rows = [(s["attack"], s["defense"], ",".join(map(str, s["seeds"])),
             tables.pct_pm(s["clean_acc_mean"], s["clean_acc_std"]), tables.pct_pm(s["asr_mean"], s["asr_std"]),
             tables.pct_pm(s["robust_acc_mean"], s["robust_acc_std"]), tables.num_pm(s["auroc_mean"], s["auroc_std"]),
             tables.num_pm(s["precision_mean"], s["precision_std"]),
             tables.duration(s["wall_seconds_mean"])) for s in summary]
    return tables.markdown_table(["attack", "defence", "seeds", "CA %", "ASR %", "RA %", "detection AUROC",
                                  "flagged precision", "wall time / seed"], rows)


def write_tables(out: str | Path, grid: Grid, plots: bool = True) -> dict[str, Any]:
    """OUT/results.csv (one row per finished cell), OUT/results.md (mean +- std over seeds,
    per dataset and model) and OUT/plots/*.png."""
    from .report import figures

    out = Path(out)
    results, missing = collect(out, grid)
    rows = [flat_row(m) for m in results]
    write_csv(out / "results.csv", list(ROW_FIELDS), [[_csv(r[k]) for k in ROW_FIELDS] for r in rows])
    summary = summarize(results)
    lines = [f"# Benchmark `{grid.name}`\n",
             f"Grid `{grid.source}`: {len(results)} of {len(results) + len(missing)} cells finished.\n"]
    lines += provenance(results)
    for (dataset, model, profile), part in split_by_setting(summary).items():
        lines.append(f"\n## {dataset}, {model}, profile {profile}\n")
        lines.append(summary_table(part))
        if plots:
            stem = f"{dataset}-{model}-{profile}"
            (out / "plots").mkdir(exist_ok=True)
            (out / "plots" / f"{stem}-bars.png").write_bytes(figures.bench_bars_figure(part, f"{dataset}, {model}"))
            (out / "plots" / f"{stem}-tradeoff.png").write_bytes(
                figures.bench_tradeoff_figure(part, f"{dataset}, {model}"))
            lines.append(f"\n![CA and ASR per attack and defence](plots/{stem}-bars.png)\n"
                         f"![ASR against CA](plots/{stem}-tradeoff.png)\n")
    if missing:
        lines.append("\n## Not finished\n\n" + "\n".join(f"- `{c.id}`" for c in missing) + "\n")
    atomic_write_text(out / "results.md", "\n".join(lines))
    return {"finished": len(results), "missing": [c.id for c in missing], "summary": summary}


def command_template(metrics: dict) -> str:
    """A cell's recorded command with its attack and defence written as <attack>/<defense>,
    so a grid's cells share one line of provenance instead of one line each."""
    command = metrics.get("bench", {}).get("command") or ""
    attack, defense = metrics.get("attack"), metrics.get("defense")
    if not command or not attack or not defense:
        return command
    command = re.sub(rf"--attack {re.escape(attack)}(?=\s|$)", "--attack <attack>", command)
    command = re.sub(rf"--defense {re.escape(defense)}(?=\s|$)", "--defense <defense>", command)
    return command.replace(f"{attack}-{defense}", "<attack>-<defense>")


def provenance(results: Sequence[dict]) -> list[str]:
    """Commands, machines, versions and wall time of a set of results, as Markdown lines."""
    if not results:
        return []
    commands = sorted({command_template(m) for m in results} - {""})
    devices = sorted({m.get("device", "?") for m in results})
    versions = sorted({", ".join(f"{k} {v}" for k, v in m.get("environment", {}).items()
                                 if k in ("unpoison", "torch", "torchvision", "python")) for m in results})
    total = sum(m.get("wall_seconds") or 0 for m in results)
    notes = sorted({m.get("profile_note", "") for m in results} - {""})
    lines = [f"- command: " + "; ".join(f"`{c}`" for c in commands) if commands else "- command: (not recorded)",
             "- machine: " + "; ".join(devices), "- versions: " + "; ".join(versions),
             f"- wall time: {tables.duration(total)}, the sum over {len(results)} cells (a cell that reused "
             "a cached model did not pay for training it again)"]
    lines += [f"- {note}" for note in notes]
    return ["\n".join(lines) + "\n"]


def split_by_setting(summary: Sequence[dict]) -> dict[tuple, list[dict]]:
    parts: dict[tuple, list[dict]] = {}
    for s in summary:
        parts.setdefault((s["dataset"], s["model"], s["profile"]), []).append(s)
    return parts


def _csv(value: Any) -> Any:
    return "" if value is None else value


def command_line(argv: Sequence[str]) -> str:
    return "unpoison " + shlex.join(argv)
