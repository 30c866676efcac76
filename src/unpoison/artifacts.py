"""Saved models: the `model.pt` contract, and a cache of trained models shared across runs.

`model.pt` holds only tensors and plain values (architecture name, class names, input
size, normalisation), so `torch.load(path, weights_only=True)` reads it and nothing in
it can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data.cache import cache_dir
from .models import Classifier, build_model
from .train.engine import atomic_torch_save

MODEL_FORMAT = "unpoison-model"
MODEL_VERSION = 1


class NotAnUnpoisonModel(ValueError):
    pass


def model_payload(model: Classifier, architecture: str, classes: list[str], input_size: tuple[int, int],
                  metadata: dict[str, Any] | None = None) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        "format": MODEL_FORMAT, "version": MODEL_VERSION, "architecture": architecture,
        "classes": list(classes), "num_classes": len(classes), "input_size": list(input_size),
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "state_dict": state, "metadata": json.dumps(metadata or {}),
    }


def save_model(path: str | os.PathLike, model: Classifier, architecture: str, classes: list[str],
               input_size: tuple[int, int] = (32, 32), metadata: dict[str, Any] | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model_payload(model, architecture, classes, input_size, metadata), path)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Load a model.pt written by unpoison (weights_only=True). Returns (model, info)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise NotAnUnpoisonModel(f"{path} cannot be loaded safely as an unpoison model "
                                 f"(only weights_only checkpoints are accepted): {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise NotAnUnpoisonModel(f"{path} is not an unpoison model.pt (missing format marker '{MODEL_FORMAT}'); "
                                 "train one with `unpoison train` or `unpoison run --save-model`")
    norm = payload["normalization"]
    model = build_model(payload["architecture"], payload["num_classes"], norm["mean"], norm["std"])
    model.load_state_dict(payload["state_dict"])
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    info["metadata"] = json.loads(payload.get("metadata") or "{}")
    return model.to(device).eval(), info


def cache_key(parts: dict) -> str:
    """A hash of what a cached model depends on, and of the unpoison version that trained it
    (a new version may train differently, so it never picks up an older version's models)."""
    from . import __version__

    parts = {**parts, "unpoison_version": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_model(key: dict, build: Callable[[], Classifier], make_empty: Callable[[], Classifier],
                 folder: Path | None = None) -> tuple[Classifier, bool]:
    """Train once, reuse everywhere: returns (model, was_cached).

    The key must name everything the weights depend on (data, attack, recipe, seed...)."""
    folder = folder or (cache_dir() / "models")
    path = folder / f"{cache_key(key)}.pt"
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            model = make_empty()
            model.load_state_dict(payload["state_dict"])
            return model.eval(), True
        except Exception:
            pass  # a damaged cache entry is rebuilt
    model = build()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"key": json.dumps(key, sort_keys=True, default=str),
                       "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return model, False


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)
