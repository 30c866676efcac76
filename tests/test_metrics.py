import torch
from torch import nn

from conftest import toy_dataset
from unpoison.attacks.badnets import BadNets
from unpoison.metrics import backdoor_metrics, defense_effectiveness_rating, detection_metrics


class PatchDetector(nn.Module):
    """Predicts the target whenever the bottom-right pixel is white, else the true colour class."""

    def __init__(self, target: int, palette_model: nn.Module | None = None):
        super().__init__()
        self.target = target

    def forward(self, x):
        logits = torch.zeros(len(x), 4)
        triggered = x[:, :, -1, -1].mean(1) > 0.99
        logits[torch.arange(len(x)), 1] = 1.0          # always says class 1 otherwise
        logits[triggered] = 0
        logits[triggered, self.target] = 5.0
        return logits


def test_asr_excludes_target_class_images(cpu):
    data = toy_dataset(100, 4)
    attack = BadNets(target=2, trigger="square", size=1, position=(15, 15))
    backdoor = attack.backdoor_test(data)
    assert len(backdoor.images) == 75 and (backdoor.true_labels != 2).all()
    m = backdoor_metrics(PatchDetector(target=2), data, attack, cpu)
    assert m["asr"] == 1.0
    assert m["robust_acc"] == 0.0
    assert abs(m["clean_acc"] - 0.25) < 1e-6


def test_detection_metrics():
    truth = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    perfect = torch.tensor([9, 8, 1, 2, 3, 1, 2, 3, 1, 0.5])
    m = detection_metrics(perfect, truth, flagged=perfect > 5)
    assert m["auroc"] == 1.0 and m["tpr_at_fpr_5"] == 1.0
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["n_flagged"] == 2
    inverted = detection_metrics(-perfect, truth, flagged=torch.zeros(10, dtype=torch.bool))
    assert inverted["auroc"] == 0.0 and inverted["n_flagged"] == 0 and inverted["precision"] is None


def test_der():
    assert defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0
    assert defense_effectiveness_rating(0.9, 1.0, 0.8, 1.0) == 0.45
