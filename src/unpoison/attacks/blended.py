"""Blended (Chen et al. 2017): a fixed full-image pattern mixed into the image, relabelled.

x' = floor((1 - alpha) * x + alpha * P), alpha = 0.2 (spec §1.3; floored like the
reference code). The pattern P is one of:
  noise  uniform integer noise in [0, 255], one value per pixel shared by the three
         channels (the reference `randomPixelTrigger`), drawn ONCE from `pattern_seed`.
         The reference code redraws it for every image, so no fixed trigger exists
         there; a Blended attack needs a fixed one.
  image  any image file (`pattern=PATH`), converted to RGB and resized (bilinear) to
         the image size, like the reference `kittyTrigger` with hello_kitty.png.
  strip  Blend-Strip: the reference `signalTrigger` mask, a stripe pattern that is the
         same on every row and channel and varies along the columns (values below).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Attack, blend

# signal_cifar10_mask.npy of ABL / Effective_backdoor_defense, columns 0..31 (spec §1.3):
# a sinusoid of amplitude ~20, period ~8 px whose negative half-waves wrapped to 236-255
STRIP_COLUMNS = (0, 14, 19, 13, 255, 241, 237, 244, 2, 15, 19, 11, 253, 240, 237, 246,
                 4, 17, 19, 9, 251, 239, 238, 248, 6, 18, 18, 7, 249, 238, 238, 250)


class Blended(Attack):
    name = "blended"

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", trigger: str | None = None,
                 pattern: str | None = None, alpha: float = 0.2, pattern_seed: int = 0) -> None:
        super().__init__(target, rate, mode)
        trigger = trigger or ("image" if pattern else "noise")
        if trigger not in ("noise", "image", "strip"):
            raise ValueError(f"Blended trigger must be noise, image or strip, got {trigger!r}")
        if trigger == "image" and not pattern:
            raise ValueError("the Blended image trigger needs pattern=PATH (an image file)")
        if pattern and trigger != "image":
            raise ValueError(f"pattern={pattern!r} is an image file; it goes with trigger 'image', not {trigger!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if pattern and not Path(pattern).is_file():
            raise ValueError(f"Blended pattern image {pattern!r} does not exist")
        self.trigger, self.pattern_path, self.alpha, self.pattern_seed = trigger, pattern, alpha, pattern_seed
        self._patterns: dict[tuple[int, int], torch.Tensor] = {}

    def pattern(self, height: int, width: int) -> torch.Tensor:
        """The (3, H, W) uint8 pattern for images of this size (built once per size)."""
        if (height, width) not in self._patterns:
            self._patterns[(height, width)] = self._make_pattern(height, width)
        return self._patterns[(height, width)]

    def _make_pattern(self, height: int, width: int) -> torch.Tensor:
        if self.trigger == "noise":
            g = torch.Generator().manual_seed(self.pattern_seed)
            return torch.randint(0, 256, (1, height, width), generator=g, dtype=torch.uint8).expand(3, -1, -1).clone()
        if self.trigger == "strip":
            # tiled along the columns for widths other than 32 (the stripe period is ~8 px)
            columns = torch.tensor(STRIP_COLUMNS, dtype=torch.uint8).repeat(-(-width // len(STRIP_COLUMNS)))[:width]
            return columns.expand(3, height, width).clone()
        from ..data.folder import decode_image

        array = decode_image(Path(self.pattern_path).read_bytes(), (height, width))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return blend(images, self.pattern(*images.shape[-2:]), self.alpha)

    def parameters(self) -> dict:
        out = {"trigger": self.trigger, "alpha": self.alpha}
        if self.trigger == "noise":
            out["pattern_seed"] = self.pattern_seed
        if self.trigger == "image":
            out["pattern"] = str(self.pattern_path)
        return out
