"""Backdoor attacks, by name. Each one file; all share the Attack interface (base.py)."""

from __future__ import annotations

import inspect
from typing import Any

from ..registry import Registry
from .base import Attack, BackdoorTest, NoAttack, PoisonedSet, blend, stamp

ATTACKS = Registry("attack", __name__, {
    "none": "base:NoAttack",
    "badnets": "badnets:BadNets",
    "blended": "blended:Blended",
    "sig": "sig:SIG",
    "trojannn": "trojannn:TrojanNN",
    "lc": "lc:LabelConsistent",
    "wanet": "wanet:WaNet",
})


def build_attack(name: str, **params: Any) -> Attack:
    """Build an attack from its name and the parameters it accepts (None values are ignored)."""
    cls = ATTACKS.get(name)
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"attack {name!r} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(p for p in accepted if p != 'self')}")
    return cls(**given)


__all__ = ["ATTACKS", "Attack", "BackdoorTest", "NoAttack", "PoisonedSet", "build_attack", "blend", "stamp"]
