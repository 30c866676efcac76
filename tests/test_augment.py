import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from unpoison.data import augment


def batch(n=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


POLICIES = {
    "weak": augment.weak,
    "strong": augment.strong,
    "contrastive": augment.contrastive_view,
    "fct": augment.fct_transform,
    "blur": augment.gaussian_blur,
    "erase": augment.random_erase,
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_keeps_dtype_shape_range_and_is_seeded(name):
    x = augment.to_float(batch())
    a = POLICIES[name](x, torch.Generator().manual_seed(1))
    b = POLICIES[name](x, torch.Generator().manual_seed(1))
    c = POLICIES[name](x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_crop_is_a_shifted_copy():
    x = augment.to_float(batch(4))
    out = augment.random_crop(x, torch.Generator().manual_seed(0), padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        found = any(torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))
        assert found


def test_flip_flips_about_half():
    x = augment.to_float(batch(400))
    out = augment.random_flip(x, torch.Generator().manual_seed(0))
    flipped = sum(torch.equal(out[i], x[i].flip(2)) for i in range(400))
    assert 150 < flipped < 250


def _pil(img_uint8):
    return Image.fromarray(img_uint8.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("op,pil_op", [
    (augment.equalize, ImageOps.equalize),
    (augment.autocontrast, ImageOps.autocontrast),
])
def test_colour_ops_match_pil(op, pil_op):
    img = batch(1, 16)[0] // 2 + 40  # not spanning the full range, so the ops do something
    ours = augment.to_uint8(op(augment.to_float(img[None])))[0]
    theirs = torch.from_numpy(np.asarray(pil_op(_pil(img)))).permute(2, 0, 1)
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_posterize_and_solarize_match_pil():
    img = batch(1, 16)[0]
    x = augment.to_float(img[None])
    ours = augment.to_uint8(augment.posterize(x, torch.tensor([4])))[0]
    theirs = torch.from_numpy(np.asarray(ImageOps.posterize(_pil(img), 4))).permute(2, 0, 1)
    assert torch.equal(ours, theirs)
    ours = augment.to_uint8(augment.solarize(x, torch.tensor([128 / 255])))[0]
    theirs = torch.from_numpy(np.asarray(ImageOps.solarize(_pil(img), 128))).permute(2, 0, 1)
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_fct_transform_without_rotation_or_shift_is_identity():
    x = augment.to_float(batch(3))
    out = augment.fct_transform(x, torch.Generator().manual_seed(0), max_degrees=0.0, max_shift=0.0)
    assert torch.equal(out, x)


def test_fct_transform_translation_moves_pixels_within_bound():
    x = torch.zeros(64, 3, 32, 32)
    x[..., 16, 16] = 1.0
    out = augment.fct_transform(x, torch.Generator().manual_seed(0), max_degrees=0.0, max_shift=0.2)
    moved = 0
    for img in out:
        ys, xs = img[0].nonzero(as_tuple=True)
        assert len(ys) == 1  # nearest interpolation keeps one pixel
        assert abs(int(ys) - 16) <= 7 and abs(int(xs) - 16) <= 7
        moved += int(ys) != 16 or int(xs) != 16
    assert moved > 32


def test_hue_shift_of_a_full_turn_is_identity():
    x = augment.to_float(batch(4))
    out = augment.adjust_hue(x, torch.ones(4))
    assert torch.allclose(out, x, atol=1e-5)


def test_cutout_fills_a_square():
    x = torch.zeros(8, 3, 32, 32)
    out = augment.cutout(x, torch.Generator().manual_seed(0), 16, fill=0.5)
    filled = (out[:, 0] == 0.5).sum(dim=(1, 2))
    assert (filled <= 256).all() and (filled >= 64).all()
