"""Label-consistent backdoor (Turner et al. 2019), clean-label, as in spec §1.3.

1. Train (or load) a clean reference model.
2. On the selected target-class training images, run PGD against it (L-inf, eps 8/255,
   step 2/255, `steps` steps, random start), maximising the loss of their true label:
   the perturbed images become hard to classify from their content, so the network
   leans on the trigger to fit them.
3. Stamp the four-corner grid trigger on them; labels stay unchanged.
At test time only the corner grids are added (no PGD).

The four corners follow the reference `fourCornerTrigger`: the 3x3 BadNets grid at
rows/cols 29-31 and its mirror images at rows 1-3 / cols 29-31 (flipped top-bottom),
rows 29-31 / cols 1-3 (flipped left-right) and rows 1-3 / cols 1-3 (both); the three
extra patches start at index 1, not 0, as in that code. `size` scales the grid.
eps and step are in pixel units of the 0-255 scale (8 = 8/255).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.imageset import ImageSet
from .badnets import GRID_3x3
from .base import Attack, stamp
from .reference import reference_model


class LabelConsistent(Attack):
    name = "lc"
    clean_label = True

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", eps: float = 8,
                 step: float = 2, steps: int = 4, random_start: bool = True, size: int = 3,
                 reference: str | None = None, reference_epochs: int | None = None, batch_size: int = 256) -> None:
        super().__init__(target, rate, mode)
        if eps < 0 or step <= 0 or steps < 0 or size < 1:
            raise ValueError("eps must be >= 0, step > 0, steps >= 0, size >= 1")
        self.eps, self.step, self.steps, self.random_start, self.size = eps, step, steps, random_start, size
        self.reference, self.reference_epochs, self.batch_size = reference, reference_epochs, batch_size
        self.model: nn.Module | None = None
        self.runtime = None

    def prepare(self, train: ImageSet, context: Any) -> None:
        if self.steps > 0 and self.eps > 0:
            self.model = reference_model(train, context, self.reference, self.reference_epochs)
            self.runtime = context.runtime

    # ------------------------------------------------------------------ trigger
    def corners(self) -> list[tuple[torch.Tensor, str]]:
        grid = GRID_3x3.float()[None, None]
        if self.size != 3:
            grid = F.interpolate(grid, size=(self.size, self.size), mode="nearest")
        grid = grid[0].to(torch.uint8).expand(3, -1, -1)
        return [(grid, "bottom-right"), (grid.flip(1), "top-right"), (grid.flip(2), "bottom-left"),
                (grid.flip(1).flip(2), "top-left")]

    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        height, width = images.shape[-2:]
        s = self.size
        if 2 * s + 1 > min(height, width):
            raise ValueError(f"{s}x{s} corner grids do not fit a {height}x{width} image")
        places = {"bottom-right": (height - s, width - s), "top-right": (1, width - s),
                  "bottom-left": (height - s, 1), "top-left": (1, 1)}
        for patch, where in self.corners():
            images = stamp(images, patch, *places[where])
        return images

    def poison_images(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.steps > 0 and self.eps > 0:
            if self.model is None:
                raise RuntimeError("LC perturbs images against a reference model: call attack.prepare(train, ctx) first")
            images = torch.cat([pgd(self.model, images[i:i + self.batch_size], labels[i:i + self.batch_size],
                                    self.eps / 255, self.step / 255, self.steps, self.random_start, g,
                                    self.runtime.device)
                                for i in range(0, len(images), self.batch_size)])
        return self.apply_trigger(images, train=True)

    def parameters(self) -> dict:
        return {"eps": self.eps, "step": self.step, "steps": self.steps, "random_start": self.random_start,
                "units": "pixel values on the 0-255 scale", "size": self.size, "trigger": "four-corner grid",
                "reference": self.reference or "trained clean model", "reference_epochs": self.reference_epochs}


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int,
        random_start: bool, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Untargeted L-inf PGD on uint8 images (eps/step in [0, 1] units); returns uint8 within eps."""
    model.eval()
    clean = augment.to_float(images).to(device)
    y = labels.to(device)
    x = clean.clone()
    if random_start:
        x = (x + (torch.rand(clean.shape, generator=g) * 2 - 1).to(device) * eps).clamp(0, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x)
        x = x.detach() + step * grad.sign()
        x = torch.max(torch.min(x, clean + eps), clean - eps).clamp(0, 1)
    # rounding to the nearest level keeps |x' - x| <= eps, since x itself sits on a level
    return augment.to_uint8(x.detach()).cpu()
