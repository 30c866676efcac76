"""The output folder of a user command (`scan`, `train`, `repair`): clearing what an earlier
run left, the identity `--resume` checks, the list of skipped files, and the context the
method runs in, with the model cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

from .artifacts import ModelCache
from .config import to_plain
from .console import UserError
from .context import DefenseContext
from .data.imageset import ImageSet
from .distributed import barrier, is_main
from .io import atomic_write_text, write_json
from .runtime import Runtime


def prepare_out(out: Path, resume: bool, outputs: Iterable[str]) -> None:
    """A fresh run clears what an earlier run left (checkpoints above all: they would
    silently resume a different run); --resume keeps the checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume and is_main():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("log.jsonl", "heldout.jsonl", *outputs):
            (out / name).unlink(missing_ok=True)
    barrier()   # under torchrun: no rank reads the folder before rank 0 has cleared it


RUN_IDENTITY = "run-identity.json"


def check_resume(out: Path, resume: bool, identity: dict[str, Any]) -> None:
    """--resume continues only the run that OUT holds: same data (every pixel and label),
    settings and seed. Otherwise the checkpoints would silently finish a different run."""
    identity = json.loads(json.dumps(to_plain(identity), default=str))
    path = out / RUN_IDENTITY
    if resume and path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != identity:
            changed = sorted(k for k in set(identity) | set(previous or {})
                             if (previous or {}).get(k) != identity.get(k))
            raise UserError(f"--resume: {out} holds a run with different {', '.join(changed) or 'settings'}; "
                            "rerun without --resume to start over")
    write_json(path, identity)


def user_context(out: Path, runtime: Runtime, profile: str, seed: int, model: str, progress: bool,
                 share: bool, data: ImageSet) -> DefenseContext:
    """A DefenseContext for a run without ground truth; models that an identical run
    (same pixels, labels, recipe, seed) already trained are reused when `share`."""
    ctx = DefenseContext(runtime, profile, seed, model, out, progress=progress, log_path=out / "log.jsonl")
    if share:
        ctx.shared_model = ModelCache.for_context(ctx, data).shared_model
    return ctx


def write_skipped(out: Path, *lists: Iterable[str]) -> None:
    lines = [line for items in lists for line in items]
    if lines:
        atomic_write_text(out / "skipped.txt", "\n".join(lines) + "\n")
    else:
        (out / "skipped.txt").unlink(missing_ok=True)
