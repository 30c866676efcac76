"""Backdoor attacks, by name. Each one file; all share the Attack interface."""

from __future__ import annotations

import inspect
from typing import Any

from .badnets import BadNets
from .base import Attack, BackdoorTest, NoAttack, PoisonedSet, blend, stamp

ATTACKS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "badnets": BadNets,
}


def build_attack(name: str, **params: Any) -> Attack:
    """Build an attack from its name and the parameters it accepts (None values are ignored)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"attack {name!r} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(p for p in accepted if p != 'self')}")
    return cls(**given)


__all__ = ["ATTACKS", "Attack", "BackdoorTest", "NoAttack", "PoisonedSet", "build_attack", "blend", "stamp"]
