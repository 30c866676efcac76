import pytest
import torch

from test_dlp import _backdoored_toy
from unpoison.defenses.base import DefenseContext
from unpoison.detect import build_detector
from unpoison.detect.expand import seed_similarity
from unpoison.metrics import detection_metrics


def _clusters(n_per: int, centres: torch.Tensor, spread: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(n_per, len(c), generator=g) for c in centres])


def test_images_near_the_seeds_outscore_images_far_from_them():
    # three groups in feature space; seeds come from group 0 only
    centres = torch.eye(8)[:3] * 3
    features = _clusters(50, centres)
    seeds = torch.arange(5)
    scores = seed_similarity(features, seeds, k=3)
    assert scores[5:50].min() > scores[50:].max()
    # a seed is not its own neighbour: its score is the mean of its k best cosines to the others
    z = torch.nn.functional.normalize(features - features.mean(0), dim=1)
    others = z[1:5] @ z[0]
    assert torch.isclose(scores[0], others.topk(3).values.mean(), atol=1e-6)


def test_each_of_several_seed_groups_keeps_its_neighbourhood():
    # two triggers (two tight groups) among clean features spread everywhere: the k nearest
    # seeds rank both groups above the clean ones, where one centroid would sit between them
    g = torch.Generator().manual_seed(1)
    triggered = _clusters(40, torch.stack([torch.eye(16)[0] * 4, -torch.eye(16)[0] * 4]))
    clean = torch.randn(400, 16, generator=g)
    features = torch.cat([triggered, clean])
    seeds = torch.tensor([0, 1, 2, 40, 41, 42])
    truth = torch.zeros(len(features), dtype=torch.bool)
    truth[:80] = True
    assert detection_metrics(seed_similarity(features, seeds, k=2), truth)["auroc"] > 0.99


def test_seed_similarity_is_chunk_independent_and_rejects_a_single_seed():
    features = torch.randn(300, 6, generator=torch.Generator().manual_seed(2))
    seeds = torch.tensor([3, 50, 120, 299])
    assert torch.allclose(seed_similarity(features, seeds, 2), seed_similarity(features, seeds, 2, chunk=7))
    with pytest.raises(ValueError, match="two seeds"):
        seed_similarity(features, torch.tensor([0]), 2)


@pytest.mark.slow
def test_expand_detector_ranks_the_poisoned_samples_first(tmp_path, cpu):
    attack, poisoned, _ = _backdoored_toy()
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    detection = build_detector("expand", "smoke", filter_rate=0.03).detect(poisoned.untrusted(), ctx)
    assert detection.flagged is None and detection.info["n_seeds"] == round(0.03 * len(poisoned.train))
    n_poison = int(poisoned.is_poison.sum())
    top = detection.scores.argsort(descending=True)[:n_poison]
    assert poisoned.is_poison[top].float().mean() >= 0.8
    assert detection_metrics(detection.scores, poisoned.is_poison)["auroc"] > 0.9
