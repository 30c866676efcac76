"""QuickNet, its recipe, and test-time augmentation."""

from dataclasses import replace

import pytest
import torch

from unpoison.data.imageset import ImageSet
from unpoison.defenses import build_defense
from unpoison.models import build_model
from unpoison.profiles import get_profile, model_recipe
from unpoison.train.supervised import predict, train_supervised


def test_quicknet_shapes_backward_and_size():
    model = build_model("quicknet", 10)
    x = torch.rand(8, 3, 32, 32)
    model(x).sum().backward()
    # the whitening filters are data, not parameters: no gradient, no optimiser step
    assert not any(name.startswith("stem.0.weight") for name, _ in model.named_parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # scale-free BatchNorm: the scale stays 1, only the shift learns
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert model.feature_dim == 256 and model(x).shape == (8, 10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1_970_000, rel=0.02)
    assert sum(p.numel() for p in build_model("quicknet-s", 10).parameters()) == pytest.approx(500_000, rel=0.02)


def test_whitening_is_fitted_once_from_the_first_batch_and_travels_with_the_weights():
    g = torch.Generator().manual_seed(0)
    # strongly correlated channels: what whitening removes
    base = torch.rand(64, 1, 32, 32, generator=g)
    x = (0.7 * base + 0.3 * torch.rand(64, 3, 32, 32, generator=g)).clamp(0, 1)
    model = build_model("quicknet-s", 10)
    whitening = model.stem[0]
    assert not whitening.ready
    model(x)
    out = torch.nn.functional.conv2d((x - model.mean) / model.std, whitening.weight[:12])
    per_filter = out.transpose(0, 1).reshape(12, -1)
    assert torch.allclose(per_filter.std(1), torch.ones(12), atol=0.05)
    assert torch.allclose(torch.corrcoef(per_filter), torch.eye(12), atol=0.05)
    fitted = whitening.weight.clone()
    model(torch.rand(64, 3, 32, 32, generator=g))   # a later batch does not refit
    assert torch.equal(whitening.weight, fitted)
    copy = build_model("quicknet-s", 10)
    copy.load_state_dict(model.state_dict())
    assert copy.stem[0].ready and torch.equal(copy.stem[0].weight, fitted)


def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 4, (n,), generator=g), [f"c{i}" for i in range(4)])


def test_quicknet_training_is_deterministic(cpu):
    # QuickNet's own quick recipe (BatchNorm shifts at their own lr, light augmentation), shortened
    data, recipe = _toy(), replace(model_recipe("quick", "quicknet-s"), epochs=2, batch_size=32)
    weights = []
    for _ in range(2):
        torch.manual_seed(123)   # the same initial weights; the run's randomness is its seed's
        model = train_supervised(build_model("quicknet-s", 4), data, recipe, cpu, name="t", seed=7, progress=False)
        weights.append(torch.cat([t.flatten().float() for t in model.state_dict().values()]))
    assert torch.equal(weights[0], weights[1])


def test_tta_averages_an_image_and_its_mirror_and_is_off_by_default(cpu):
    model = build_model("quicknet-s", 4).eval()
    images = _toy(8).images
    plain, tta = predict(model, images, cpu), predict(model, images, cpu, tta=True)
    assert plain.shape == tta.shape == (8, 4)
    with torch.no_grad():   # off by default: one view, the image itself
        assert torch.allclose(plain, model(images.float() / 255), atol=1e-5)
    assert not torch.allclose(plain, tta)
    # the views: the image and its mirror (1/2), and each 1-pixel diagonal shift with its mirror (1/4)
    x = images.float() / 255
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[..., :32, :32], padded[..., 2:, 2:]]
    with torch.no_grad():
        by_view = [(model(v) + model(v.flip(3))) / 2 for v in views]
    assert torch.allclose(tta, by_view[0] / 2 + (by_view[1] + by_view[2]) / 4, atol=1e-4)
    # an image that is its own mirror, flat in colour: every view is the image itself
    uniform = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.allclose(predict(model, uniform, cpu, tta=True), predict(model, uniform, cpu), atol=1e-4)


def test_a_network_recipe_replaces_the_plain_recipe_only_where_a_stage_uses_it():
    quick = get_profile("quick").baseline
    assert model_recipe("quick", "wrn16-1") == quick
    mine = model_recipe("quick", "quicknet")
    assert mine != quick and mine.batch_size > quick.batch_size
    defense = build_defense("quarantine", "quick", "quicknet")
    assert defense.config.train == mine
    # the probe's short SL stage keeps its own recipe
    assert defense.config.probe == build_defense("quarantine", "quick").config.probe
    # --set still wins over the network's recipe
    assert build_defense("none", "quick", "quicknet", **{"train.epochs": 3}).config.train.epochs == 3
    assert build_defense("none", "quick", "wrn16-1").config.train == quick


def test_norm_shifts_train_at_their_own_lr_with_the_same_decay_per_step(cpu):
    from unpoison.train.engine import Engine, OptimConfig

    model = build_model("quicknet-s", 4)
    engine = Engine(model, OptimConfig(lr=0.1, weight_decay=1e-3, schedule="constant", norm_bias_lr_scale=64),
                    cpu, name="t", epochs=1, steps_per_epoch=1, progress=False)
    shifts = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    scaled = [g for g in engine.optimizer.param_groups if g["lr_scale"] != 1.0]
    assert len(scaled) == 1 and {id(p) for p in scaled[0]["params"]} == shifts
    x = torch.rand(8, 3, 32, 32)
    engine.step(model(x).sum())
    for group in engine.optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"])
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.1 * 1e-3)
