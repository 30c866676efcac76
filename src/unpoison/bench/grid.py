"""A benchmark grid: the YAML that crosses datasets x attacks x defences x models x seeds,
its per-cell overrides, the cells it expands to (in the order that lets cells share
models), and the checks that catch a misspelt method or setting before hours of work."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


GRID_KEYS = {"name", "description", "profile", "datasets", "models", "seeds", "attacks", "defenses", "run",
             "overrides", "exclude", "detectors"}


RUN_OPTIONS = {"train_subset", "test_subset", "monitor", "share_models", "report", "compile"}


OVERRIDE_KEYS = {"where", "profile", "attack_params", "set", "run"}


MATCH_KEYS = ("dataset", "attack", "defense", "model", "seed")


LABEL = re.compile(r"^[A-Za-z0-9_+-]+$")


class BenchError(ValueError):
    pass


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


def check_cells(cells: Sequence[Cell]) -> list[str]:
    """Problems that would make cells fail (unknown or not-yet-available names, bad
    parameters), one readable line each; [] when every cell can run."""
    from ..attacks import ATTACKS, build_attack
    from ..data import DATASETS
    from ..defenses import DEFENSES, build_defense
    from ..models import build_model
    from ..profiles import PROFILES

    problems: dict[str, None] = {}
    for cell in cells:
        for kind, registry, name in (("attack", ATTACKS, cell.attack_name), ("defence", DEFENSES, cell.defense_name)):
            if name not in registry.entries:
                problems[f"unknown {kind} {name!r}; known: {', '.join(registry.entries)}"] = None
            elif name not in registry.available():
                problems[f"{kind} {name!r} is not available in this installation (its module is not there yet); "
                         f"available: {', '.join(registry.available())}"] = None
        if cell.detector is not None:
            from ..detect import DETECTORS

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
                            lambda: build_defense(cell.defense_name, cell.profile, cell.model, **cell.defense_params)),
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
    from ..attacks import ATTACKS
    from ..defenses import DEFENSES

    attacks, defenses = set(ATTACKS.available()), set(DEFENSES.available())
    return [c for c in cells if c.attack_name not in attacks or c.defense_name not in defenses]
