"""`unpoison run`: one dataset, one attack, one defence, one model -> metrics.json.

The flow is DESIGN.md's: load -> attack.poison -> defence.fit(untrusted set) -> evaluate.
The poison mask stays here, in the PoisonedSet and the evaluation monitor; the defence
gets `poisoned.untrusted()` and hooks that return nothing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts
from .attacks import build_attack
from .config import to_plain
from .context import DefenseContext
from .data import load_dataset
from .data.imageset import ImageSet
from .defenses import build_defense
from .defenses.base import DefenseResult
from .detect import build_detector
from .io import environment, write_json
from .metrics import backdoor_metrics, detection_metrics
from .monitor import MONITOR_JOURNAL, Monitor
from .profiles import get_profile
from .report.arrays import SCORES_FILE, TRIGGER_FILE, save_scores, save_trigger_examples
from .runtime import Runtime, generator
from .session import prepare_out


@dataclass
class RunConfig:
    dataset: str = "cifar10"
    attack: str = "none"
    defense: str = "none"
    model: str = "wrn16-1"
    profile: str = "quick"
    seed: int = 0
    out: str = "runs/run"
    data_root: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    defense_params: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    save_model: bool = False
    progress: bool = True
    monitor: str = "auto"        # auto | stages | epochs
    share_models: bool = True    # reuse identical trained models across runs (cache)
    detector: str | None = None  # a detection-only run: this detector instead of a defence
    detector_params: dict[str, Any] = field(default_factory=dict)
    report: bool = True          # write OUT/report.html at the end (a second or two)
    tta: bool = False             # final CA/ASR/RA with test-time augmentation (mirror, 1-pixel shifts)
    clean_fraction: float = 0.05  # clean reference for the repair baselines: this share of the
                                  # training set, drawn from unpoisoned images
    deadline: float | None = None   # time.time() after which training stops at an epoch end
                                    # (runtime.TimeBudgetSpent; `bench --budget`)


def load_split(cfg: RunConfig, split: str, limit: int | None) -> ImageSet:
    data = load_dataset(cfg.dataset, split, cfg.data_root)
    if data.skipped:
        print(f"[data] {cfg.dataset}/{split}: {len(data.skipped)} files skipped "
              f"(first: {data.skipped[0]})", file=sys.stderr)
    if limit:
        data = data.head(limit, generator(cfg.seed, "subset", split))
    return data


def run(cfg: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(cfg.out)
    prepare_out(out, cfg.resume, (MONITOR_JOURNAL, "metrics.json", TRIGGER_FILE, SCORES_FILE, "report.html"))
    profile = get_profile(cfg.profile)
    runtime = Runtime.create(cfg.device, cfg.precision, compile=cfg.compile, deadline=cfg.deadline)
    print(f"[run] {profile.note}", file=sys.stderr)
    print(f"[run] {runtime.describe()}", file=sys.stderr)

    train = load_split(cfg, "train", cfg.train_subset or profile.train_subset)
    test = load_split(cfg, "test", cfg.test_subset or profile.test_subset)

    attack = build_attack(cfg.attack, **cfg.attack_params)
    ctx = DefenseContext(runtime, cfg.profile, cfg.seed, cfg.model, out, progress=cfg.progress,
                         log_path=out / "log.jsonl")
    # models are cached by the data they train on: the attack's reference model by the clean
    # set, the defence's models by the poisoned one
    clean_cache = artifacts.ModelCache.for_context(ctx, train, enabled=cfg.share_models)
    ctx.shared_model = clean_cache.shared_model
    attack.prepare(train, ctx)
    poisoned = attack.poison(train, generator(cfg.seed, "poison"))
    untrusted = poisoned.untrusted()

    defense = build_defense(cfg.defense, cfg.profile, cfg.model, **cfg.defense_params)
    # every setting that is not the paper's, by its --set name (the paper profile lists none)
    deviations = [] if cfg.detector else defense.deviations(cfg.model)
    for line in deviations:
        print(f"[run] not the paper's setting: {line}", file=sys.stderr)
    every_epoch = cfg.monitor == "epochs" or (cfg.monitor == "auto" and profile.monitor_every_epoch)
    monitor = Monitor(test, attack, poisoned, runtime, every_epoch, cfg.seed, journal=out / MONITOR_JOURNAL,
                      resume=cfg.resume, started=start)
    ctx.on_epoch, ctx.on_stage = monitor.on_epoch, monitor.on_stage
    cache = artifacts.ModelCache.for_context(ctx, untrusted, enabled=cfg.share_models)
    ctx.shared_model = cache.shared_model

    if defense.needs_clean_reference and not cfg.detector:
        ctx.clean_reference = poisoned.clean_reference(cfg.clean_fraction, generator(cfg.seed, "clean-reference"))
        print(f"[run] clean reference: {len(ctx.clean_reference)} unpoisoned training images "
              f"({cfg.clean_fraction:.0%}), the repair method's only clean data", file=sys.stderr)
    detector = build_detector(cfg.detector, cfg.profile, cfg.model, **cfg.detector_params) if cfg.detector else None
    result = detect(detector, untrusted, ctx) if detector else defense.fit(untrusted, ctx)

    final = backdoor_metrics(result.model, test, attack, runtime, monitor.backdoor, tta=cfg.tta)
    if cfg.tta:   # both, so a TTA number is never compared with a plain one by mistake
        plain = backdoor_metrics(result.model, test, attack, runtime, monitor.backdoor)
        final.update(tta=True, **{f"{key}_no_tta": value for key, value in plain.items()})
    stages = [{**s, **monitor.stage_metrics.get(s["name"], {})} for s in result.stages]
    metrics: dict[str, Any] = {
        "dataset": cfg.dataset, "attack": cfg.attack, "defense": cfg.defense, "model": cfg.model,
        "profile": cfg.profile, "seed": cfg.seed, "n_train": len(train), "n_test": len(test),
        "n_poisoned": poisoned.n_poisoned, "poison_rate": attack.rate,
        "target": attack.target if attack.mode == "all2one" and attack.name != "none" else None,
        **final,
        "wall_seconds": round(monitor.elapsed(), 1), "device": runtime.describe(),
        "stages": stages,
        "attack_config": attack.describe(), "defense_config": defense.describe(),
        "profile_note": profile.note, "environment": environment(),
        "reused_models": clean_cache.reused + cache.reused, "notes": result.notes, "deviations": deviations,
        **({"n_clean_reference": len(ctx.clean_reference)} if ctx.clean_reference is not None else {}),
        **({"detector": cfg.detector, "detector_config": detector.describe()} if detector else {}),
    }
    scores = None
    if result.suspicion is not None or result.flagged is not None:
        scores = result.suspicion if result.suspicion is not None else result.flagged.float()
        metrics["detection"] = detection_metrics(scores, poisoned.is_poison, result.flagged, result.trusted)
    if monitor.curves:
        metrics["curves"] = monitor.curves
    write_json(out / "metrics.json", metrics)
    # what the report draws: trigger examples, and per-sample scores with the ground truth
    save_trigger_examples(out / TRIGGER_FILE, train, poisoned, attack, test, monitor.backdoor)
    if scores is not None:
        save_scores(out / SCORES_FILE, scores, poisoned.is_poison, result.flagged)
    if cfg.report:
        _write_report(out)
    if cfg.save_model:
        artifacts.save_model(out / "model.pt", artifacts.unwrap(result.model), cfg.model, train.classes,
                             train.image_size, {"run": to_plain(cfg), "clean_acc": final["clean_acc"],
                                                "asr": final["asr"]})
    return metrics


def _write_report(out: Path) -> None:
    from .report import write_report

    try:
        print(f"[run] wrote {write_report(out)}", file=sys.stderr)
    except Exception as exc:  # the measurements are already saved; a drawing bug must not lose them
        print(f"[run] warning: report.html not written ({type(exc).__name__}: {exc}); "
              f"retry with `unpoison report {out}`", file=sys.stderr)


def detect(detector, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
    """A detection-only run: the detector's scores and flags give `detection`; CA/ASR/RA are
    those of the detector's own model (for FCT, the quick no-augmentation SD model)."""
    found = detector.detect(data, ctx)
    if found.model is None:
        raise ValueError(f"detector {detector.name!r} has no model of its own to measure")
    note = f"detection-only run ({detector.name}): clean_acc/asr/robust_acc are of the detector's own model"
    return DefenseResult(found.model, suspicion=found.scores, flagged=found.flagged, stages=found.stages, notes=[note])

