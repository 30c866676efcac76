"""Poisoned-sample detectors, by name (one file each)."""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import Detection, Detector

DETECTORS = Registry("detector", __name__, {
    "ac": "ac:ActivationClustering",
    "fct": "fct:FCT",
    "entropy": "entropy:EntropyDetector",
    "expand": "expand:SeedExpansion",
    "loss": "loss:LossDetector",
    "spectral": "spectral:SpectralSignature",
    "strip": "strip:STRIP",
})


def build_detector(name: str, profile: str, network: str | None = None, **overrides: Any) -> Detector:
    return DETECTORS.get(name).for_profile(profile, network, **overrides)


__all__ = ["DETECTORS", "Detection", "Detector", "build_detector"]
