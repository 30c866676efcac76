import copy
from statistics import median
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from toy_backdoor import TOY_SEEDS, tiny_backdoor, train_toy_backdoored
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.dbr import DBR, DBRConfig, official_backdoored, official_loop, repair, unlearn_relearn
from unpoison.detect.fct import SampleSplit, SDConfig
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime

CPU = Runtime.create("cpu", "fp32")


@pytest.fixture(scope="module")
def backdoor():
    """The tiny backdoor of toy_backdoor.py and a model trained on it without augmentation
    (it learns the backdoor: ASR ~ 1)."""
    poisoned, attack, test = tiny_backdoor()
    return poisoned, attack, test, train_toy_backdoored(poisoned)


def _ctx(tmp_path: Path, seed: int = 0) -> DefenseContext:
    return DefenseContext(CPU, "smoke", seed, "wrn16-1", tmp_path, progress=False)


def _smoke_without_augmentation() -> DBRConfig:
    # the toy model was trained without augmentation (a flip moves the grid to the other
    # corner, which it never saw), so D-BR's passes run without it too
    config = DBRConfig.for_profile("smoke")
    return replace(config, unlearn=replace(config.unlearn, augment="none"))


def _split(n: int, poisoned: torch.Tensor, clean: torch.Tensor) -> SampleSplit:
    return SampleSplit(torch.zeros(n), clean, poisoned)


@pytest.mark.slow
def test_br_with_a_precise_split_removes_the_backdoor_and_keeps_clean_accuracy(backdoor, tmp_path):
    poisoned, attack, test, model = backdoor
    before = backdoor_metrics(model, test, attack, CPU)
    assert before["asr"] > 0.9
    n = len(poisoned.is_poison)
    suspected = torch.zeros(n, dtype=torch.bool)
    suspected[torch.nonzero(poisoned.is_poison).flatten()[:25]] = True     # 5 %, all poison
    trusted = ~poisoned.is_poison & (torch.arange(n) % 5 == 0)            # ~20 %, all clean
    config = _smoke_without_augmentation().unlearn
    repaired = unlearn_relearn(copy.deepcopy(model).requires_grad_(True), poisoned.untrusted(),
                               _split(n, suspected, trusted), _ctx(tmp_path), config)
    after = backdoor_metrics(repaired, test, attack, CPU)
    assert after["asr"] < 0.1
    assert after["clean_acc"] > 0.85     # chance 0.25; the ascent first costs the target class, relearning returns it


@pytest.mark.slow
def test_repair_runs_sd_then_br_and_leaves_the_input_model_untouched(backdoor, tmp_path):
    """End to end on the toy set: the pipeline, the split's precision and that the input is
    not modified (the test above checks BR's effect)."""
    poisoned, attack, test, model = backdoor
    before = backdoor_metrics(model, test, attack, CPU)
    config = _smoke_without_augmentation()
    precisions = []
    for seed in TOY_SEEDS:
        result = repair(model, poisoned.untrusted(), _ctx(tmp_path / str(seed), seed), config)
        assert backdoor_metrics(model, test, attack, CPU)["asr"] == before["asr"]
        assert result.suspicion.shape == (512,) and int(result.flagged.sum()) == int(0.05 * 512)
        precisions.append(float((result.flagged & poisoned.is_poison).sum()) / int(result.flagged.sum()))
        assert [s["name"] for s in result.stages] == ["sd_model", "fct", "unlearn_relearn"]
        assert result.model is not model
    # the split's precision swings with the seed and the CPU's kernels (0.64 on one seed with
    # AVX2 kernels): the claim is the median's
    assert median(precisions) >= 0.8, precisions


@pytest.mark.slow
def test_repair_with_the_expand_scorer_and_a_per_class_trusted_set(backdoor, tmp_path):
    poisoned, attack, test, model = backdoor
    config = replace(_smoke_without_augmentation(),
                     sd=replace(SDConfig.for_profile("smoke"), scorer="expand", clean_per_class=True))
    result = repair(model, poisoned.untrusted(), _ctx(tmp_path), config)
    assert [s["name"] for s in result.stages] == ["SL", "unlearn_relearn"]
    precision = float((result.flagged & poisoned.is_poison).sum()) / int(result.flagged.sum())
    assert precision >= 0.8
    labels = poisoned.train.labels
    for y in labels.unique():   # the trusted set holds alpha_c of every class
        assert int((result.trusted & (labels == y)).sum()) == int(0.2 * int((labels == y).sum()))
    with pytest.raises(ValueError, match="scorer"):
        SDConfig(scorer="psychic")


def test_paper_profile_is_the_official_code():
    """Spec §3.8-3.9: ResNet-18 (stem max-pool) trained 200 epochs at lr 0.01 (MultiStep
    100/150, wd 5e-4, batch 128, crop+flip); the BR loop: 20 epochs of (-CE ascent on D_p,
    CE on D_c) at lr 1e-4, momentum 0.9, wd 5e-4, batch 128, crop+flip, BN in train mode,
    last epoch; SD: alpha_c 0.20, alpha_p 0.05 on its own ResNet-18."""
    paper = DBRConfig.for_profile("paper")
    loop = paper.unlearn
    assert (loop.epochs, loop.batch_size, loop.augment, loop.mode) == (20, 128, "weak", "alternate")
    assert (loop.optim.lr, loop.optim.momentum, loop.optim.nesterov, loop.optim.weight_decay, loop.optim.schedule) == (
        1e-4, 0.9, False, 5e-4, "constant")
    assert (loop.batchnorm, loop.loss, loop.bound, loop.stop, loop.stall_epochs) == ("train", "ce", None, "never", 0)
    assert paper.model == "resnet18-maxpool" and paper.sd.model == "resnet18-maxpool"
    b = paper.backdoored
    assert (b.epochs, b.batch_size, b.augment, b.optim.lr, b.optim.weight_decay, b.optim.schedule,
            tuple(b.optim.milestones), b.optim.gamma, b.optim.nesterov) == (
        200, 128, "weak", 0.01, 5e-4, "multistep", (100, 150), 0.1, False)
    assert (paper.sd.clean_fraction, paper.sd.poison_fraction, paper.sd.ce_epochs, paper.sd.intra_epochs) == (
        0.2, 0.05, 2, 10)
    assert paper.unlearn == official_loop() and paper.backdoored == official_backdoored()
    assert DBR(paper).deviations("wrn16-1") == []


def test_quick_profile_names_each_change_to_the_loop():
    quick = DBR.for_profile("quick")
    found = quick.deviations("wrn16-1")
    for setting in ("unlearn.batchnorm: 'running' (paper: 'train')", "unlearn.loss: 'complement' (paper: 'ce')",
                    "unlearn.bound: 1.0 (paper: None)", "unlearn.stop: 'unlearned' (paper: 'never')",
                    "model: 'wrn16-1' (paper: 'resnet18-maxpool')"):
        assert setting in found
    # the typed settings take --set strings and reject unknown values before any training
    assert build_defense("dbr", "smoke", **{"unlearn.bound": "0.5"}).config.unlearn.bound == 0.5
    assert build_defense("dbr", "smoke", **{"unlearn.bound": "none"}).config.unlearn.bound is None
    with pytest.raises(ValueError, match="batchnorm"):
        build_defense("dbr", "smoke", **{"unlearn.batchnorm": "sometimes"})
    with pytest.raises(ValueError, match="loss"):
        build_defense("dbr", "smoke", **{"unlearn.loss": "hinge"})
