"""Defences, by name: each is one file reading like its paper's algorithm box."""

from __future__ import annotations

from typing import Any

from .base import Defense, DefenseContext, DefenseResult, StageTimer, apply_overrides, to_plain
from .none import NoDefense

DEFENSES: dict[str, type[Defense]] = {
    "none": NoDefense,
}


def build_defense(name: str, profile: str, **overrides: Any) -> Defense:
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(DEFENSES)}")
    return DEFENSES[name].for_profile(profile, **overrides)


__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult", "StageTimer", "apply_overrides",
           "build_defense", "to_plain"]
