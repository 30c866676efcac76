import inspect
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import data_root, requires_cifar, toy_dataset
from unpoison.attacks.badnets import BadNets
from unpoison.data.imageset import ImageSet
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.dlp import DLP, au_recipe
from unpoison.detect import build_detector
from unpoison.detect.entropy import entropy_split, prediction_entropy
from unpoison.metrics import backdoor_metrics
from unpoison.models import build_model
from unpoison.train import OptimConfig, TrainConfig, predict, train_supervised
from unpoison.train.unlearn import unlearn


def test_entropy_is_in_bits_and_ranks_confidence():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]])
    h = prediction_entropy(logits)
    assert math.isclose(h[0].item(), 2.0, rel_tol=1e-6)      # uniform over 4 classes = log2(4)
    assert h[1] < h[2] < h[0]


def test_entropy_split_takes_lowest_overall_and_highest_per_class():
    labels = torch.arange(40) % 4
    entropy = torch.linspace(0, 1, 40)[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    suspect, clean = entropy_split(entropy, labels, 4, rate=0.1)            # n*gamma = 4
    assert torch.equal(suspect.sort().values, torch.argsort(entropy)[:4].sort().values)
    assert len(clean) == 4 and torch.equal(labels[clean].sort().values, torch.arange(4))  # one per class
    for c in clean:
        same = labels == labels[c]
        assert entropy[c] == entropy[same].max()
    assert not set(suspect.tolist()) & set(clean.tolist())
    _, clean_b = entropy_split(entropy, labels, 4, rate=0.1, clean_reading="per_class")  # reading (b)
    assert len(clean_b) == 16 and (torch.bincount(labels[clean_b]) == 4).all()


def _backdoored_toy(n=384, seed=0, n_test=0):
    """A poisoned toy training set and a clean toy test set (same class colours)."""
    everything = toy_dataset(n + n_test, 4, size=16, seed=seed)
    data, test = everything.subset(torch.arange(n)), everything.subset(torch.arange(n, n + n_test))
    attack = BadNets(target=0, rate=0.1, trigger="square", size=3)
    return attack, attack.poison(data, torch.Generator().manual_seed(seed)), test


def test_entropy_detector_flags_the_poisoned_samples(tmp_path, cpu):
    attack, poisoned, _ = _backdoored_toy()
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    detection = build_detector("entropy", "smoke", filter_rate=0.05).detect(poisoned.untrusted(), ctx)
    assert detection.flagged.sum() == round(0.05 * len(poisoned.train))
    assert poisoned.is_poison[detection.flagged].float().mean() >= 0.8


def test_paper_profile_is_the_paper():
    """Spec §5.2-5.4, §5.7: WRN-16-1; SL 10 epochs, SGD momentum 0.9, lr 0.01, batch 128;
    gamma 1 %, D'_c n*gamma in total (reading (a)); AU 20 epochs of gradient ascent on the
    mean CE of D'_p at the same optimiser, no early stop, nothing relearned in between."""
    dlp = DLP.for_profile("paper")
    cfg = dlp.config
    sl = cfg.filter.sl
    assert (sl.epochs, sl.batch_size, sl.optim.lr, sl.optim.momentum) == (10, 128, 0.01, 0.9)
    assert (cfg.filter.filter_rate, cfg.filter.clean_reading, cfg.order) == (0.01, "total", "sl-au-assft")
    au = cfg.au
    assert (au.epochs, au.batch_size, au.optim.lr, au.optim.momentum, au.optim.schedule) == (
        20, 128, 0.01, 0.9, "constant")
    assert (au.mode, au.loss, au.bound, au.batchnorm, au.stop, au.stall_epochs) == (
        "unlearn", "ce", None, "train", "never", 0)
    assert (cfg.assft.threshold, cfg.assft.lambda_u, cfg.assft.mu, cfg.assft.batch_size) == (0.95, 1.0, 7, 64)
    assert dlp.deviations("wrn16-1") == []
    assert dlp.deviations("resnet18") == ["model: 'resnet18' (paper: 'wrn16-1')"]


def test_quick_au_is_the_guarded_loop_and_says_so():
    quick = DLP.for_profile("quick")
    au = quick.config.au
    assert (au.mode, au.batchnorm, au.loss, au.bound, au.stop) == ("alternate", "running", "complement", 1.0, "unlearned")
    found = quick.deviations("wrn16-1")
    assert "au.mode: 'alternate' (paper: 'unlearn')" in found and "au.loss: 'complement' (paper: 'ce')" in found
    assert "au.optim.lr: 0.001 (paper: 0.01)" in found
    assert "filter.sl.epochs: 2 (paper: 10)" in found


@pytest.mark.slow
def test_quick_au_unlearns_a_toy_backdoor_and_keeps_the_clean_task(tmp_path, cpu):
    """The stage DLP runs in quick (AU with D'_c relearned) on a saturated toy backdoor: the
    suspected images lose their label while the trusted ones keep theirs."""
    attack, poisoned, _ = _backdoored_toy()
    model = train_supervised(build_model("wrn16-1", 4), poisoned.train,
                             TrainConfig(epochs=3, batch_size=32, augment="none", optim=OptimConfig(lr=0.05)),
                             cpu, name="sl", seed=0, progress=False)
    suspected = poisoned.train.subset(poisoned.poison_index[:16])
    trusted = poisoned.train.subset((~poisoned.is_poison).nonzero().flatten()[::4])

    def accuracy(m, data):
        return (predict(m, data.images, cpu).argmax(1) == data.labels).float().mean().item()

    assert accuracy(model, suspected) > 0.9
    au = replace(au_recipe("smoke"), batch_size=32, optim=replace(au_recipe("smoke").optim, lr=2e-3))
    model = unlearn(model, suspected, au, cpu, trusted=trusted, name="au", seed=0, progress=False)
    assert accuracy(model, suspected) < 0.2
    assert accuracy(model, trusted) > 0.8


@pytest.mark.slow
def test_the_defence_only_ever_gets_images_and_labels(tmp_path, cpu, monkeypatch):
    """DLP.fit takes an ImageSet (no poison mask); FixMatch gets the unlabelled images only."""
    assert list(inspect.signature(DLP.fit).parameters) == ["self", "data", "ctx"]
    assert "is_poison" not in ImageSet.__dataclass_fields__
    seen = {}
    import unpoison.defenses.dlp as dlp_module
    real = dlp_module.train_fixmatch

    def spy(model, labelled, unlabelled_images, *args, **kwargs):
        seen["labelled"], seen["unlabelled"] = labelled, unlabelled_images
        return real(model, labelled, unlabelled_images, *args, **kwargs)

    monkeypatch.setattr(dlp_module, "train_fixmatch", spy)
    _, poisoned, _ = _backdoored_toy(128)
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    build_defense("dlp", "smoke", **{"filter.filter_rate": 0.05}).fit(poisoned.untrusted(), ctx)
    assert isinstance(seen["unlabelled"], torch.Tensor) and seen["unlabelled"].dtype == torch.uint8
    assert len(seen["labelled"]) + len(seen["unlabelled"]) == 128


@pytest.mark.slow
def test_smoke_dlp_removes_a_toy_backdoor(tmp_path, cpu):
    attack, poisoned, test = _backdoored_toy(512, n_test=256)
    measured = {}   # from outside, as the runner does: the SL model is the backdoored one
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False,
                         on_stage=lambda stage, model: measured.update({stage: backdoor_metrics(model, test, attack, cpu)}))
    result = build_defense("dlp", "smoke").fit(poisoned.untrusted(), ctx)
    final = backdoor_metrics(result.model, test, attack, cpu)
    assert [s["name"] for s in result.stages] == ["SL", "filter", "AU", "ASSFT"]
    assert measured["SL"]["asr"] > 0.8
    assert final["asr"] < measured["SL"]["asr"] - 0.5
    assert final["clean_acc"] > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("order,stages", [("sl-assft", ["SL", "filter", "ASSFT"]),
                                          ("sl-assft-au", ["SL", "filter", "ASSFT", "AU"])])
def test_ablation_orders(tmp_path, cpu, order, stages):
    _, poisoned, _ = _backdoored_toy(128)
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    result = build_defense("dlp", "smoke", order=order, **{"assft.epochs": 1}).fit(poisoned.untrusted(), ctx)
    assert [s["name"] for s in result.stages] == stages


@requires_cifar
def test_dlp_run_reports_stages_and_detection(tmp_path):
    from unpoison.run import RunConfig, run

    metrics = run(RunConfig(profile="smoke", attack="badnets", defense="dlp", out=str(tmp_path / "run"),
                            data_root=str(data_root()), device="cpu", progress=False, monitor="stages",
                            share_models=False))
    names = [s["name"] for s in metrics["stages"]]
    assert names == ["SL", "filter", "AU", "ASSFT"]
    for stage in metrics["stages"]:
        if stage["name"] != "filter":
            assert {"clean_acc", "asr", "seconds"} <= set(stage)
    assert {"auroc", "precision", "recall", "n_flagged", "n_trusted", "n_trusted_poisoned"} <= set(metrics["detection"])
    assert metrics["detection"]["n_flagged"] == round(0.01 * metrics["n_train"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["defense_config"]["order"] == "sl-au-assft"
