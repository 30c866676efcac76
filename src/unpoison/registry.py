"""Name -> class registries whose entries live in their own modules.

Each attack, defence, detector and CLI command is one file; the registries list them
by name and import a module only when it is used, so adding a method is adding a file
and one line here, and a method whose file is absent is simply not offered.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


class Registry:
    def __init__(self, kind: str, package: str, entries: dict[str, str]) -> None:
        self.kind, self.package, self.entries = kind, package, entries

    def available(self) -> list[str]:
        return [name for name, target in self.entries.items()
                if importlib.util.find_spec(f"{self.package}.{target.split(':')[0]}") is not None]

    def get(self, name: str) -> Any:
        if name not in self.available():
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.available())}")
        module, attr = self.entries[name].split(":")
        return getattr(importlib.import_module(f"{self.package}.{module}"), attr)

    def __contains__(self, name: str) -> bool:
        return name in self.available()

    def __iter__(self):
        return iter(self.available())
