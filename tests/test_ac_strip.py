"""Activation clustering and STRIP rank the poisoned images of a toy backdoor above the clean ones."""

import pytest
import torch

from toy_backdoor import disc_dataset, train_toy_backdoored
from unpoison.attacks.badnets import BadNets
from unpoison.defenses.base import DefenseContext
from unpoison.detect import build_detector
from unpoison.detect.strip import robust_threshold, superimpose
from unpoison.metrics import detection_metrics, recall_at_fraction
from unpoison.runtime import Runtime, generator

CPU = Runtime.create("cpu", "fp32")


@pytest.fixture(scope="module")
def backdoor():
    """The toy discs with an easy trigger: a white 3x3 square (it survives STRIP's overlays)."""
    attack = BadNets(target=0, rate=0.1, trigger="square", size=3)
    poisoned = attack.poison(disc_dataset(512), generator(0, "poison"))
    return poisoned, train_toy_backdoored(poisoned)


# AC with PCA: on the toy's 64-d features FastICA (the paper's reduction, the default) rescales
# noise directions to unit variance and 2-means splits the target class along one of them
@pytest.mark.slow
@pytest.mark.parametrize("name,settings", [
    # known defect: on this toy AC with PCA ranks at AUROC ~0.80 (CIFAR-10 BadNets: 1.000); issue 19
    pytest.param("ac", {"reduction": "pca"}, marks=pytest.mark.xfail(reason="AC on the toy backdoor: AUROC 0.80", strict=False)),
    ("strip", {})])
def test_detector_ranks_poisoned_above_clean(backdoor, tmp_path, name, settings):
    poisoned, model = backdoor
    ctx = DefenseContext(CPU, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    # the no-defence model both detectors read comes through the shared-model hook
    ctx.shared_model = lambda key, build: model
    found = build_detector(name, "smoke", **settings).detect(poisoned.untrusted(), ctx)
    metrics = detection_metrics(found.scores, poisoned.is_poison, found.flagged)
    assert metrics["auroc"] > 0.85, metrics
    assert metrics["recall_at_10_percent"] > 0.5, metrics
    assert found.flagged is not None and found.model is model


def test_recall_at_ten_percent_counts_poison_among_the_top_tenth():
    scores = torch.arange(100.0)
    truth = torch.zeros(100, dtype=torch.bool)
    truth[[99, 95, 10]] = True
    assert recall_at_fraction(scores, truth, 0.1) == pytest.approx(2 / 3)


def test_strip_overlay_saturates_and_threshold_ignores_a_minority():
    a = torch.full((1, 3, 2, 2), 200, dtype=torch.uint8)
    assert int(superimpose(a, a).max()) == 255
    entropy = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.1 + 3,
                         torch.zeros(100)])
    assert 2.6 < robust_threshold(entropy) < 2.9


def test_a_grid_lists_detectors_as_detection_only_cells():
    from unpoison.bench import Grid, check_cells

    grid = Grid.from_dict({"attacks": ["badnets"], "defenses": ["none", "ft"], "detectors": ["ac", "strip"],
                           "overrides": [{"where": {"defense": "detect-ac"}, "set": {"reduction": "pca"}}]})
    cells = grid.cells()
    assert [c.defense for c in cells] == ["none", "ft", "detect-ac", "detect-strip"]
    ac = cells[2]
    assert (ac.defense_name, ac.detector, ac.detector_params, ac.defense_params) == ("none", "ac", {"reduction": "pca"}, {})
    assert ac.spec()["detector"] == "ac" and "detector" not in cells[0].spec()
    assert check_cells(cells) == []
