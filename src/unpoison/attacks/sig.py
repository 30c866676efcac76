"""SIG (Barni et al. 2019): a clean-label attack with an additive horizontal sinusoid.

x' = clip(x + delta * sin(2 pi j f / W)) along the columns j, the same value on every
row and channel, floored to uint8. Clean-label: only target-class training images are
triggered and their labels are kept; at test time the signal goes on other classes.

Defaults are the standard SIG of the papers' tables (spec §1.3): delta 20, f 6, and
the same delta at test time. The FCT/D-ST/D-BR paper's code (`sigTrigger` of
Effective_backdoor_defense) trains with delta 40 and tests with delta 60: use
`delta=40 test_delta=60` to reproduce it. Test-time amplification is part of the
original attack: the poisoned images only need to plant the association.
"""

from __future__ import annotations

import math

import torch

from .base import Attack


def sinusoid(height: int, width: int, delta: float, frequency: float) -> torch.Tensor:
    """(1, H, W) float signal delta * sin(2 pi j f / W), constant down each column."""
    columns = delta * torch.sin(2 * math.pi * torch.arange(width, dtype=torch.float64) * frequency / width)
    return columns.float().expand(1, height, width)


class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", delta: float = 20,
                 test_delta: float | None = None, frequency: float = 6) -> None:
        super().__init__(target, rate, mode)
        if delta <= 0 or (test_delta is not None and test_delta <= 0):
            raise ValueError("SIG delta and test_delta must be positive")
        self.delta, self.frequency = delta, frequency
        self.test_delta = delta if test_delta is None else test_delta

    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        delta = self.delta if train else self.test_delta
        signal = sinusoid(*images.shape[-2:], delta, self.frequency).to(images.device)
        return (images.float() + signal).clamp(0, 255).floor().to(torch.uint8)

    def parameters(self) -> dict:
        return {"delta": self.delta, "test_delta": self.test_delta, "frequency": self.frequency}
