import pytest
import torch

from conftest import toy_dataset
from unpoison.attacks.badnets import BadNets
from unpoison.data.imageset import ImageSet
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.cbd import (CBD, CBDConfig, MutualInfoCritic, WeightRecord, critic_step, flag_low_weights,
                                   sample_weights, top_singular_value, train_backdoored, train_clean)
from unpoison.defenses.none import NoDefense
from unpoison.metrics import backdoor_metrics, detection_metrics


def test_weights_are_near_zero_for_samples_f_b_fits_and_near_one_for_those_it_does_not():
    loss_backdoored = torch.tensor([1e-4, 2e-4, 4.0, 6.0, 1.0])
    loss_clean = torch.tensor([2.0, 3.0, 1e-3, 2e-3, 1.0])
    raw, normalised = sample_weights(loss_backdoored, loss_clean)
    assert (raw[:2] < 1e-3).all() and (raw[2:4] > 0.999).all() and abs(raw[4] - 0.5) < 1e-6
    assert abs(float(normalised.mean()) - 1) < 1e-6
    assert torch.allclose(normalised / raw, torch.full_like(raw, float(normalised[0] / raw[0])))
    # both losses zero (a sample both nets fit perfectly) stays finite
    raw, normalised = sample_weights(torch.zeros(3), torch.zeros(3))
    assert torch.isfinite(raw).all() and torch.isfinite(normalised).all()


def test_spectral_rescale_divides_by_the_square_root_of_sigma():
    w = torch.diag(torch.tensor([4.0, 1.0, 0.5]))
    assert abs(float(top_singular_value(w)) - 4.0) < 1e-4
    assert abs(float(top_singular_value(torch.tensor([3.0, 4.0]))) - 5.0) < 1e-5   # a bias is a column
    critic = MutualInfoCritic(3, 3)
    before = [p.detach().clone() for p in critic.parameters()]
    critic.rescale()
    for b, a in zip(before, critic.parameters()):
        assert torch.allclose(a, b / top_singular_value(b).sqrt(), atol=1e-6)


def _train_critic(dependent: bool, steps: int = 100, dim: int = 16, batch: int = 64) -> float:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    critic = MutualInfoCritic(dim, dim)
    optimizer = torch.optim.Adam(critic.parameters(), lr=0.2)   # the official optimiser

    def sample():
        r = torch.randn(batch, dim, generator=g)
        z = r + 0.3 * torch.randn(batch, dim, generator=g) if dependent else torch.randn(batch, dim, generator=g)
        return r, z

    for _ in range(steps):
        critic_step(critic, optimizer, *sample())
    with torch.no_grad():
        return sum(float(critic(*sample())) for _ in range(20)) / 20


def test_critic_estimate_rises_for_dependent_pairs_and_stays_near_zero_for_independent_ones():
    dependent, independent = _train_critic(True), _train_critic(False)
    # the estimate carries the official 0.01 scale: ~0.007 when z is r plus noise
    assert dependent > 0.004
    assert abs(independent) < 0.001
    assert dependent > 5 * abs(independent)


def test_flag_rule_is_relative_to_the_median():
    mean_weight = torch.tensor([0.001, 0.002, 0.4, 0.5, 0.6, 0.45, 0.55])
    assert flag_low_weights(mean_weight, 0.1).tolist() == [True, True] + [False] * 5
    assert not flag_low_weights(torch.full((10,), 0.5), 0.1).any()


def test_weight_record_is_a_running_mean_per_sample():
    record = WeightRecord(4)
    record.add(torch.tensor([0, 1]), torch.tensor([0.2, 0.4]))
    record.add(torch.tensor([1, 2]), torch.tensor([0.6, 1.0]))
    assert torch.allclose(record.mean(), torch.tensor([0.2, 0.5, 1.0, 0.0]))


def _context(tmp_path, cpu, seed: int = 0) -> DefenseContext:
    return DefenseContext(cpu, "smoke", seed, "wrn16-1", tmp_path, progress=False)


def _tiny_config(**overrides) -> CBDConfig:
    config = CBDConfig.for_profile("smoke")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_f_b_stays_frozen_in_eval_mode_while_f_c_trains(tmp_path, cpu):
    data = toy_dataset(128, 4)
    ctx = _context(tmp_path, cpu)
    config = _tiny_config(epochs=1)
    config.backdoored.epochs = 1
    backdoored = train_backdoored(data, ctx, config.backdoored)
    assert not backdoored.training and not any(p.requires_grad for p in backdoored.parameters())
    before = {k: v.clone() for k, v in backdoored.state_dict().items()}
    # every time f_B computes anything during f_C's training, no module of it is in train mode
    modes = []
    backdoored.conv1.register_forward_pre_hook(
        lambda module, args: modes.append(any(m.training for m in backdoored.modules())))
    clean, _ = train_clean(data, backdoored, ctx, config)
    assert modes, "f_B was never consulted"
    assert not backdoored.training and not any(modes)
    for key, value in backdoored.state_dict().items():   # weights and BN running statistics unchanged
        assert torch.equal(value, before[key]), key
    assert clean is not backdoored


@pytest.mark.slow
def test_resumed_clean_stage_equals_an_uninterrupted_one(tmp_path, cpu, monkeypatch):
    from unpoison.train import engine as engine_module

    data = toy_dataset(96, 4)
    config = _tiny_config(epochs=2, batch_size=32)
    backdoored = train_backdoored(data, _context(tmp_path / "fb", cpu), _tiny_config().backdoored)
    reference, reference_record = train_clean(data, backdoored, _context(tmp_path / "a", cpu), config)

    original = engine_module.Engine._save

    def killed_after_one_epoch(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module.Engine, "_save", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_clean(data, backdoored, _context(tmp_path / "b", cpu), config)
    monkeypatch.setattr(engine_module.Engine, "_save", original)
    resumed, resumed_record = train_clean(data, backdoored, _context(tmp_path / "b", cpu), config)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(reference_record.mean(), resumed_record.mean())


def test_mi_switch_is_a_config_field_recorded_in_describe():
    assert CBD.for_profile("paper").config.mi is True
    off = build_defense("cbd", "quick", mi="off")
    assert off.config.mi is False and off.describe()["mi"] is False


def test_paper_profile_is_the_official_code():
    """Spec §2.3-2.5: WRN-16-1; f_B 5 epochs of CE at a constant lr 0.1 (Nesterov, wd 1e-4,
    batch 64, crop+flip+cutout); f_C 100 epochs, batch 64, lr 0.1 -> 0.01 at 20 -> 0.001 at 70;
    critic Adam lr 0.2 with StepLR(20, 0.1) stepped at each epoch's start; MI scale 0.01, weight 1."""
    cbd = CBD.for_profile("paper")
    paper = cbd.config
    b = paper.backdoored
    assert (b.epochs, b.batch_size, b.augment, b.optim.lr, b.optim.schedule, b.optim.nesterov, b.optim.weight_decay) == (
        5, 64, "weak+cutout", 0.1, "constant", True, 1e-4)
    assert paper.backdoored_epochs == 5 and paper.backdoored_fraction == 1.0
    assert (paper.epochs, paper.batch_size, paper.augment) == (100, 64, "weak+cutout")
    assert paper.optim.lr == 0.1 and paper.optim.nesterov and paper.optim.weight_decay == 1e-4
    assert tuple(f * paper.epochs for f in paper.lr_drops) == (20, 70) and paper.optim.gamma == 0.1
    assert (paper.critic_lr, paper.mi_scale, paper.mi_weight, paper.critic_dropout, paper.mi) == (0.2, 0.01, 1.0, 0.2, True)
    # StepLR(20) stepped at the start of each epoch: epochs 0-18 at 0.2, 19-38 at 0.02, ...
    assert [round(paper.critic_lr_at(e), 8) for e in (0, 18, 19, 38, 39)] == [0.2, 0.2, 0.02, 0.02, 0.002]
    assert cbd.deviations("wrn16-1") == []


@pytest.mark.parametrize("epochs", [10, 20, 40])
def test_quick_keeps_the_papers_ratios_to_f_c_length(epochs):
    """f_B: 5 of f_C's 100 epochs, so half an epoch for the quick 10 (1 at 20, 2 at 40); the
    critic's lr steps at the same fractions of f_C's training as in the paper."""
    quick = build_defense("cbd", "quick", epochs=epochs).config
    paper = CBDConfig.for_profile("paper")
    assert quick.backdoored_epochs / quick.epochs == pytest.approx(5 / 100)
    assert quick.backdoored_fraction == min(1.0, epochs / 20)
    assert quick.backdoored.epochs == max(1, round(epochs / 20))
    for e in range(quick.epochs):
        assert quick.critic_lr_at(e) == pytest.approx(paper.critic_lr_at(e * 100 // quick.epochs))


def test_f_b_shorter_than_an_epoch_sees_that_share_of_the_set_once(tmp_path, cpu, monkeypatch):
    import unpoison.context as none_module

    seen = []
    real = none_module.train_supervised
    monkeypatch.setattr(none_module, "train_supervised",
                        lambda model, data, cfg, *a, **k: seen.append((len(data), cfg.epochs)) or real(model, data, cfg, *a, **k))
    data = toy_dataset(128, 4)
    config = _tiny_config()
    config.backdoored.epochs = 1
    train_backdoored(data, _context(tmp_path, cpu), config.backdoored, fraction=0.5)
    assert seen == [(64, 1)]


def _hard_toy(n: int, size: int = 8, classes: int = 4, seed: int = 0) -> ImageSet:
    """Classes are close colours under heavy noise: learnable, but slower to learn than a
    3x3 trigger on an 8x8 image, the regime CBD assumes (the backdoor is the easy shortcut)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    palette = 128 + (torch.rand(classes, 3, 1, 1, generator=g) * 2 - 1) * 25
    images = (palette[labels] + torch.randn(n, 3, size, size, generator=g) * 50).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, [f"class{i}" for i in range(classes)])


@pytest.mark.slow
def test_smoke_cbd_lowers_the_asr_of_a_tiny_backdoor(tmp_path, cpu):
    full = _hard_toy(768)
    train, test = full.subset(torch.arange(512)), full.subset(torch.arange(512, 768))
    attack = BadNets(target=0, rate=0.1, size=3)
    poisoned = attack.poison(train, torch.Generator().manual_seed(0))
    # the smoke profile, with batches and augmentation suited to 8x8 images
    tiny = {"batch_size": 32, "augment": "none"}
    baseline = NoDefense.for_profile("smoke", **{f"train.{k}": v for k, v in tiny.items()}, **{"train.epochs": 4})
    cbd = CBD.for_profile("smoke", **tiny, **{f"backdoored.{k}": v for k, v in tiny.items()})
    assert cbd.config.epochs == baseline.config.train.epochs

    before = backdoor_metrics(baseline.fit(poisoned.untrusted(), _context(tmp_path / "none", cpu)).model,
                              test, attack, cpu)
    defended = cbd.fit(poisoned.untrusted(), _context(tmp_path / "cbd", cpu))
    after = backdoor_metrics(defended.model, test, attack, cpu)
    assert before["asr"] > 0.8
    assert after["asr"] < 0.2
    assert after["clean_acc"] > 0.35                       # chance is 0.25
    detection = detection_metrics(defended.suspicion, poisoned.is_poison, defended.flagged)
    assert detection["auroc"] > 0.75                       # low weight = suspected poisoned


def test_cbd_mi_flag_maps_to_the_config_field(monkeypatch, tmp_path):
    import unpoison.run
    from unpoison.cli import main

    seen = {}

    def fake_run(cfg):
        seen["params"] = cfg.defense_params
        return {"clean_acc": 0.0, "asr": 0.0, "robust_acc": 0.0, "n_poisoned": 0, "wall_seconds": 0.0,
                "profile_note": ""}

    monkeypatch.setattr(unpoison.run, "run", fake_run)
    assert main(["run", "--defense", "cbd", "--cbd-mi", "off", "--out", str(tmp_path)]) == 0
    assert seen["params"]["mi"] is False
    with pytest.raises(SystemExit):
        main(["run", "--defense", "none", "--cbd-mi", "off", "--out", str(tmp_path)])
