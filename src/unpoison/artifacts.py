"""Saved models: the `model.pt` contract, and the cache of trained models shared across runs.

`model.pt` holds only tensors and plain values (architecture name, class names, input
size, normalisation), so `torch.load(path, weights_only=True)` reads it and nothing in
it can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .context import DefenseContext
from .data.cache import cache_dir
from .distributed import main_decides
from .data.imageset import ImageSet
from .models import Classifier, build_model
from .runtime import Runtime
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


def dataset_digest(data: ImageSet) -> str:
    """The content digest of a training set: sha256 over every label, every pixel (with the
    images' shape) and the class names, in order.

    Guarantee: two sets get the same digest only if they are identical image by image,
    label by label, and name the same classes in the same order. Sampling would not do: a
    user who drops a handful of flagged images and retrains must not get the first run's
    model back. Hashing CIFAR-10's 150 MB of pixels takes well under a second."""
    h = hashlib.sha256()
    h.update(json.dumps([list(data.images.shape), list(data.classes)]).encode())
    h.update(data.labels.to(torch.int64).contiguous().numpy().tobytes())
    h.update(data.images.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cache_key(parts: dict) -> str:
    """A hash of what a cached model depends on, and of the unpoison version that trained it
    (a new version may train differently, so it never picks up an older version's models)."""
    from . import __version__

    parts = {**parts, "unpoison_version": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ModelCache:
    """Trained models shared between runs and commands: train once, reuse everywhere.

    A model is stored under a key made of the cache's identity (the `dataset_digest` of
    the data the method receives, the seed, the architecture, the profile) and the key the
    method passes (its stage and full recipe), so a model is reused only where the same
    code would train it again from the same inputs. `shared_model` is what
    `DefenseContext.shared_model` expects. Entries hold only tensors and are read back with
    weights_only=True; a damaged entry is trained again."""

    def __init__(self, data: ImageSet, identity: dict[str, Any], new_model: Callable[[], Classifier],
                 runtime: Runtime | None = None, enabled: bool = True, folder: Path | None = None) -> None:
        self.identity = {"data": dataset_digest(data), **identity}
        self.new_model, self.runtime, self.enabled = new_model, runtime, enabled
        self.folder = folder
        self.reused: list[str] = []   # "stage (cache KEY)" per model read back, for metrics.json

    @classmethod
    def for_context(cls, ctx: DefenseContext, data: ImageSet, enabled: bool = True) -> "ModelCache":
        """The cache for the models a method trains on `data` in `ctx`; `enabled=False`
        (`--no-share`) trains every model afresh."""
        return cls(data, {"seed": ctx.seed, "model": ctx.model_name, "profile": ctx.profile},
                   lambda: ctx.new_model(data), ctx.runtime, enabled)

    def key(self, key: dict) -> str:
        return cache_key({**self.identity, **key})

    def shared_model(self, key: dict, build: Callable[[], nn.Module]) -> nn.Module:
        if not self.enabled:
            return build()
        model, hit = self.get_or_build(key, build)
        if hit:
            self.reused.append(f"{key.get('stage', 'model')} (cache {self.key(key)})")
            print(f"[cache] reusing the model of an identical earlier run for {key.get('stage', 'model')}",
                  file=sys.stderr, flush=True)
        return self.runtime.prepare_model(model).eval() if self.runtime is not None else model

    def get_or_build(self, key: dict, build: Callable[[], nn.Module]) -> tuple[nn.Module, bool]:
        """(model, was_cached)."""
        folder = self.folder or (cache_dir() / "models")
        path = folder / f"{self.key(key)}.pt"
        if main_decides(path.exists()):   # under torchrun: every rank loads, or every rank trains
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                model = self.new_model()
                model.load_state_dict(payload["state_dict"])
                return model.eval(), True
            except Exception:
                pass  # a damaged cache entry is rebuilt
        model = build()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"key": json.dumps({**self.identity, **key}, sort_keys=True, default=str),
                           "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}}, path)
        return model, False


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)
