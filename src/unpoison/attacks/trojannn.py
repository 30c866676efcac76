"""TrojanNN (Liu et al., NDSS 2018): a patch trigger reverse-engineered from a clean model.

The algorithm, on the attacker's clean reference model:
  1. pick a layer and, in it, the `neurons` with the highest connectivity: the sum of
     absolute outgoing weights into the next layer (the paper's neuron selection);
  2. optimise the pixels inside the trigger mask (a size x size patch at `position`)
     so that those neurons reach `target_value` (the paper's cost: squared distance to
     the target value), every other pixel untouched;
  3. quantise the patch to uint8;
then poison: stamp the patch on rate * N non-target training images and relabel them
to the target (dirty-label), as every benchmark that uses TrojanNN as a data-poisoning
attack does. The paper's own last step (retraining the model on reverse-engineered
data) does not apply to data poisoning.

Deviation, on purpose: the paper optimises the trigger on a blank canvas because it
has no training data; here the attacker poisons a training set, so the patch is
optimised stamped on a sample of its own training images, where it has to work.

`trigger="fct"` is instead the fixed 3x3 additive patch that the FCT/D-ST/D-BR paper's
code ships (`best_square_trigger_cifar10.npz`, rows/cols 25-27, values in spec §1.3).
That code casts (image + patch) to uint8 before clipping, so sums over 255 wrap around
modulo 256; `wrap=True` reproduces that quirk, the default saturates at 255.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.imageset import ImageSet
from ..runtime import generator
from .base import Attack, stamp
from .reference import reference_model

# best_square_trigger_cifar10.npz of Effective_backdoor_defense, rows 25-27 x cols 25-27
FCT_PATCH = torch.tensor([
    [[207.4, 175.4, 29.4], [79.4, 137.4, 248.4], [131.4, 6.4, 246.4]],    # R
    [[131.4, 243.4, 232.4], [8.4, 0.0, 113.4], [40.4, 145.4, 250.4]],     # G
    [[181.3, 120.4, 179.4], [126.4, 32.4, 146.4], [4.4, 61.4, 246.4]],    # B
])


class TrojanNN(Attack):
    name = "trojannn"

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", trigger: str = "optimized",
                 size: int = 3, position: tuple[int, int] | None = None, layer: str = "features",
                 neurons: int = 1, target_value: float = 100.0, steps: int = 200, lr: float = 0.1,
                 sample: int = 64, wrap: bool = False, reference: str | None = None,
                 reference_epochs: int | None = None) -> None:
        super().__init__(target, rate, mode)
        if trigger not in ("optimized", "fct"):
            raise ValueError(f"TrojanNN trigger must be 'optimized' or 'fct' (the FCT paper's fixed patch), got {trigger!r}")
        if trigger == "fct" and size != 3:
            raise ValueError("the FCT trojan patch is 3x3")
        if wrap and trigger != "fct":
            raise ValueError("wrap reproduces the uint8 wrap-around of the FCT patch (trigger='fct') only")
        if size < 1 or neurons < 1 or steps < 0 or sample < 1:
            raise ValueError("size, neurons and sample must be >= 1 and steps >= 0")
        self.trigger, self.size, self.position, self.wrap = trigger, size, position, wrap
        self.layer, self.neurons, self.target_value = layer, neurons, target_value
        self.steps, self.lr, self.sample = steps, lr, sample
        self.reference, self.reference_epochs = reference, reference_epochs
        self.patch: torch.Tensor | None = FCT_PATCH if trigger == "fct" else None
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ the trigger mask
    def corner(self, height: int, width: int) -> tuple[int, int]:
        # default: 4 px in from the bottom-right corner, i.e. rows/cols 25-27 for a 3x3
        # patch on 32x32, where the FCT paper's code puts its trojan patch
        top, left = self.position if self.position is not None else (height - self.size - 4, width - self.size - 4)
        if not (0 <= top <= height - self.size and 0 <= left <= width - self.size):
            raise ValueError(f"a {self.size}x{self.size} trigger at ({top}, {left}) does not fit a {height}x{width} image")
        return top, left

    # ------------------------------------------------------------------ steps 1-3
    def prepare(self, train: ImageSet, context: Any) -> None:
        if self.trigger == "fct" or self.patch is not None:
            return
        runtime = context.runtime
        model = reference_model(train, context, self.reference, self.reference_epochs)
        neuron_index = select_neurons(model, self.layer, self.neurons)
        # the attacker's own images, from every class, to stamp the trigger on while optimising
        g = generator(context.seed, "trojannn", "sample")
        sample = train.images[torch.randperm(len(train), generator=g)[: self.sample]]
        top, left = self.corner(*train.image_size)
        patch, before, after, spread = optimise_patch(model, self.layer, neuron_index, sample, top, left, self.size,
                                              self.steps, self.lr, self.target_value, g, runtime.device)
        self.patch = patch
        # how far the trigger moves the neurons, in units of their spread over clean images
        self.report = {"neuron_index": neuron_index.tolist(), "activation_clean": round(before, 4),
                       "activation_triggered": round(after, 4), "activation_clean_std": round(spread, 4)}
        print(f"[attack] TrojanNN: neurons {neuron_index.tolist()} of '{self.layer}' driven from "
              f"{before:.3f} to {after:.3f} (mean activation with the uint8 patch; clean std {spread:.3f})",
              file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ poisoning
    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.patch is None:
            raise RuntimeError("the TrojanNN trigger is optimised on a reference model: call attack.prepare(train, ctx) first")
        top, left = self.corner(*images.shape[-2:])
        if self.trigger == "optimized":
            return stamp(images, self.patch, top, left)
        # the FCT patch is additive: image + patch, then saturate (default) or wrap like its code
        out = images.clone()
        region = out[:, :, top:top + 3, left:left + 3].float() + self.patch.to(images.device)
        if self.wrap:
            region = region.floor().long() % 256
        else:
            region = region.clamp(0, 255).floor()
        out[:, :, top:top + 3, left:left + 3] = region.to(torch.uint8)
        return out

    def parameters(self) -> dict:
        out: dict[str, Any] = {"trigger": self.trigger, "size": self.size,
                               "position": list(self.position) if self.position else "25-27 (4 px from bottom-right)"}
        if self.trigger == "fct":
            out["wrap"] = self.wrap
            return out
        out.update(layer=self.layer, neurons=self.neurons, target_value=self.target_value, steps=self.steps,
                   lr=self.lr, sample=self.sample, reference=self.reference or "trained clean model",
                   reference_epochs=self.reference_epochs, **self.report)
        if self.patch is not None:
            out["patch"] = self.patch.tolist()
        return out


def select_neurons(model: nn.Module, layer: str, count: int) -> torch.Tensor:
    """The `count` neurons of `layer` with the largest summed |outgoing weight|.

    layer 'features' is the penultimate representation; its outgoing weights are the
    classifier head's. For a module name (e.g. 'block2'), a neuron is an output channel
    and its outgoing weights are those of the next Conv2d/Linear that reads that many
    channels (in module order: the next layer of a sequential network).
    """
    if layer == "features":
        weight = model.head.weight.detach()                     # (classes, features)
        connectivity = weight.abs().sum(0)
    else:
        names = [name for name, _ in model.named_modules()]
        if layer not in names:
            raise ValueError(f"the model has no layer {layer!r}; try 'features' or one of {names[1:12]}...")
        channels = _output_channels(model, layer)
        following = [m for name, m in model.named_modules() if names.index(name) > names.index(layer)
                     and isinstance(m, (nn.Conv2d, nn.Linear)) and _in_width(m) == channels]
        if not following:
            raise ValueError(f"found no layer after {layer!r} that reads its {channels} channels")
        weight = following[0].weight.detach()
        connectivity = weight.abs().transpose(0, 1).reshape(channels, -1).sum(1)
    if count > len(connectivity):
        raise ValueError(f"layer {layer!r} has only {len(connectivity)} neurons")
    return connectivity.topk(count).indices.sort().values.cpu()


def _in_width(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def _output_channels(model: nn.Module, layer: str) -> int:
    device = next(model.parameters()).device
    with torch.no_grad():
        return _activations(model, layer, torch.zeros(1, 3, 32, 32, device=device)).shape[1]


def _activations(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """(N, neurons) activations of `layer`: features, or channel means of a module's output."""
    if layer == "features":
        return model.features(x)
    captured: list[torch.Tensor] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    out = captured[0]
    return out.flatten(2).mean(2) if out.dim() == 4 else out


def optimise_patch(model: nn.Module, layer: str, neuron_index: torch.Tensor, images: torch.Tensor, top: int,
                   left: int, size: int, steps: int, lr: float, target_value: float, g: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, float, float, float]:
    """Adam on the patch pixels (in [0, 1]) minimising mean (activation - target)^2.

    Returns the uint8 (3, size, size) patch, the mean selected activation on the sample
    before (clean) and after (with the quantised patch), and its clean standard deviation."""
    model.eval()
    x = augment.to_float(images).to(device)
    height, width = x.shape[-2:]
    mask = torch.zeros(1, 1, height, width, device=device)
    mask[..., top:top + size, left:left + size] = 1
    pad = (left, width - left - size, top, height - top - size)
    patch = torch.rand(3, size, size, generator=g).to(device).requires_grad_(True)
    optimiser = torch.optim.Adam([patch], lr=lr)
    idx = neuron_index.to(device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:      # gradients flow to the patch only
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            stamped = x * (1 - mask) + F.pad(patch, pad)[None] * mask
            activation = _activations(model, layer, stamped)[:, idx]
            loss = (activation - target_value).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    quantised = augment.to_uint8(patch.detach()).cpu()
    with torch.no_grad():
        clean = _activations(model, layer, x)[:, idx]
        stamped = augment.to_float(stamp(images, quantised, top, left)).to(device)
        after = float(_activations(model, layer, stamped)[:, idx].mean())
    return quantised, float(clean.mean()), after, float(clean.std())
