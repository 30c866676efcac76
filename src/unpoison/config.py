"""Typed settings: dotted overrides on nested config dataclasses, and their plain form.

Every method's settings are a dataclass; `--set train.optim.lr=0.01` becomes
`apply_overrides(config, {"train.optim.lr": "0.01"})`, converted to the field's type, and
`to_plain(config)` is what metrics.json records in full.
"""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass, replace
from typing import Any


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Set (possibly nested, dotted) config fields: {'epochs': 5, 'train.optim.lr': 0.01}."""
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        names = {f.name for f in fields(config)}
        if head not in names:
            raise ValueError(f"{type(config).__name__} has no setting {head!r}; it has {', '.join(sorted(names))}")
        if rest:
            config = replace(config, **{head: apply_overrides(getattr(config, head), {rest: value})})
        else:
            current = getattr(config, head)
            if isinstance(current, bool) and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes", "on")
            elif isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
                # "none" switches off an optional number (e.g. unlearn.bound=none)
                value = None if value.strip().lower() == "none" else type(current)(value)
            config = replace(config, **{head: value})
    return config


def to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {k: to_plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
