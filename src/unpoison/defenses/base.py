"""The Defense interface (the context it runs in is `unpoison.context`).

`Defense.fit(data, ctx)` receives the untrusted training set (images and labels, no
poison mask) and returns a model, optionally per-sample suspicion scores and a flagged
set. Evaluation hooks in the context measure the model from outside; they return
nothing to the defence, so it cannot select on the test set or peek at the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import apply_overrides, to_plain
# the context lives below detect/ and defenses/; re-exported here for existing imports
from ..context import DefenseContext, StageTimer, channel_stats
from ..data.imageset import ImageSet
from ..profiles import with_model_recipe


@dataclass
class DefenseResult:
    model: nn.Module
    suspicion: torch.Tensor | None = None   # per training sample; higher = more likely poisoned
    flagged: torch.Tensor | None = None     # bool per training sample: what the defence set aside
    trusted: torch.Tensor | None = None     # bool per training sample: what it used as clean with its label
    stages: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Defense:
    """Base class: a defence has a name, a typed config (dataclass), and fit()."""

    name = "defense"
    Config: type = object
    main_epochs = "train.epochs"   # the setting `--epochs` changes
    paper_model = "wrn16-1"        # the paper's network, where the config has no `model` of its own
    needs_clean_reference = False  # True: the runner supplies ctx.clean_reference

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def for_profile(cls, profile: str, network: str | None = None, **overrides: Any) -> "Defense":
        """The profile's config; with `network` (the run's --model), its plain-training stages
        use that network's recipe (profiles.with_model_recipe); then the overrides."""
        config = cls.Config.for_profile(profile)  # type: ignore[attr-defined]
        if network is not None:
            config = with_model_recipe(config, profile, network)
        return cls(apply_overrides(config, overrides))

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **to_plain(self.config)}

    def deviations(self, model_name: str) -> list[str]:
        """Every setting of this run that is not the paper's: 'setting: ours (paper: theirs)'.

        The paper is the `paper` profile's config (each defence's tests compare that to the
        spec), so a quick run lists its budget cuts and our changes alike, each by the name
        `--set` takes; the network counts too (the run's --model, or the config's `model`)."""
        ours, paper = _with_model(to_plain(self.config), model_name), to_plain(type(self.config).for_profile("paper"))
        found = []
        if not (isinstance(ours, dict) and "model" in ours) and model_name != self.paper_model:
            found.append(f"model: {model_name!r} (paper: {self.paper_model!r})")
        return found + [f"{key}: {mine!r} (paper: {theirs!r})" for key, mine, theirs in _differences(ours, paper)]


def _with_model(plain: Any, model_name: str) -> Any:
    """A plain config with every `model: None` (= the run's --model) replaced by that name."""
    if not isinstance(plain, dict):
        return plain
    return {k: (model_name if k == "model" and v is None else _with_model(v, model_name)) for k, v in plain.items()}


def _differences(ours: Any, paper: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, ours, paper) for every leaf where two plain configs differ."""
    if isinstance(ours, dict) and isinstance(paper, dict):
        return [d for key in ours for d in _differences(ours[key], paper.get(key), f"{prefix}{key}.")]
    return [] if ours == paper else [(prefix.rstrip("."), ours, paper)]


__all__ = ["Defense", "DefenseContext", "DefenseResult", "StageTimer", "apply_overrides", "channel_stats",
           "to_plain"]
