import inspect
import math

import pytest
import torch
from torch import nn

from conftest import toy_dataset
from unpoison.models import build_model
from unpoison.train import OptimConfig, lr_at, predict
from unpoison.train.fixmatch import FixMatchConfig, fixmatch_epoch, fixmatch_loss, train_fixmatch


class FixedLogits(nn.Module):
    """Returns preset logits, one row per input, so the loss can be checked by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits[: len(x)]


def test_pseudo_labels_come_from_the_weak_view_and_respect_the_threshold():
    # batch layout: 1 labelled, 2 weak-unlabelled, 2 strong-unlabelled
    logits = torch.tensor([[5.0, 0, 0],      # labelled, label 0
                           [0, 10.0, 0],     # weak u1: confident class 1
                           [1.0, 1.2, 0],    # weak u2: unsure -> masked out
                           [0, 0, 3.0],      # strong u1
                           [0, 0, 3.0]])     # strong u2
    model = FixedLogits(logits)
    x = torch.zeros(5, 3, 4, 4)
    loss, stats = fixmatch_loss(model, x[:1], torch.tensor([0]), x[1:3], x[3:5], threshold=0.95, lambda_u=1.0)
    ce = nn.functional.cross_entropy
    expected_u = ce(logits[3:4], torch.tensor([1])) / 2     # mean over the whole unlabelled batch
    assert stats["mask_rate"] == 0.5
    assert torch.isclose(loss, ce(logits[:1], torch.tensor([0])) + expected_u)
    loss.backward()
    assert model.logits.grad[1:3].abs().sum() == 0            # no gradient through the pseudo-labels


def test_unlabelled_stream_carries_no_labels_by_construction(cpu):
    params = inspect.signature(fixmatch_epoch).parameters
    assert list(params)[:3] == ["labelled_images", "labels", "unlabelled_images"]
    data = toy_dataset(64, 4)
    with pytest.raises(TypeError, match="never their labels"):
        train_fixmatch(build_model("wrn16-1", 4), data.subset(torch.arange(8)), data, FixMatchConfig(epochs=1),
                       cpu, name="fm", seed=0, progress=False)


def test_fixmatch_cosine_schedule():
    cfg = OptimConfig(lr=0.03, schedule="fixmatch_cosine")
    assert lr_at(cfg, 0, 10) == 0.03
    assert math.isclose(lr_at(cfg, 10, 10), 0.03 * math.cos(7 * math.pi / 16))
    assert lr_at(cfg, 5, 10) > 0.5 * 0.03   # flatter than a plain cosine


def test_fixmatch_learns_from_few_labels_and_reloads_its_checkpoint(tmp_path, cpu):
    data = toy_dataset(320, 4)
    labelled = data.subset(torch.arange(8))          # two labelled images per class
    unlabelled = data.images[8:]
    cfg = FixMatchConfig(epochs=2, steps_per_epoch=5, batch_size=8, mu=3, ema_decay=0.9,
                         optim=OptimConfig(lr=0.05, schedule="fixmatch_cosine", decay_norm_and_bias=False))

    def trained(folder):
        torch.manual_seed(0)
        return train_fixmatch(build_model("wrn16-1", 4), labelled, unlabelled, cfg, cpu, name="fm", seed=3,
                              checkpoint_dir=folder, progress=False)

    model = trained(tmp_path / "a")
    acc = (predict(model, data.images[8:], cpu).argmax(1) == data.labels[8:]).float().mean()
    assert acc > 0.8
    # a second run from the finished checkpoint returns the same weights
    again = trained(tmp_path / "a")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
