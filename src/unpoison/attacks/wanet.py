"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping trigger, as data poisoning.

The trigger is one fixed smooth warp of the image: a k x k field of random offsets
(uniform in [-1, 1], normalised to mean magnitude 1), upsampled bicubically to the
image size, scaled by s / H and added to the identity sampling grid, clamped to
[-1, 1]; the image is resampled with grid_sample (bilinear, align_corners=True).
Defaults are the paper's: k = 4, s = 0.5, grid_rescale = 1, drawn from `grid_seed`.
With s = 0.5 no pixel moves by more than about one pixel.

Noise mode (the paper's defence against detection): for every poisoned image,
`cross_ratio` (2) further images are warped with the trigger grid plus a random
per-image perturbation (uniform in [-1/H, 1/H] in grid units) and KEEP their labels,
so the network must learn this exact warp rather than "warped at all".

Data poisoning, not training-time control: the original draws poisoned and noise
samples afresh in every batch (a fresh noise field each time) and trains for
hundreds of epochs; here rate * N non-target images are warped and relabelled once,
and cross_ratio * that many other images get one fixed noise warp each.

Ground truth: `is_poison` marks only the relabelled, trigger-warped images, which
carry the backdoor. The noise-warped images keep their true labels and implant
nothing, so they count as clean; their number and indices are recorded
(`describe()['n_noise']`, `attack.noise_index`) so that detectors flagging them can
be analysed separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import augment
from ..data.imageset import ImageSet
from .base import Attack, PoisonedSet


def warp_grid(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int) -> torch.Tensor:
    """The fixed (1, H, W, 2) sampling grid of the trigger, in grid_sample's [-1, 1] units."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    noise = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((xs, ys), dim=2)[None]      # grid_sample wants (x, y)
    # the paper divides the offsets by the image height (its images are square)
    return ((identity + s * noise / height) * grid_rescale).clamp(-1, 1)


class WaNet(Attack):
    name = "wanet"

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", k: int = 4, s: float = 0.5,
                 grid_rescale: float = 1.0, noise: bool = True, cross_ratio: float = 2.0, grid_seed: int = 0) -> None:
        super().__init__(target, rate, mode)
        if k < 2 or s < 0 or cross_ratio < 0:
            raise ValueError("WaNet needs k >= 2, s >= 0, cross_ratio >= 0")
        self.k, self.s, self.grid_rescale, self.grid_seed = k, s, grid_rescale, grid_seed
        self.noise, self.cross_ratio = noise, cross_ratio
        self.noise_index: torch.Tensor | None = None

    def grid(self, height: int, width: int) -> torch.Tensor:
        return warp_grid(height, width, self.k, self.s, self.grid_rescale, self.grid_seed)

    def warp(self, images: torch.Tensor, noise_generator: torch.Generator | None = None) -> torch.Tensor:
        """Warp uint8 images with the trigger grid (plus per-image noise when a generator is given)."""
        if len(images) == 0:
            return images
        height, width = images.shape[-2:]
        grid = self.grid(height, width).expand(len(images), -1, -1, -1)
        if noise_generator is not None:
            jitter = torch.rand(len(images), height, width, 2, generator=noise_generator) * 2 - 1
            grid = (grid + jitter / height).clamp(-1, 1)
        x = augment.to_float(images)
        warped = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="zeros", align_corners=True)
        return augment.to_uint8(warped)

    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return self.warp(images)

    def poison(self, train: ImageSet, g: torch.Generator) -> PoisonedSet:
        poisoned = super().poison(train, g)
        self.noise_index = torch.empty(0, dtype=torch.long)
        if self.noise and self.cross_ratio > 0:
            pool = (~poisoned.is_poison).nonzero().flatten()
            n = min(int(self.cross_ratio * poisoned.n_poisoned), len(pool))
            self.noise_index = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
            poisoned.train.images[self.noise_index] = self.warp(train.images[self.noise_index], g)
        return poisoned

    def parameters(self) -> dict:
        return {"k": self.k, "s": self.s, "grid_rescale": self.grid_rescale, "grid_seed": self.grid_seed,
                "noise": self.noise, "cross_ratio": self.cross_ratio,
                "n_noise": None if self.noise_index is None else len(self.noise_index),
                "ground_truth": "is_poison marks the relabelled warped images; the noise-warped images "
                                "keep their labels and count as clean"}
