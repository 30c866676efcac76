"""The attack suite: each trigger changes what it should and nothing else, the poison
counts follow the stated semantics, each dirty-label backdoor is learnable, and
`unpoison poison` writes a dataset that reads back exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import data_root, requires_cifar, toy_dataset
from unpoison.attacks import build_attack
from unpoison.attacks.blended import STRIP_COLUMNS, Blended
from unpoison.attacks.lc import LabelConsistent
from unpoison.attacks.sig import SIG
from unpoison.attacks.trojannn import FCT_PATCH, TrojanNN, select_neurons
from unpoison.attacks.wanet import WaNet, warp_grid
from unpoison.data.imageset import ImageSet
from unpoison.defenses.base import DefenseContext
from unpoison.metrics import backdoor_metrics
from unpoison.models import build_model
from unpoison.train import OptimConfig, TrainConfig, train_supervised

G = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


def changed_mask(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels changed in any image or channel."""
    return (before != after).any(dim=0).any(dim=0)


def smoke_context(tmp_path: Path, cpu) -> DefenseContext:
    return DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)


# ---------------------------------------------------------------------------- Blended

def test_blended_noise_is_one_fixed_seeded_pattern_within_the_alpha_bound():
    data = toy_dataset(16, 4, size=32)
    attack = Blended()
    out = attack.apply_trigger(data.images)
    pattern = attack.pattern(32, 32)
    expected = (0.8 * data.images.float() + 0.2 * pattern.float()).floor().to(torch.uint8)
    assert torch.equal(out, expected)
    assert (out.int() - data.images.int()).abs().max() <= math.ceil(0.2 * 255)
    assert torch.equal(pattern, Blended().pattern(32, 32))                    # same seed -> same pattern
    assert not torch.equal(pattern, Blended(pattern_seed=1).pattern(32, 32))
    assert torch.equal(pattern[0], pattern[1]) and torch.equal(pattern[1], pattern[2])  # shared by channels
    assert torch.equal(attack.apply_trigger(data.images), out)                 # not redrawn per call


def test_blended_image_pattern_is_resized_to_the_image(tmp_path):
    path = tmp_path / "kitty.png"
    Image.new("RGB", (540, 540), (200, 10, 100)).save(path)
    data = toy_dataset(4, 4, size=16)
    out = build_attack("blended", pattern=str(path), alpha=0.25).apply_trigger(data.images)
    colour = torch.tensor([200, 10, 100]).view(1, 3, 1, 1)
    assert torch.equal(out, (0.75 * data.images.float() + 0.25 * colour).floor().to(torch.uint8))
    with pytest.raises(ValueError, match="does not exist"):
        Blended(pattern=str(tmp_path / "missing.png"))


def test_blend_strip_uses_the_reference_column_mask():
    attack = Blended(trigger="strip")
    pattern = attack.pattern(32, 32)
    assert pattern[0, 0].tolist() == list(STRIP_COLUMNS)
    assert (pattern == pattern[:, :1]).all() and (pattern == pattern[:1]).all()  # same on rows and channels
    black = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    assert attack.apply_trigger(black)[0, 0, 5].tolist() == [int(0.2 * v) for v in STRIP_COLUMNS]


# ---------------------------------------------------------------------------- SIG

def test_sig_adds_a_column_sinusoid_within_delta_and_uses_the_test_delta_at_test_time():
    grey = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    attack = SIG(delta=20, test_delta=60)
    train_out, test_out = attack.apply_trigger(grey, train=True), attack.apply_trigger(grey, train=False)
    diff = train_out.int() - 128
    assert diff.abs().max() <= 20 and (test_out.int() - 128).abs().max() > 40
    assert (diff == diff[:, :, :1]).all()                                      # constant down each column
    columns = 20 * torch.sin(2 * math.pi * torch.arange(32) * 6 / 32)
    assert torch.equal(diff[0, 0, 0], (128 + columns).floor().int() - 128)
    white = torch.full((1, 3, 32, 32), 250, dtype=torch.uint8)
    assert attack.apply_trigger(white, train=True).max() == 255               # clipped, no wrap-around


def test_clean_label_poisons_target_class_images_capped_and_keeps_labels():
    data = toy_dataset(400, 4, size=16)                                          # 100 per class
    small = SIG(target=2, rate=0.1).poison(data, G())
    assert small.n_poisoned == 40 and (data.labels[small.poison_index] == 2).all()
    assert torch.equal(small.train.labels, data.labels)
    capped = SIG(target=2, rate=0.5).poison(data, G())
    assert capped.n_poisoned == 100                                              # rate*N = 200 > class size
    with pytest.raises(ValueError, match="clean-label"):
        SIG(mode="all2all")


# ---------------------------------------------------------------------------- TrojanNN

def test_fct_trojan_patch_is_additive_at_rows_25_27_saturating_or_wrapping():
    data = toy_dataset(8, 4, size=32)
    out = TrojanNN(trigger="fct").apply_trigger(data.images)
    changed = changed_mask(data.images, out)
    assert changed[25:28, 25:28].any() and changed.sum() == changed[25:28, 25:28].sum()
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    assert (TrojanNN(trigger="fct").apply_trigger(white) == 255).all()
    wrapped = TrojanNN(trigger="fct", wrap=True).apply_trigger(white)[0, :, 25:28, 25:28]
    assert torch.equal(wrapped, ((255 + FCT_PATCH).floor().long() % 256).to(torch.uint8))
    assert wrapped[0, 0, 0] == 206                                               # 255 + 207.4 wraps to 206


def test_trojannn_selects_the_most_connected_neurons():
    model = build_model("wrn16-1", 4)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[:, 7] = 5.0
        model.head.weight[:, 3] = -4.0                                           # |outgoing| counts
    assert select_neurons(model, "features", 2).tolist() == [3, 7]
    assert len(select_neurons(model, "block2", 3)) == 3                          # a conv layer's channels


@pytest.mark.slow
def test_trojannn_optimises_a_patch_that_drives_the_neurons_and_stays_in_its_mask(tmp_path, cpu):
    data = toy_dataset(256, 4, size=16)
    attack = TrojanNN(target=1, size=3, position=(2, 5), steps=30, sample=32)
    attack.prepare(data, smoke_context(tmp_path, cpu))
    assert attack.patch.dtype == torch.uint8 and attack.patch.shape == (3, 3, 3)
    assert attack.report["activation_triggered"] > attack.report["activation_clean"]
    out = attack.apply_trigger(data.images)
    changed = changed_mask(data.images, out)
    assert changed.sum() == changed[2:5, 5:8].sum() and torch.equal(out[0, :, 2:5, 5:8], attack.patch)
    poisoned = attack.poison(data, G())
    assert poisoned.n_poisoned == 25 and (data.labels[poisoned.poison_index] != 1).all()
    assert (poisoned.train.labels[poisoned.poison_index] == 1).all()
    assert "patch" in attack.describe() and attack.describe()["neuron_index"]


def test_trojannn_without_a_reference_model_says_what_to_do():
    with pytest.raises(RuntimeError, match="prepare"):
        TrojanNN().apply_trigger(toy_dataset(2, 2, size=32).images)


# ---------------------------------------------------------------------------- LC

def test_lc_perturbs_within_eps_adds_the_four_corners_and_keeps_labels(tmp_path, cpu):
    data = toy_dataset(256, 4, size=16)
    attack = LabelConsistent(target=3, rate=0.1, steps=3)
    attack.prepare(data, smoke_context(tmp_path, cpu))
    poisoned = attack.poison(data, G())
    idx = poisoned.poison_index
    assert poisoned.n_poisoned == 25 and (data.labels[idx] == 3).all()
    assert torch.equal(poisoned.train.labels, data.labels)
    corners = torch.zeros(16, 16, dtype=torch.bool)
    for r, c in ((13, 13), (1, 13), (13, 1), (1, 1)):
        corners[r:r + 3, c:c + 3] = True
    before, after = data.images[idx], poisoned.train.images[idx]
    diff = (after.int() - before.int()).abs()
    assert diff[..., ~corners].max() <= 8 and diff[..., ~corners].max() > 0    # PGD within eps, and it moved
    assert torch.equal(after[..., corners], attack.apply_trigger(before)[..., corners])
    clean_rest = ~poisoned.is_poison
    assert torch.equal(poisoned.train.images[clean_rest], data.images[clean_rest])
    # the test side adds only the corner grids
    test_out = attack.apply_trigger(data.images)
    assert torch.equal(test_out[..., ~corners], data.images[..., ~corners])


def test_lc_corner_grids_match_the_reference_layout():
    black = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    out = LabelConsistent(steps=0).apply_trigger(black)[0, 0]
    assert out[29:32, 29:32].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    assert out[1:4, 1:4].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 0]]
    assert out[29:32, 1:4].tolist() == [[255, 0, 0], [0, 255, 0], [255, 0, 255]]
    assert out[1:4, 29:32].tolist() == [[255, 0, 255], [0, 255, 0], [0, 0, 255]]
    assert out[0].max() == 0 and out[:, 0].max() == 0                        # row 0 / col 0 untouched


# ---------------------------------------------------------------------------- WaNet

def test_wanet_grid_moves_pixels_by_less_than_one_pixel_and_is_seeded():
    grid = warp_grid(32, 32, 4, 0.5, 1.0, seed=0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    shift_px = (grid[0] - torch.stack((xs, ys), 2)) * 31 / 2
    assert 0.05 < shift_px.abs().max() < 1.0
    assert torch.equal(grid, warp_grid(32, 32, 4, 0.5, 1.0, seed=0))
    assert not torch.equal(grid, warp_grid(32, 32, 4, 0.5, 1.0, seed=1))


def test_wanet_output_stays_within_each_pixels_neighbourhood():
    data = toy_dataset(16, 4, size=32)
    attack = WaNet()
    for out in (attack.apply_trigger(data.images), attack.warp(data.images, G())):   # trigger, noise mode
        x = data.images.float()
        # the trigger moves < 1 px and the noise adds < 0.5 px: bilinear samples stay in the 5x5 range
        high = F.max_pool2d(x, 5, 1, 2)
        low = -F.max_pool2d(-x, 5, 1, 2)
        inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
        assert (out.float()[inner] <= high[inner] + 1).all() and (out.float()[inner] >= low[inner] - 1).all()
        assert not torch.equal(out, data.images)


def test_wanet_noise_mode_marks_only_relabelled_images_as_poison():
    data = toy_dataset(400, 4, size=16)
    attack = WaNet(target=0, rate=0.1)
    poisoned = attack.poison(data, G())
    assert poisoned.n_poisoned == 40 and (data.labels[poisoned.poison_index] != 0).all()
    noise = attack.noise_index
    assert len(noise) == 80 and attack.describe()["n_noise"] == 80
    assert not poisoned.is_poison[noise].any()
    assert torch.equal(poisoned.train.labels[noise], data.labels[noise])       # noise samples keep labels
    assert not torch.equal(poisoned.train.images[noise], data.images[noise])
    untouched = torch.ones(400, dtype=torch.bool)
    untouched[poisoned.poison_index] = False
    untouched[noise] = False
    assert torch.equal(poisoned.train.images[untouched], data.images[untouched])
    assert len(WaNet(noise=False).poison(data, G()).poison_index) == 40 and WaNet(noise=False).noise_index is None


# ---------------------------------------------------------------------------- shared rules

@pytest.mark.parametrize("name, params", [("blended", {}), ("wanet", {}), ("trojannn", {"trigger": "fct"})])
def test_all_to_all_relabels_to_the_next_class(name, params):
    data = toy_dataset(400, 4, size=32)
    attack = build_attack(name, mode="all2all", **params)
    poisoned = attack.poison(data, G())
    idx = poisoned.poison_index
    assert poisoned.n_poisoned == 40
    assert torch.equal(poisoned.train.labels[idx], (data.labels[idx] + 1) % 4)
    backdoor = attack.backdoor_test(data)
    assert len(backdoor.images) == len(data) and torch.equal(backdoor.target_labels, (data.labels + 1) % 4)


@pytest.mark.parametrize("name", ["blended", "wanet", "trojannn"])
def test_dirty_label_counts_come_from_non_target_classes(name):
    data = toy_dataset(400, 4, size=32)
    params = {"trigger": "fct"} if name == "trojannn" else {}
    poisoned = build_attack(name, target=2, rate=0.05, **params).poison(data, G())
    assert poisoned.n_poisoned == 20
    assert (data.labels[poisoned.poison_index] != 2).all() and (poisoned.train.labels[poisoned.poison_index] == 2).all()


def test_unknown_parameters_and_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="does not take size"):
        build_attack("blended", size=3)
    with pytest.raises(ValueError, match="noise, image or strip"):
        build_attack("blended", trigger="kitty")
    with pytest.raises(ValueError, match="only"):
        build_attack("trojannn", wrap=True)


# ---------------------------------------------------------------------------- learnability

def structured_dataset(n: int, num_classes: int = 3, size: int = 16, noise_seed: int = 0) -> ImageSet:
    """Class colour + a shared high-frequency texture + noise: a warp or a blend of a fixed
    pattern changes every image consistently, as it does on natural images. The colours and
    the texture are fixed; `noise_seed` draws a new sample (a test set)."""
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(num_classes, 3, 1, 1, generator=g) * 120 + 60
    texture = (torch.rand(1, 1, size // 2, size // 2, generator=g) - 0.5) * 120
    texture = F.interpolate(texture, size=(size, size), mode="nearest")
    labels = torch.arange(n) % num_classes
    noise = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(100 + noise_seed)) * 8
    images = palette[labels] + texture + noise
    return ImageSet(images.clamp(0, 255).to(torch.uint8), labels, [f"c{i}" for i in range(num_classes)])


class TinyNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        # a position-aware head: a fixed warp or blend is a fixed spatial pattern of change
        self.head = nn.Linear(64 * 16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def train_tiny(data: ImageSet, cpu, epochs: int = 8):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=32, augment="none", optim=OptimConfig(lr=0.05, schedule="cosine"))
    return train_supervised(TinyNet(data.num_classes), data, cfg, cpu, name="tiny", seed=0, progress=False)


TINY_TRAIN, TINY_TEST = 360, 150


@pytest.fixture(scope="module")
def clean_tiny_model():
    from unpoison.runtime import Runtime

    return train_tiny(structured_dataset(TINY_TRAIN), Runtime.create("cpu", "fp32"), epochs=4)


def assert_backdoor_learned(attack, poisoned_train, clean_model, cpu):
    test = structured_dataset(TINY_TEST, noise_seed=1)
    metrics = backdoor_metrics(train_tiny(poisoned_train, cpu), test, attack, cpu)
    chance = backdoor_metrics(clean_model, test, attack, cpu)["asr"]   # how often the trigger alone fools a clean model
    assert metrics["clean_acc"] > 0.9, metrics
    assert metrics["asr"] > 0.6 and metrics["asr"] > chance + 0.4, (metrics, chance)


@pytest.mark.slow
@pytest.mark.parametrize("name, params", [
    ("badnets", {}),
    ("blended", {}),
    ("blended", {"trigger": "strip"}),
    ("trojannn", {"trigger": "fct", "position": (2, 2)}),
    # the warp itself; the noise mode (noise-warped look-alikes that keep their labels) takes
    # far longer to learn than a unit test can afford (20+ epochs here): it is checked on CIFAR-10
    ("wanet", {"noise": False}),
])
def test_a_tiny_model_learns_each_dirty_label_backdoor(name, params, cpu, clean_tiny_model):
    attack = build_attack(name, target=0, rate=0.15, **params)
    poisoned = attack.poison(structured_dataset(TINY_TRAIN), G())
    assert_backdoor_learned(attack, poisoned.untrusted(), clean_tiny_model, cpu)


@pytest.mark.slow
def test_a_tiny_model_learns_the_optimised_trojannn_backdoor(tmp_path, cpu, clean_tiny_model):
    data = structured_dataset(TINY_TRAIN)
    attack = TrojanNN(target=0, rate=0.15, steps=20, sample=32)
    attack.prepare(data, smoke_context(tmp_path, cpu))
    assert_backdoor_learned(attack, attack.poison(data, G()).untrusted(), clean_tiny_model, cpu)


# ---------------------------------------------------------------------------- unpoison poison

def write_toy_folder(root: Path, n_train: int = 40, n_test: int = 12) -> None:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        data = toy_dataset(n, 4, size=32, seed=seed)
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


@pytest.mark.parametrize("attack, extra", [("badnets", []), ("wanet", ["--attack-param", "cross_ratio=1"]),
                                           ("sig", ["--attack-param", "test_delta=40"])])
def test_poison_command_writes_a_loadable_image_folder_matching_its_manifest(tmp_path, attack, extra):
    from unpoison.cli import main
    from unpoison.data import read_image_folder

    write_toy_folder(tmp_path / "src")
    out = tmp_path / "out"
    code = main(["poison", "--dataset", str(tmp_path / "src"), "--attack", attack, "--out", str(out),
                 "--poison-rate", "0.25", "--target", "1", "--no-progress", *extra])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train = read_image_folder(out, "train")
    source = read_image_folder(tmp_path / "src", "train")
    assert len(train) == manifest["n_train"] == 40 and train.classes == manifest["class_folders"]
    poisoned_files = {p["file"]: p for p in manifest["poisoned"]}   # paths relative to OUT, like train.paths
    assert len(poisoned_files) == manifest["n_poisoned"] == 10
    for path, label in zip(train.paths, train.labels.tolist()):
        if path in poisoned_files:
            assert label == poisoned_files[path]["label"]
            assert (label == 1) if attack != "sig" else (poisoned_files[path]["original_label"] == 1)
    # every file not listed as poisoned (or noise-warped) is a clean training image, pixel for pixel
    listed = set(poisoned_files) | {p["file"] for p in manifest.get("noise_warped", [])}
    clean_images = {bytes(img.numpy()) for img in source.images}
    for path, image in zip(train.paths, train.images):
        if path not in listed:
            assert bytes(image.numpy()) in clean_images
    for path in poisoned_files:
        assert bytes(train.images[train.paths.index(path)].numpy()) not in clean_images
    test = read_image_folder(out, "test")
    triggered = read_image_folder(out, "test_triggered", classes=train.classes)
    assert len(test) == 12 and len(triggered) == manifest["n_test_triggered"] == int((test.labels != 1).sum())
    assert (triggered.labels != 1).all()                                          # true labels, not the target
    assert Image.open(out / "preview.png").size[0] > 100
    assert manifest["attack"]["name"] == attack


@requires_cifar
def test_poison_command_on_a_cifar10_subset(tmp_path):
    from unpoison.cli import main
    from unpoison.data import read_image_folder

    out = tmp_path / "blended"
    assert main(["poison", "--dataset", "cifar10", "--data-root", str(data_root()), "--attack", "blended",
                 "--out", str(out), "--train-subset", "300", "--test-subset", "50", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_poisoned"] == 30 and all(p["label"] == 0 and p["original_label"] != 0
                                                for p in manifest["poisoned"])
    assert len(read_image_folder(out, "train")) == 300
