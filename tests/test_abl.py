import pytest
import torch
import torch.nn.functional as F

from conftest import toy_dataset
from unpoison.attacks.badnets import BadNets
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.detect import build_detector
from unpoison.detect.loss import isolation_loss
from unpoison.metrics import backdoor_metrics


def test_lga_pushes_losses_below_gamma_back_up():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]], requires_grad=True)   # CE ~0.036 (below 0.5), ~0.69 (above)
    labels = torch.tensor([0, 0])
    per_sample = F.cross_entropy(logits.detach(), labels, reduction="none")
    loss = isolation_loss(logits, labels, "lga", 0.5)
    assert torch.isclose(loss, (-per_sample[0] + per_sample[1]) / 2)
    loss.backward()
    # descending this loss raises the first sample's CE (ascent) and lowers the second's
    assert logits.grad[0, 0] > 0 and logits.grad[1, 0] < 0
    flood = isolation_loss(logits.detach(), labels, "flooding", 0.5)
    assert torch.isclose(flood, (per_sample.mean() - 0.5).abs() + 0.5)


def _toy(n=512, n_test=256):
    everything = toy_dataset(n + n_test, 4, size=16)
    data, test = everything.subset(torch.arange(n)), everything.subset(torch.arange(n, n + n_test))
    attack = BadNets(target=0, rate=0.1, trigger="square", size=3)
    return attack, attack.poison(data, torch.Generator().manual_seed(0)), test


@pytest.mark.slow
def test_loss_detector_isolates_the_lowest_loss_fraction(tmp_path, cpu):
    _, poisoned, _ = _toy()
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    detection = build_detector("loss", "smoke", isolation_rate=0.05).detect(poisoned.untrusted(), ctx)
    flagged = detection.flagged
    assert int(flagged.sum()) == round(0.05 * 512)
    assert detection.scores[flagged].min() >= detection.scores[~flagged].max()   # lowest loss = highest score


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_smoke_abl_runs_both_stage_two_forms(tmp_path, cpu, mode):
    attack, poisoned, test = _toy(256, 128)
    ctx = DefenseContext(cpu, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    result = build_defense("abl", "smoke", mode=mode, **{"isolation.isolation_rate": 0.05}).fit(
        poisoned.untrusted(), ctx)
    names = [s["name"] for s in result.stages]
    assert names[:2] == ["isolation", "isolate"] and names[-1] == "unlearn"
    assert int(result.flagged.sum()) == round(0.05 * 256) and result.suspicion.shape == (256,)
    assert 0 <= backdoor_metrics(result.model, test, attack, cpu)["clean_acc"] <= 1
