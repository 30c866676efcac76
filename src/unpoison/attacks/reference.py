"""The attacker's clean reference model (TrojanNN picks neurons on it, LC attacks it with PGD).

It is trained on the clean training set with the engine and the profile's plain
recipe, once: `ctx.shared_model` caches it keyed by the clean data, the seed, the
architecture and this recipe, so every attack and every run that needs it reuses it.
A saved `model.pt` can be given instead (`reference=PATH`).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from torch import nn

from ..data.imageset import ImageSet


def reference_model(train: ImageSet, ctx: Any, path: str | None = None, epochs: int | None = None) -> nn.Module:
    """Load the model at `path`, or train (or fetch from the cache) a clean one; eval mode."""
    if path:
        from ..artifacts import load_model

        model, info = load_model(path, ctx.runtime.device)
        if info["num_classes"] != train.num_classes:
            raise ValueError(f"reference model {path} has {info['num_classes']} classes, the data {train.num_classes}")
        return ctx.runtime.prepare_model(model).eval()
    if ctx is None:
        raise ValueError("this attack needs a reference model: call attack.prepare(train, ctx) with a "
                         "DefenseContext, or give reference=PATH to a model.pt")
    from ..config import to_plain
    from ..profiles import model_recipe
    from ..train.supervised import train_supervised

    recipe = model_recipe(ctx.profile, ctx.model_name)
    if epochs:
        recipe = replace(recipe, epochs=int(epochs))

    def build() -> nn.Module:
        print(f"[attack] training the clean reference model ({recipe.epochs} epochs, {ctx.profile} recipe)",
              file=sys.stderr, flush=True)
        return train_supervised(ctx.new_model(train, role="reference"), train, recipe, ctx.runtime,
                                name="reference", seed=ctx.seed, checkpoint_dir=ctx.checkpoints(),
                                log_path=ctx.log_path, progress=ctx.progress)

    if ctx.shared_model is not None:
        model = ctx.shared_model({"stage": "attack-reference", "recipe": to_plain(recipe)}, build)
    else:
        model = build()
    return model.eval()
