"""QuickNet: a short, wide VGG-style network made for accuracy per CPU-minute.

WRN-16-1's 16-64-channel convolutions are too thin to keep a CPU's vector units busy: its
time goes to memory traffic, not arithmetic. QuickNet spends the same time on fewer,
wider layers, in the shape airbench (Jordan, 2024) found fast on a GPU:

    stem   `whiten`: a frozen 2x2 patch-whitening conv (+ its negation), GELU   32 -> 31
           otherwise: a learned 3x3 conv, BN, GELU                            32 -> 32
    block  conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU, widths[i]
    head   global max-pool, x 1/9 -> Linear(widths[-1], classes)

Three more of airbench's choices make a short run train faster, each a constructor setting:
- `dirac`: each conv starts as the identity on its first input-width filters (the rest
  random), so a fresh deep stack passes its input through instead of scrambling it.
- `scale_free_norm`: BatchNorm keeps a fixed scale of 1 (only its shift is learned), so every
  conv is scale-invariant and its shift can take the large learning rate the recipe gives
  norm biases (OptimConfig.norm_bias_lr_scale).
- the 1/9 on the pooled features keeps the first logits small, which the recipe's high
  learning rate needs.

The whitening filters are the data's own: the first batch the network sees fixes them
(the eigenvectors of its 2x2-patch covariance, scaled to unit variance), so they need no
extra pass over the data and are saved, as buffers, with the weights. Every first layer
then sees decorrelated inputs, which is what lets a short run train fast.

Design choices and their measured effect are in benchmarks/RESULTS.md ("A quick recipe").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_rows
from .base import Classifier


FEATURE_SCALE = 1 / 9


def _conv_bn(c_in: int, c_out: int, pool: bool, dirac: bool, scale_free_norm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    if dirac:
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    layers: list[nn.Module] = [conv]
    if pool:
        # pooling right after the conv, before BN: BN and GELU then run on a quarter of the
        # pixels (airbench's order)
        layers.append(nn.MaxPool2d(2))
    norm = nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.4 if scale_free_norm else 0.1)
    if scale_free_norm:
        norm.weight.requires_grad_(False)
    return layers + [norm, nn.GELU()]


class PatchWhitening(nn.Module):
    """A 2x2 conv whose filters whiten the data's 2x2 patches, set from the first batch seen.

    Output channels: the 12 whitening filters and their negations (so the GELU after it
    keeps both signs); a learned bias per channel."""

    def __init__(self, eps: float = 5e-4) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.zeros(24, 3, 2, 2))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.bias = nn.Parameter(torch.zeros(24))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):
            patches = F.unfold(x.float(), 2).transpose(1, 2).reshape(-1, 12)
            patches = patches - patches.mean(0)
            covariance = patches.T @ patches / len(patches)
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
            filters = (eigenvectors.T / (eigenvalues + self.eps).sqrt()[:, None]).reshape(12, 3, 2, 2)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self.fit(all_rows(x))   # under torchrun: the whole first batch, not this rank's slice
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class QuickNet(Classifier):
    def __init__(self, widths: tuple[int, ...] = (64, 256, 256), stem: int = 32, whiten: bool = True,
                 dirac: bool = True, scale_free_norm: bool = True, num_classes: int = 10, **norm) -> None:
        super().__init__(**norm)
        if len(widths) != 3:
            raise ValueError(f"QuickNet has three blocks; got widths {widths}")
        options = {"dirac": dirac, "scale_free_norm": scale_free_norm}
        if whiten:
            self.stem = nn.Sequential(PatchWhitening(), nn.GELU())
            channels = 24
        else:
            self.stem, channels = nn.Sequential(*_conv_bn(3, stem, pool=False, **options)), stem
        blocks = []
        for width in widths:
            blocks.append(nn.Sequential(*_conv_bn(channels, width, pool=True, **options),
                                        *_conv_bn(width, width, pool=False, **options)))
            channels = width
        # named as WRN's groups, so methods that work on a network's groups (NAD's attention,
        # ASD's last group) find them
        self.block1, self.block2, self.block3 = blocks
        self.feature_dim = channels
        self.head = nn.Linear(channels, num_classes)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.stem(x))))
        return F.adaptive_max_pool2d(out, 1).flatten(1) * FEATURE_SCALE
