"""Batched image augmentations on float tensors in [0, 1], shape (B, C, H, W).

Every random choice is drawn per sample from an explicit CPU `torch.Generator`, so an
augmented batch is reproducible from a seed and identical on any device; the pixel work
runs on whatever device the batch lives on. There is no per-sample Python here: each
operation is a handful of whole-batch tensor ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Gen = torch.Generator


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255.0).round().to(torch.uint8)


def _uniform(n: int, low: float, high: float, g: Gen, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (high - low) + low).to(device)


def _coin(n: int, p: float, g: Gen, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as PIL's convert('L') uses; shape (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(image: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance semantics: factor 0 gives `degenerate`, 1 gives the image."""
    factor = factor.view(-1, 1, 1, 1)
    return (degenerate + factor * (image - degenerate)).clamp(0, 1)


# ----------------------------------------------------------------------- geometry

def affine(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", fill: float = 0.0) -> torch.Tensor:
    """Warp each image by its own 2x3 matrix (output -> input, normalised coordinates)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if fill:
        return F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _matrices(n: int, device) -> torch.Tensor:
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    return theta


def rotate(x: torch.Tensor, degrees: torch.Tensor, mode: str = "bilinear", fill: float = 0.0) -> torch.Tensor:
    """Rotate counter-clockwise by `degrees` (one per image) about the centre."""
    rad = degrees.to(x.device) * math.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = _matrices(len(x), x.device)
    # output -> input is the inverse rotation; y points down in image coordinates
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return affine(x, theta, mode, fill)


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, mode: str = "bilinear",
              fill: float = 0.0) -> torch.Tensor:
    """Shift right by dx and down by dy pixels (one pair per image)."""
    h, w = x.shape[-2:]
    theta = _matrices(len(x), x.device)
    theta[:, 0, 2] = -2 * dx.to(x.device) / w
    theta[:, 1, 2] = -2 * dy.to(x.device) / h
    return affine(x, theta, mode, fill)


def shear(x: torch.Tensor, amount: torch.Tensor, axis: int, fill: float = 0.0) -> torch.Tensor:
    theta = _matrices(len(x), x.device)
    theta[:, axis, 1 - axis] = amount.to(x.device)
    return affine(x, theta, "bilinear", fill)


def random_crop(x: torch.Tensor, g: Gen, padding: int = 4, pad_mode: str = "constant") -> torch.Tensor:
    """Pad every side by `padding`, then crop back to size at a random offset per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode=pad_mode)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def random_flip(x: torch.Tensor, g: Gen, p: float = 0.5) -> torch.Tensor:
    flip = _coin(len(x), p, g, x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def random_resized_crop(x: torch.Tensor, g: Gen, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop, batched (out-of-range boxes are clamped, not redrawn)."""
    n = len(x)
    area = _uniform(n, *scale, g, x.device)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, x.device)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (w / 2 + torch.rand(n, generator=g).to(x.device) * (1 - w))
    cy = (h / 2 + torch.rand(n, generator=g).to(x.device) * (1 - h))
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    return affine(x, theta, "bilinear")


def cutout(x: torch.Tensor, g: Gen, size: int, fill: float = 0.5) -> torch.Tensor:
    """Fill a size x size square centred at a random pixel (clipped at the border)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=g).to(x.device)[:, None, None]
    cx = torch.randint(0, w, (b,), generator=g).to(x.device)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    half = size // 2
    inside = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (xs < cx - half + size)
    return torch.where(inside[:, None], torch.full_like(x, fill), x)


# ----------------------------------------------------------------------- colour

def autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp(min=1e-8), torch.ones_like(hi))
    offset = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - offset) * scale).clamp(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per channel, batched via 256-bin histograms."""
    b, c, h, w = x.shape
    levels = (x * 255).round().long().clamp(0, 255).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    last_value = hist.gather(1, (levels.max(dim=1, keepdim=True).values))  # count of the top level
    step = torch.div(h * w - last_value, 255, rounding_mode="floor")
    cdf_before = hist.cumsum(1) - hist
    lut = torch.div(cdf_before + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1),
                    rounding_mode="floor").clamp(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device, dtype=torch.float).expand_as(lut))
    out = lut.gather(1, levels).reshape(b, c, h, w) / 255.0
    return out.to(x.dtype)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    levels = (x * 255).round().long()
    shift = (8 - bits.long().to(x.device)).view(-1, 1, 1, 1)
    return ((levels >> shift) << shift).to(x.dtype) / 255.0


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert pixels at or above the threshold (in [0, 1])."""
    return torch.where(x >= threshold.to(x.device).view(-1, 1, 1, 1), 1.0 - x, x)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(x, kernel, padding=1, groups=x.shape[1])
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth[..., 1:-1, 1:-1]  # PIL keeps the border pixels
    return _blend(x, degenerate, factor.to(x.device))


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor.to(x.device))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), factor.to(x.device))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).expand_as(x), factor.to(x.device))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) via HSV, like torchvision."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = (hue + shift.to(x.device).view(-1, 1, 1)) % 1.0
    # HSV -> RGB
    h6 = hue * 6.0
    i = torch.floor(h6)
    f = h6 - i
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.long() % 6
    candidates = torch.stack([
        torch.stack([v, q, p, p, t, v], 1),
        torch.stack([t, v, v, q, p, p], 1),
        torch.stack([p, p, t, v, v, q], 1),
    ], 1)  # (B, 3, 6, H, W)
    return candidates.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


# ----------------------------------------------------------------------- policies

def weak(x: torch.Tensor, g: Gen, padding: int = 4, pad_mode: str = "constant") -> torch.Tensor:
    """The standard CIFAR augmentation: random crop with padding, then horizontal flip."""
    return random_flip(random_crop(x, g, padding, pad_mode), g)


# FixMatch's RandAugment pool; each op takes a magnitude in [0, 1] and a random sign.
def _op_rotate(x, m, s): return rotate(x, 30.0 * m * s, fill=0.5)
def _op_shear_x(x, m, s): return shear(x, 0.3 * m * s, axis=0, fill=0.5)
def _op_shear_y(x, m, s): return shear(x, 0.3 * m * s, axis=1, fill=0.5)
def _op_translate_x(x, m, s): return translate(x, 0.3 * m * s * x.shape[-1], torch.zeros_like(m), fill=0.5)
def _op_translate_y(x, m, s): return translate(x, torch.zeros_like(m), 0.3 * m * s * x.shape[-2], fill=0.5)


RANDAUGMENT_OPS = {
    "identity": lambda x, m, s: x,
    "autocontrast": lambda x, m, s: autocontrast(x),
    "equalize": lambda x, m, s: equalize(x),
    "brightness": lambda x, m, s: adjust_brightness(x, 0.05 + 0.9 * m),
    "color": lambda x, m, s: adjust_saturation(x, 0.05 + 0.9 * m),
    "contrast": lambda x, m, s: adjust_contrast(x, 0.05 + 0.9 * m),
    "sharpness": lambda x, m, s: sharpness(x, 0.05 + 0.9 * m),
    "posterize": lambda x, m, s: posterize(x, 4 + (4 * m).round()),
    "solarize": lambda x, m, s: solarize(x, 1.0 - m),
    "rotate": _op_rotate,
    "shear_x": _op_shear_x,
    "shear_y": _op_shear_y,
    "translate_x": _op_translate_x,
    "translate_y": _op_translate_y,
}


def randaugment(x: torch.Tensor, g: Gen, num_ops: int = 2, apply_prob: float = 0.5) -> torch.Tensor:
    """FixMatch's RandAugment: `num_ops` ops drawn uniformly per image, each applied with
    probability `apply_prob` at a random magnitude in {0.1, ..., 0.9} of its range."""
    n = len(x)
    names = list(RANDAUGMENT_OPS)
    for _ in range(num_ops):
        op = torch.randint(0, len(names), (n,), generator=g)
        magnitude = torch.randint(1, 10, (n,), generator=g).float() / 10
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        apply = torch.rand(n, generator=g) < apply_prob
        out = x.clone()
        for k, name in enumerate(names):
            chosen = ((op == k) & apply).nonzero().flatten()
            if len(chosen):
                idx = chosen.to(x.device)
                out[idx] = RANDAUGMENT_OPS[name](x[idx], magnitude[chosen].to(x.device), sign[chosen].to(x.device))
        x = out
    return x


def strong(x: torch.Tensor, g: Gen, cutout_fraction: float = 0.5) -> torch.Tensor:
    """FixMatch strong augmentation: weak flip+crop, RandAugment, then Cutout of half the side."""
    x = randaugment(weak(x, g, pad_mode="reflect"), g)
    return cutout(x, g, int(round(cutout_fraction * x.shape[-1])), fill=0.5)


def contrastive_view(x: torch.Tensor, g: Gen, jitter: float = 0.4, hue: float = 0.1,
                     jitter_prob: float = 0.8, gray_prob: float = 0.2) -> torch.Tensor:
    """SimCLR / SupCon view: random resized crop (0.2-1), flip, colour jitter, grayscale."""
    n, dev = len(x), x.device
    x = random_flip(random_resized_crop(x, g), g)
    jittered = _coin(n, jitter_prob, g, dev).view(-1, 1, 1, 1)
    b = _uniform(n, 1 - jitter, 1 + jitter, g, dev)
    c = _uniform(n, 1 - jitter, 1 + jitter, g, dev)
    s = _uniform(n, 1 - jitter, 1 + jitter, g, dev)
    h = _uniform(n, -hue, hue, g, dev)
    y = x
    for step in torch.randperm(4, generator=g).tolist():  # torchvision applies them in random order
        if step == 0:
            y = adjust_brightness(y, b)
        elif step == 1:
            y = adjust_contrast(y, c)
        elif step == 2:
            y = adjust_saturation(y, s)
        else:
            y = adjust_hue(y, h)
    x = torch.where(jittered, y, x)
    gray = _coin(n, gray_prob, g, dev).view(-1, 1, 1, 1)
    return torch.where(gray, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, g: Gen, kernel_size: int = 15, sigma=(0.1, 2.0)) -> torch.Tensor:
    """Per-image Gaussian blur with sigma drawn uniformly (reflect padding, like torchvision)."""
    n, c = x.shape[:2]
    sig = _uniform(n, *sigma, g, x.device)
    r = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    k1 = torch.exp(-(r[None] ** 2) / (2 * sig[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (N, K)
    pad = kernel_size // 2
    flat = x.reshape(1, n * c, *x.shape[2:])
    kh = k1.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kh[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kh[:, None, :, None], groups=n * c)
    return flat.reshape_as(x)


def random_erase(x: torch.Tensor, g: Gen, scale=(0.2, 0.3), ratio=(0.5, 1.0)) -> torch.Tensor:
    """torchvision RandomErasing(p=1, value='random'): a random-noise rectangle per image."""
    n, c, h, w = x.shape
    area = _uniform(n, *scale, g, x.device) * h * w
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, x.device))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (torch.rand(n, generator=g).to(x.device) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=g).to(x.device) * (w - ew + 1)).floor()
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1)))
    noise = torch.randn(x.shape, generator=g).to(x.device).clamp(-3, 3) / 6 + 0.5
    return torch.where(inside[:, None], noise, x)


def fct_transform(x: torch.Tensor, g: Gen, max_degrees: float = 180.0, max_shift: float = 0.2) -> torch.Tensor:
    """The FCT paper's transformation: RandomRotation(180) then RandomAffine(translate 0.2),
    nearest interpolation, zero fill, composed into one warp."""
    n, _, h, w = x.shape
    deg = _uniform(n, -max_degrees, max_degrees, g, x.device)
    dx = torch.round(_uniform(n, -max_shift * w, max_shift * w, g, x.device))
    dy = torch.round(_uniform(n, -max_shift * h, max_shift * h, g, x.device))
    rad = deg * math.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros(n, 2, 3, device=x.device)
    # output p -> input R^-1 (p - t): the translation is applied after the rotation
    tx, ty = 2 * dx / w, 2 * dy / h
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, 0, 2] = -(cos * tx - sin * ty)
    theta[:, 1, 2] = -(sin * tx + cos * ty)
    return affine(x, theta, "nearest")


TRANSFORMS = {
    "rotate_translate": fct_transform,
    "flip": lambda x, g: x.flip(3),
    "crop": lambda x, g: random_crop(x, g, 4),
    "blur": gaussian_blur,
    "erase": random_erase,
}
