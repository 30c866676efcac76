from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import toy_dataset
from unpoison.attacks.badnets import BadNets
from unpoison.defenses.base import DefenseContext
from unpoison.detect import build_detector
from unpoison.detect.fct import centroid_separation_loss, fct_scores, split_by_rank
from unpoison.metrics import detection_metrics
from unpoison.models.base import Classifier
from unpoison.runtime import generator


class TriggerDetector(Classifier):
    """A toy backdoored network: one feature fires on the BadNets grid in the bottom-right
    corner (the backdoor), two others are the image's mean colour (the 'content')."""

    feature_dim = 3

    def __init__(self) -> None:
        super().__init__(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        grid = BadNets().patch().float() / 255
        self.register_buffer("grid", grid)
        self.head = nn.Linear(3, 2)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, :, -3:, -3:]
        trigger = torch.exp(-((corner - self.grid) ** 2).sum(dim=(1, 2, 3)) / 0.5)
        return torch.stack([4 * trigger, x.mean(dim=(1, 2, 3)), x[:, 0].mean(dim=(1, 2))], dim=1)


def _ctx(cpu, tmp_path: Path, profile: str = "smoke") -> DefenseContext:
    return DefenseContext(cpu, profile, 0, "wrn16-1", tmp_path, progress=False)


def test_fct_is_higher_for_triggered_than_clean_inputs(cpu, tmp_path):
    clean = toy_dataset(200, 4, size=32)
    triggered = clean.with_labels(clean.labels)
    triggered.images = BadNets().apply_trigger(clean.images)
    model = TriggerDetector()
    ctx = _ctx(cpu, tmp_path)
    on_clean = fct_scores(model, clean, ctx)
    on_triggered = fct_scores(model, triggered, ctx)
    assert on_triggered.mean() > 5 * on_clean.mean()
    both = torch.cat([on_clean, on_triggered])
    truth = torch.cat([torch.zeros(200, dtype=torch.bool), torch.ones(200, dtype=torch.bool)])
    assert detection_metrics(both, truth)["auroc"] > 0.95


def test_every_ablation_transform_runs_and_is_seeded(cpu, tmp_path):
    data = toy_dataset(40, 4, size=32)
    model = TriggerDetector()
    ctx = _ctx(cpu, tmp_path)
    for name in ("rotate_translate", "flip", "crop", "blur", "erase"):
        a, b = fct_scores(model, data, ctx, name), fct_scores(model, data, ctx, name)
        assert a.shape == (40,) and torch.equal(a, b) and (a >= 0).all()
    with pytest.raises(ValueError, match="unknown FCT transform"):
        fct_scores(model, data, ctx, "twirl")
    with pytest.raises(ValueError, match="unknown FCT transform"):
        build_detector("fct", "quick", transform="twirl")
    assert build_detector("fct", "quick", transform="blur").config.transform == "blur"


def test_split_sizes_follow_the_ratios_and_ranks():
    scores = torch.rand(1003, generator=torch.Generator().manual_seed(0))
    scores[:50] = 0.0   # ties (e.g. dead features) must not change the sizes
    clean, poisoned = split_by_rank(scores, 0.2, 0.05)
    assert int(clean.sum()) == 200 and int(poisoned.sum()) == 50
    assert not (clean & poisoned).any()
    uncertain = ~(clean | poisoned)
    assert scores[clean].max() <= scores[uncertain].min() and scores[uncertain].max() <= scores[poisoned].min()
    clean, poisoned = split_by_rank(scores, 0.3, 0.1)
    assert int(clean.sum()) == 300 and int(poisoned.sum()) == 100
    with pytest.raises(ValueError):
        split_by_rank(scores, 0.8, 0.3)


def test_centroid_separation_loss():
    labels = torch.tensor([0, 0, 1, 1, 2])
    same = torch.ones(5, 4)
    assert torch.isclose(centroid_separation_loss(same, labels), torch.tensor(6 / 9))   # off-diagonal / K^2
    orthogonal = torch.eye(3)[labels] * torch.tensor([[1.0], [3.0], [2.0], [1.0], [5.0]])
    assert float(centroid_separation_loss(orthogonal, labels)) == 0.0


def test_detector_runs_the_sd_module_end_to_end(cpu, tmp_path):
    data = toy_dataset(256, 4, size=16)
    poisoned = BadNets(target=0, rate=0.1).poison(data, generator(0, "poison"))
    detector = build_detector("fct", "smoke", clean_fraction=0.25, poison_fraction=0.1)
    found = detector.detect(poisoned.untrusted(), _ctx(cpu, tmp_path))
    assert found.scores.shape == (256,) and torch.isfinite(found.scores).all()
    assert int(found.flagged.sum()) == 25
    assert found.info == {"n_clean": 64, "n_poisoned": 25, "n_uncertain": 167}
    assert [s["name"] for s in found.stages] == ["sd_model", "fct"]
    assert found.model is not None and detector.describe()["transform"] == "rotate_translate"


def test_per_class_clean_split_takes_the_lowest_of_every_class():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(400) % 4
    scores = torch.rand(400, generator=g) + (labels == 0).float() * 10   # class 0 scores far higher
    clean, poisoned = split_by_rank(scores, 0.2, 0.05)
    assert not (clean & (labels == 0)).any()          # overall: no class-0 sample is trusted
    clean, poisoned = split_by_rank(scores, 0.2, 0.05, labels)
    assert int(poisoned.sum()) == 20 and not (clean & poisoned).any()
    for y in range(4):
        members = labels == y
        assert int((clean & members).sum()) == 20
        assert scores[clean & members].max() <= scores[members & ~clean & ~poisoned].min()
