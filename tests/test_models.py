import pytest
import torch

from unpoison.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_and_features_shapes(name):
    model = build_model(name, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (2, model.feature_dim)
    assert model(x).shape == (2, 7)
    assert torch.allclose(model.head(features), model(x), atol=1e-5)


def test_wrn16_1_matches_the_spec():
    model = build_model("wrn16-1", 10)
    assert model.feature_dim == 64
    # 3x3 stem to 16 channels, three groups of two blocks, 1x1 shortcuts where widths change
    assert model.conv1.out_channels == 16 and len(model.block1) == len(model.block2) == len(model.block3) == 2
    assert model.block1[0].shortcut is None and model.block2[0].shortcut is not None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(175_000, rel=0.02)


def test_models_normalise_internally():
    model = build_model("wrn16-1", 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    x = torch.full((1, 3, 32, 32), 0.5)
    other = build_model("wrn16-1", 10).eval()
    other.load_state_dict(model.state_dict())  # buffers travel with the weights
    assert torch.allclose(other.mean, model.mean)
    assert torch.allclose(model(x), other(x))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet1000", 10)
