import pytest
import torch

from conftest import toy_dataset
from unpoison.attacks import build_attack
from unpoison.attacks.badnets import BadNets


def test_grid_patch_changes_only_the_bottom_right_3x3():
    data = toy_dataset(20, 4, size=32)
    out = BadNets().apply_trigger(data.images)
    changed = (out != data.images).any(dim=(0, 1))
    assert not changed[:29].any() and not changed[:, :29].any()
    assert out[0, 0, 29:, 29:].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 255]]


def test_square_sits_one_pixel_in_from_the_corner():
    data = toy_dataset(4, 4, size=32)
    out = BadNets(trigger="square").apply_trigger(data.images)
    assert (out[:, :, 28:31, 28:31] == 255).all()
    assert torch.equal(out[:, :, 31], data.images[:, :, 31]) and torch.equal(out[:, :, :, 31], data.images[:, :, :, 31])


def test_dirty_label_poison_count_and_labels():
    data = toy_dataset(400, 4, size=16)
    attack = BadNets(target=1, rate=0.1, trigger="square", size=2)
    poisoned = attack.poison(data, torch.Generator().manual_seed(0))
    idx = poisoned.poison_index
    assert poisoned.n_poisoned == 40
    assert (data.labels[idx] != 1).all()                    # drawn from non-target classes
    assert (poisoned.train.labels[idx] == 1).all()          # relabelled
    clean = ~poisoned.is_poison
    assert torch.equal(poisoned.train.images[clean], data.images[clean])
    assert torch.equal(poisoned.train.labels[clean], data.labels[clean])
    assert not hasattr(poisoned.untrusted(), "is_poison")


def test_all_to_all_maps_to_the_next_class():
    data = toy_dataset(400, 4, size=16)
    attack = BadNets(rate=0.1, mode="all2all")
    poisoned = attack.poison(data, torch.Generator().manual_seed(0))
    idx = poisoned.poison_index
    assert torch.equal(poisoned.train.labels[idx], (data.labels[idx] + 1) % 4)
    backdoor = attack.backdoor_test(data)
    assert len(backdoor.images) == len(data)  # every class is attacked
    assert torch.equal(backdoor.target_labels, (data.labels + 1) % 4)


def test_build_attack_rejects_unknown_parameters():
    with pytest.raises(ValueError, match="does not take alpha"):
        build_attack("badnets", alpha=0.2)
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(size=3, position=(30, 30)).apply_trigger(toy_dataset(2, 2, size=32).images)
