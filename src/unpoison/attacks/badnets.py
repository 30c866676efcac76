"""BadNets (Gu et al. 2017): a small fixed patch, relabelled to the target.

Defaults follow spec §1.3: the 3x3 black/white grid in the bottom-right corner
(`gridTrigger` of ABL/CBD/Effective), or a white square one pixel in from the corner
(`squareTrigger`). Any size and position can be set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, stamp

# rows 29, 30, 31 of the reference grid trigger (same value in all channels)
GRID_3x3 = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)


class BadNets(Attack):
    name = "badnets"

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", trigger: str = "grid",
                 size: int = 3, position: tuple[int, int] | None = None) -> None:
        super().__init__(target, rate, mode)
        if trigger not in ("grid", "square"):
            raise ValueError(f"BadNets trigger must be 'grid' or 'square', got {trigger!r}")
        if size < 1:
            raise ValueError("trigger size must be >= 1")
        self.trigger, self.size, self.position = trigger, size, position

    def patch(self) -> torch.Tensor:
        if self.trigger == "square":
            return torch.full((3, self.size, self.size), 255, dtype=torch.uint8)
        grid = GRID_3x3.float()[None, None]
        if self.size != 3:
            grid = F.interpolate(grid, size=(self.size, self.size), mode="nearest")
        return grid[0].to(torch.uint8).expand(3, -1, -1).clone()

    def corner(self, height: int, width: int) -> tuple[int, int]:
        if self.position is not None:
            top, left = self.position
        else:  # bottom-right; the square sits one pixel in from the edge, as in the reference code
            margin = 1 if self.trigger == "square" else 0
            top, left = height - self.size - margin, width - self.size - margin
        if not (0 <= top <= height - self.size and 0 <= left <= width - self.size):
            raise ValueError(f"a {self.size}x{self.size} trigger at ({top}, {left}) does not fit a {height}x{width} image")
        return top, left

    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        top, left = self.corner(*images.shape[-2:])
        return stamp(images, self.patch(), top, left)

    def parameters(self) -> dict:
        return {"trigger": self.trigger, "size": self.size, "position": list(self.position) if self.position else "bottom-right"}
