"""The default defence (defenses/quarantine.py) on the tiny backdoor and on user folders."""

import json
from statistics import median
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from toy_backdoor import TOY_SEEDS, tiny_backdoor, train_toy_backdoored
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.quarantine import QuarantineConfig, Quarantine, set_aside, train_with_unlearning
from unpoison.defenses.verdict import LateLook, Verdict, contradicted_groups, judge, repair_late
from unpoison.data.imageset import ImageSet
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime
from unpoison.train import OptimConfig, TrainConfig
from userdata import SMOKE, make_folder, unpoison

CPU = Runtime.create("cpu", "fp32")
# the toy's recipe (no augmentation: a flip moves the grid to the other corner), with which
# plain training learns the backdoor (toy_backdoor.train_toy_backdoored)
TOY_RECIPE = TrainConfig(epochs=4, batch_size=32, augment="none", optim=OptimConfig(lr=0.05, schedule="constant"))


def _ctx(tmp_path: Path) -> DefenseContext:
    return DefenseContext(CPU, "smoke", 0, "wrn16-1", tmp_path, progress=False)


class WatchedSet(ImageSet):
    """An ImageSet that fails the test if anything asks it for a poison mask."""

    def __getattr__(self, name):
        if "poison" in name:
            raise AssertionError(f"the defence asked the training set for {name!r}")
        raise AttributeError(name)


def test_contradicted_groups_unlearn_labels_contradicted_beyond_their_kept_images_error():
    labels = torch.tensor([0] * 20 + [1] * 20 + [0] * 40 + [1] * 40)
    quarantined = torch.zeros(120, dtype=torch.bool)
    quarantined[:40] = True
    contradicted = torch.zeros(120, dtype=torch.bool)
    contradicted[:12] = True         # label 0: 12 of 20 quarantined contradicted (poison)
    contradicted[20:24] = True       # label 1: 4 of 20, as often as its kept images
    contradicted[40:48] = True       # kept label 0: 20 % error
    contradicted[80:88] = True       # kept label 1: 20 % error
    unlearn, table = contradicted_groups(contradicted, quarantined, labels, 2)
    assert unlearn.nonzero().flatten().tolist() == list(range(12))
    assert [(g["kept_error"], g["contradicted_rate"], g["unlearned"]) for g in table] == [
        (0.2, 0.6, True), (0.2, 0.2, False)]
    everything, _ = contradicted_groups(contradicted, quarantined, labels, 2, z=None)
    assert everything.nonzero().flatten().tolist() == list(range(12)) + [20, 21, 22, 23]


def test_doubted_finds_a_poisoned_group_that_the_kept_error_hides_and_no_easy_clean_group():
    # Part-way through a high-lr run the model gets half the kept frogs wrong; the quarantined
    # frogs are 50 poison (label given no probability) and 50 easy clean frogs (agreed). The
    # contradiction rate (55 %) is the kept error's (50 %); the doubted share is not.
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 300 + [1] * 300)
    quarantined = torch.zeros(600, dtype=torch.bool)
    quarantined[:100] = quarantined[300:400] = True
    given = torch.rand(600, generator=g) * 0.8 + 0.1            # kept images: spread out
    given[:50] = torch.rand(50, generator=g) * 0.01              # poison of label 0
    given[50:100] = torch.rand(50, generator=g) * 0.1 + 0.85     # easy clean label 0
    given[300:400] = torch.rand(100, generator=g) * 0.1 + 0.85   # easy clean group of label 1
    predicted = torch.where(given > 0.5, labels, 1 - labels)
    predicted[50:55] = 1 - labels[50:55]
    cfg = QuarantineConfig(group_min_excess=0.02)
    _, _, groups = judge(_verdict(predicted, given), labels, quarantined, 2, replace(cfg, group_signal="contradicted"))
    assert [g["unlearned"] for g in groups] == [False, False]
    _, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, cfg)
    assert [g["unlearned"] for g in groups] == [True, False]
    assert groups[0]["rate"] == 0.5 and abs(groups[0]["kept_rate"] - 0.1) < 0.02
    assert unlearn[:50].all() and not unlearn[300:].any()


def test_a_doubted_group_its_kept_images_are_contradicted_more_often_than_is_not_poisoned():
    # GTSRB's near-copies: the set-aside images of a clean label (a track the model never saw)
    # get less probability than its memorised kept images, but are contradicted less often
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 300 + [1] * 300)
    quarantined = torch.zeros(600, dtype=torch.bool)
    quarantined[:100] = quarantined[300:400] = True
    given = torch.rand(600, generator=g) * 0.3 + 0.7              # kept images: memorised
    given[:50] = torch.rand(50, generator=g) * 0.01               # poison of label 0
    given[300:400] = torch.rand(100, generator=g) * 0.6 + 0.3     # unseen clean track of label 1
    predicted = labels.clone()
    predicted[:50] = 1
    predicted[400:600:2] = 0                                       # kept label 1: 50 % error
    predicted[300:400:4] = 0                                       # the unseen track: 25 %
    cfg = QuarantineConfig(group_min_excess=0.02)
    _, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, replace(cfg, confirm_contradicted=False))
    assert [g["unlearned"] for g in groups] == [True, True]
    _, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, cfg)
    assert [g["unlearned"] for g in groups] == [True, False]
    assert unlearn[:50].all() and not unlearn[300:].any()


def _verdict(predicted, given_prob) -> Verdict:
    verdict = Verdict()
    verdict.load_state_dict({"predicted": torch.as_tensor(predicted), "given_prob": torch.as_tensor(given_prob)})
    return verdict


def test_judge_catches_missed_poison_releases_agreed_images_and_looks_again():
    # label 0: 30 quarantined poison (contradicted surely), 10 kept poison, 60 kept clean;
    # label 1: 10 quarantined clean, 90 kept clean
    labels = torch.tensor([0] * 100 + [1] * 100)
    quarantined = torch.zeros(200, dtype=torch.bool)
    quarantined[:30] = quarantined[100:110] = True
    predicted = labels.clone()
    given = torch.full((200,), 0.9)
    predicted[:40], given[:40] = 1, 0.02            # poison, quarantined and kept: contradicted surely
    predicted[40:50], given[40:50] = 1, 0.3         # hard clean images of label 0: contradicted, unsurely
    predicted[100:102], given[100:102] = 0, 0.2     # two quarantined clean images of label 1 contradicted
    predicted[110:120], given[110:120] = 0, 0.2     # kept label 1 error: 10 %
    cfg = QuarantineConfig(group_min_excess=0.05)
    train, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, cfg)
    assert unlearn.nonzero().flatten().tolist() == list(range(40))   # the missed poison too, no hard clean image
    assert [g["unlearned"] for g in groups] == [True, False]
    # label 1's agreed quarantined images go back into training, its contradicted ones stay out
    assert train[102:110].all() and not train[100:102].any() and train[40:100].all() and not train[:40].any()
    # a group passing the z-test but too small in excess (here 10 % of the set) stands out no more
    _, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, replace(cfg, group_min_excess=0.2))
    assert not unlearn.any() and groups[0]["excess"] < 40
    # the second look: a kept image of label 0 contradicted at the first look and now past
    # the first cut is unlearned; one the first look agreed with is not (a clean image the
    # unlearning dragged down), nor one contradicted less surely
    later_pred, later_given = labels.clone(), torch.full((200,), 0.9)
    later_pred[45], later_given[45] = 1, 0.01
    later_pred[60], later_given[60] = 1, 0.01
    later_pred[46], later_given[46] = 1, 0.3
    train, unlearn, _ = judge(_verdict(predicted, given), labels, quarantined, 2, cfg, _verdict(later_pred, later_given))
    assert unlearn[45] and not train[45] and train[60] and train[46] and int(unlearn.sum()) == 41


def test_judge_unlearns_kept_images_the_probe_sees_alike_the_known_poison_and_no_clean_one():
    # label 0: 30 quarantined poison, contradicted; 5 kept poison the verdict agrees with (its
    # trigger learned from them), so no contradiction rule can catch them; 65 kept clean.
    # In the probe's features the poison shares one direction, the clean images scatter.
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 100 + [1] * 100)
    quarantined = torch.zeros(200, dtype=torch.bool)
    quarantined[:30] = quarantined[100:110] = True
    predicted, given = labels.clone(), torch.full((200,), 0.9)
    predicted[:30], given[:30] = 1, 0.02
    features = torch.randn(200, 16, generator=g)
    features[:35] = torch.randn(35, 16, generator=g) * 0.2 + torch.eye(16)[0] * 3
    cfg = QuarantineConfig(group_min_excess=0.05)
    _, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, cfg, features=features)
    assert unlearn.nonzero().flatten().tolist() == list(range(35)) and groups[0]["kept_alike"] == 5
    # without the features, or with the rule off, the agreed kept poison stays in training
    for kwargs, config in (({}, cfg), ({"features": features}, replace(cfg, alike_quantile=None))):
        _, unlearn, _ = judge(_verdict(predicted, given), labels, quarantined, 2, config, **kwargs)
        assert unlearn.nonzero().flatten().tolist() == list(range(30))


def test_judge_gives_back_the_target_labels_easy_clean_images_and_keeps_agreed_poison_out():
    # label 0's quarantine: 40 poison the model contradicts surely, 10 poison it agrees with
    # (trigger learned), 30 easy clean images it agrees with; in the probe's features the poison
    # shares one direction, the clean images scatter
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 200 + [1] * 200)
    quarantined = torch.zeros(400, dtype=torch.bool)
    quarantined[:80] = True
    given = torch.rand(400, generator=g) * 0.8 + 0.1
    given[:40] = 0.001 * torch.rand(40, generator=g)
    given[40:80] = 0.95
    predicted = torch.where(given > 0.5, labels, 1 - labels)
    features = torch.randn(400, 16, generator=g)
    features[:50] = torch.randn(50, 16, generator=g) * 0.2 + torch.eye(16)[0] * 3
    cfg = QuarantineConfig(group_min_excess=0.02, alike_agreed_quantile=0.05)
    train, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2, cfg, features=features)
    assert groups[0]["unlearned"] and groups[0]["released_unlike"] == 30
    assert unlearn[:40].all() and not train[:50].any() and train[50:80].all()
    # the agreed poison is not doubted, so not known poison; it lies with the known poison in
    # the probe's features and is unlearned as alike; the easy clean images are not
    assert unlearn[40:50].all() and groups[0]["set_aside_alike"] == 10 and not unlearn[50:].any()
    _, _, groups = judge(_verdict(predicted, given), labels, quarantined, 2, replace(cfg, release_unlike=None),
                         features=features)
    assert "released_unlike" not in groups[0]
    # agreed set-aside images are unlearned only when as close as alike_agreed_quantile of the
    # known poison: at 1.0 (closer than all of it) none is, and the agreed poison is left out
    train, unlearn, groups = judge(_verdict(predicted, given), labels, quarantined, 2,
                                   replace(cfg, alike_agreed_quantile=1.0), features=features)
    assert unlearn[:40].all() and not unlearn[40:].any() and not train[:50].any() and train[50:80].all()
    assert groups[0]["set_aside_alike"] == 0


@pytest.mark.parametrize("steps, per_epoch", [("kept", 416), ("set", 512)])
def test_steps_come_from_the_kept_set_or_the_whole_set(tmp_path, steps, per_epoch):
    # 96 of 512 images set aside; batches of 32. "kept": 13 steps, one pass over the 416 kept
    # images. "set": 16 full batches, as plain training on all 512 takes, the kept images and a
    # random 96 of them again
    poisoned, _, _ = tiny_backdoor()
    data = poisoned.untrusted()
    quarantined = torch.zeros(len(data), dtype=torch.bool)
    quarantined[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:96]] = True
    recipe = replace(TOY_RECIPE, epochs=1)
    cfg = replace(build_defense("quarantine", "smoke").config, train=recipe, steps=steps)
    ctx = _ctx(tmp_path)
    _, _, plan = train_with_unlearning(ctx.new_model(data), data, ~quarantined, quarantined, ctx, cfg)
    assert plan["images_per_epoch"] == per_epoch
    with pytest.raises(ValueError, match="steps"):
        replace(cfg, steps="all")


@pytest.mark.slow
def test_training_with_unlearning_holds_off_the_toy_backdoor_that_plain_training_learns(tmp_path):
    # Stage 2 alone, given a quarantine like the probe's on CIFAR-10 (80 % of the poison and a
    # few clean images set aside; the smoke probe on this toy is chaotic, see below). Four toy
    # epochs swing with the seed and the CPU's kernels, so the claim is the median over seeds.
    poisoned, attack, test = tiny_backdoor()
    plain = backdoor_metrics(train_toy_backdoored(poisoned), test, attack, CPU)
    assert plain["asr"] > 0.9
    data = poisoned.untrusted()
    poison, clean = poisoned.is_poison.nonzero().flatten(), (~poisoned.is_poison).nonzero().flatten()
    # steps="kept": on this toy, plain training's step count (16 against 13 a toy epoch) lets the
    # kept fifth of the poison teach the trigger before the verdict on most seeds; the claim here
    # is the unlearning's, on CIFAR-10 "set" is measured (benchmarks/RESULTS.md, quarantine v7)
    cfg = replace(build_defense("quarantine", "smoke").config, train=TOY_RECIPE, steps="kept")
    runs = []
    for seed in TOY_SEEDS:
        g = torch.Generator().manual_seed(seed)
        quarantined = torch.zeros(len(data), dtype=torch.bool)
        quarantined[poison[torch.randperm(len(poison), generator=g)[: int(0.8 * len(poison))]]] = True
        quarantined[clean[torch.randperm(len(clean), generator=g)[:40]]] = True
        ctx = DefenseContext(CPU, "smoke", seed, "wrn16-1", tmp_path / str(seed), progress=False)
        model, _, plan = train_with_unlearning(ctx.new_model(data), data, ~quarantined, quarantined, ctx, cfg)
        runs.append(backdoor_metrics(model, test, attack, CPU) | {"unlearned_poison": int((plan["unlearn"] & poisoned.is_poison).sum())})
    assert median(r["asr"] for r in runs) < 0.1, runs
    # four toy epochs leave little room to relearn: on some seeds the unlearning costs part of
    # the target class (CIFAR-10 runs: benchmarks/RESULTS.md); the model must stay far above chance
    assert median(r["clean_acc"] for r in runs) > plain["clean_acc"] - 0.3, runs
    assert median(r["unlearned_poison"] for r in runs) >= 0.3 * len(poison), runs


@pytest.mark.slow
def test_quarantine_end_to_end_never_asks_for_the_poison_and_reports_its_stages(tmp_path):
    # the whole defence on the toy: what it must do whatever the toy's few epochs give
    poisoned, _, _ = tiny_backdoor()
    defense = build_defense("quarantine", "smoke")
    defense.config = replace(defense.config, train=TOY_RECIPE, quarantine_fraction=0.2)
    data = poisoned.untrusted()
    watched = WatchedSet(data.images, data.labels, data.classes, data.paths)
    result = defense.fit(watched, _ctx(tmp_path))
    assert result.suspicion.shape == (len(data),) and not (result.trusted & result.flagged).any()
    assert [s["name"] for s in result.stages][:2] == ["SL", "train"]
    assert any("set aside 102 of 512" in note for note in result.notes)


@pytest.mark.parametrize("counts, words", [((40,), "single class"), ((40, 5), "only 5 images")])
def test_on_data_it_cannot_judge_it_says_so_and_trains_plainly(tmp_path, counts, words):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = torch.randint(0, 255, (len(labels), 3, 16, 16), dtype=torch.uint8)
    data = ImageSet(images, labels, ["a", "b"][: max(2, len(counts))])
    result = build_defense("quarantine", "smoke").fit(data, _ctx(tmp_path))
    assert len(result.notes) == 1 and words in result.notes[0] and "without a defence" in result.notes[0]
    assert [s["name"] for s in result.stages] == ["train"] and result.model is not None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="verify_at"):
        QuarantineConfig(verify_at=1.5)
    with pytest.raises(ValueError, match="spectral_fraction"):
        QuarantineConfig(quarantine_fraction=0.1, spectral_fraction=0.2)
    assert Quarantine.for_profile("quick").config.train.epochs == 10


def test_spectral_share_sets_aside_a_rare_poison_that_seed_expansion_ranks_low():
    # 1,000 images in 4 labels; 20 of label 0 share a shift along one feature direction (a
    # trigger the probe half learned), and seed expansion ranked them last
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 4
    features = torch.randn(1000, 16, generator=g) + 3 * torch.nn.functional.one_hot(labels, 16)
    poison = (labels == 0) & (torch.arange(1000) < 80)
    features[poison, 7] += 6.0
    expand_scores = torch.rand(1000, generator=g) - poison.float()
    data = ImageSet(torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), labels, [str(c) for c in range(4)])
    alone = set_aside(expand_scores, features, data, QuarantineConfig(quarantine_fraction=0.2))
    both = set_aside(expand_scores, features, data, QuarantineConfig(quarantine_fraction=0.2, spectral_fraction=0.1))
    assert alone.sum() == both.sum() == 200
    assert (alone & poison).sum() == 0 and (both & poison).sum() == poison.sum()
    # the expansion's own top 10 % stays set aside
    assert both[torch.argsort(expand_scores, descending=True)[:100]].all()


@pytest.mark.slow
def test_train_defaults_to_quarantine_and_says_what_it_did(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=40, poison=8)
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, *SMOKE) == 0
    record = json.loads((out / "train.json").read_text())
    # flagged = not trained on at the end: the set-aside images of labels that did not stand
    # out go back into training, so on the smoke budget it may be none
    assert record["defense"] == "quarantine" and 0 <= record["n_flagged"] < 320
    said = capsys.readouterr().out
    assert "[quarantine] done in" in said and "Plain training of the same model would take about" in said
    assert "set aside" in said and f"{out}/suspects.csv" in said and f"{out}/report.html" in said


@pytest.mark.slow
def test_train_killed_mid_epoch_after_the_verdict_resumes_to_identical_outputs(tmp_path, monkeypatch):
    from test_workflow import _assert_same_outputs, _reference_and_killed

    data = make_folder(tmp_path / "data", per_class=30, poison=6)
    # 81 training images less the 10 % set aside, batch 64: 2 steps per epoch; the verdict
    # comes after epoch 2 of 4 (verify_at 0.4 of 4 rounds to 2), step 6 is inside epoch 3
    _reference_and_killed(tmp_path, monkeypatch, data, ("--epochs", "4"), "train", 6)
    _assert_same_outputs(tmp_path / "a", tmp_path / "b")


def test_recheck_and_repair_never_leave_a_worse_model_on_the_toy(tmp_path):
    """With the recheck on, whatever it finds late is repaired or the repair is undone: the
    toy backdoor stays removed and clean accuracy stays where training left it."""
    poisoned, attack, test = tiny_backdoor()
    measured = {}
    for recheck in (False, True):
        defense = build_defense("quarantine", "smoke")
        defense.config = replace(defense.config, train=TOY_RECIPE, quarantine_fraction=0.2, recheck=recheck)
        result = defense.fit(poisoned.untrusted(), _ctx(tmp_path / f"recheck-{recheck}"))
        measured[recheck] = backdoor_metrics(result.model, test, attack, CPU)
    names = [s["name"] for s in result.stages]
    assert "recheck" in names
    # compared with the same run without it (one toy run swings with the CPU's kernels, so
    # an absolute bar would test the toy, not the recheck)
    before, after = measured[False], measured[True]
    assert after["asr"] <= before["asr"] + 0.05 and after["clean_acc"] >= before["clean_acc"] - 0.05, \
        (names, result.notes, before, after)
    # the repair itself on a late set of clean images: it is undone, or it kept the trusted fit
    data = poisoned.untrusted()
    late = torch.zeros(len(data), dtype=torch.bool)
    late[(~poisoned.is_poison).nonzero().flatten()[:30]] = True
    repaired, undone = repair_late(result.model, data, ~late, late, _ctx(tmp_path / "r"), defense.config)
    assert (repaired is result.model) == undone


class _TableModel(torch.nn.Module):
    """A stand-in network: image i (its index written in its first two pixels) has the given
    features, and logits = features @ head."""

    def __init__(self, features: torch.Tensor, head: torch.Tensor) -> None:
        super().__init__()
        self.table, self.head_weight = features, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        index = (x[:, 0, 0, 0] * 255).round().long() * 256 + (x[:, 0, 0, 1] * 255).round().long()
        return self.table[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.head_weight


def _indexed_images(n: int) -> torch.Tensor:
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    return images


@pytest.mark.parametrize("poisoned", [True, False])
def test_late_look_unlearns_a_backdoor_learned_after_the_verdict_and_nothing_on_clean_data(poisoned):
    # 400 images of two labels. The model in training has learned a trigger late: the 40
    # poisoned images (label 0) are its most confident, and its features put them together; the
    # verdict, taken before, contradicted them surely and agreed with every clean image.
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 200 + [1] * 200)
    poison = torch.zeros(400, dtype=torch.bool)
    poison[:40] = poisoned
    features = torch.randn(400, 16, generator=g)
    features[poison] = torch.randn(int(poison.sum()), 16, generator=g) * 0.2 + torch.eye(16)[0] * 3
    head = torch.zeros(16, 2)
    head[0, 0] = 10.0               # the trigger's direction: label 0, surely
    head[1:, 0], head[1:, 1] = torch.randn(15, generator=g) * 0.1, torch.randn(15, generator=g) * 0.1
    data = ImageSet(_indexed_images(400), labels, ["a", "b"])
    given = torch.rand(400, generator=g) * 0.3 + 0.6
    given[poison] = 0.001
    predicted = torch.where(given > 0.5, labels, 1 - labels)
    cfg = QuarantineConfig(group_min_excess=0.02, quarantine_fraction=0.2)
    look = LateLook()
    look.take(_TableModel(features, head), data, _verdict(predicted, given), cfg, CPU)
    assert look.ready
    assert torch.equal(look.unlearn, poison)     # all the poison, no clean image
    assert not (look.drop & ~poison & (labels == 1)).any()
    assert any(g["unlearned"] for g in look.groups) == poisoned
    restored = LateLook()
    restored.load_state_dict(look.state_dict())
    assert torch.equal(restored.drop, look.drop) and restored.groups == look.groups


def test_late_look_comes_after_the_verdict_and_before_the_end():
    base = QuarantineConfig(train=TOY_RECIPE)   # 4 epochs, verdict before epoch 2
    assert base.late_look_epoch is None
    assert replace(base, late_look_at=0.7).late_look_epoch == 3
    assert replace(base, late_look_at=0.3).late_look_epoch is None   # not after the verdict
    with pytest.raises(ValueError, match="late_look_at"):
        QuarantineConfig(late_look_at=1.5)
