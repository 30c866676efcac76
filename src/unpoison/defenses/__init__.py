"""Defences, by name: each is one file reading like its paper's algorithm box."""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import Defense, DefenseContext, DefenseResult, StageTimer, apply_overrides, to_plain

DEFENSES = Registry("defense", __name__, {
    "none": "none:NoDefense",
    "dlp": "dlp:DLP",
    "abl": "abl:ABL",
    "cbd": "cbd:CBD",
    "dst": "dst:DST",
    "dbr": "dbr:DBR",
    "quarantine": "quarantine:Quarantine",
    # post-training repair baselines: the backdoored model plus a small clean reference
    "ft": "ft:FT",
    "fp": "fp:FP",
    "nad": "nad:NAD",
    "anp": "anp:ANP",
    "mcr": "mcr:MCR",
    # training-time baselines
    "dbd": "dbd:DBD",
    "asd": "asd:ASD",
})


def build_defense(name: str, profile: str, network: str | None = None, **overrides: Any) -> Defense:
    return DEFENSES.get(name).for_profile(profile, network, **overrides)


__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult", "StageTimer", "apply_overrides",
           "build_defense", "to_plain"]
