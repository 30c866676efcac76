import math

import torch
import torch.nn.functional as F

from unpoison.train.contrastive import contrastive_loss, ss_ctl_loss, ss_ctl_positives


def test_ss_ctl_positive_mask_row_only_and_strict():
    # 3 images: 0 trusted (label 1), 1 untrusted (label 1), 2 trusted (label 2); views [v1; v2]
    labels = torch.tensor([1, 1, 2])
    trusted = torch.tensor([True, False, True])
    mask = ss_ctl_positives(labels, trusted)
    # the trusted anchor 0 takes every other label-1 view, including the untrusted image's
    assert mask[0].nonzero().flatten().tolist() == [1, 3, 4]
    # the untrusted anchor 1 takes only its own second view, though image 0 shares its label
    assert mask[1].nonzero().flatten().tolist() == [4]
    assert mask[2].nonzero().flatten().tolist() == [5]
    assert not mask.diagonal().any()
    strict = ss_ctl_positives(labels, trusted, strict=True)
    assert strict[0].nonzero().flatten().tolist() == [3]   # own view only: image 1 is not trusted
    assert strict[3].nonzero().flatten().tolist() == [0] and mask[3].nonzero().flatten().tolist() == [0, 1, 4]
    assert torch.equal(strict[[1, 2, 4, 5]], mask[[1, 2, 4, 5]])   # untrusted rows are unchanged


def test_loss_equals_a_hand_computed_value_on_a_4_sample_batch():
    # two images x two views = 4 embeddings, stacked [img0 v1, img1 v1, img0 v2, img1 v2];
    # image 0 is trusted clean, image 1 is not, both have label 0
    angles = [0.0, 1.0, 0.3, 2.0]
    z = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    labels, trusted = torch.tensor([0, 0]), torch.tensor([True, False])
    T, T_base = 0.1, 0.07
    # positives by the rule: trusted anchors (views 0 and 2) take every other label-0 view;
    # untrusted anchors (views 1 and 3) take only their own other view
    positives = {0: [1, 2, 3], 1: [3], 2: [0, 1, 3], 3: [1]}
    total = 0.0
    for a in range(4):
        dots = {k: math.cos(angles[a] - angles[k]) / T for k in range(4) if k != a}
        log_denominator = math.log(sum(math.exp(v) for v in dots.values()))
        total += -(T / T_base) * sum(dots[p] - log_denominator for p in positives[a]) / len(positives[a])
    expected = total / 4
    got = ss_ctl_loss(z[:2], z[2:], labels, trusted, T, T_base)
    assert abs(float(got) - expected) < 1e-5


def test_supcon_reduces_to_simclr_with_own_view_positives():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    own = torch.zeros(8, 8, dtype=torch.bool)
    own[torch.arange(8), (torch.arange(8) + 4) % 8] = True
    logits = (z @ z.t() / 0.5).masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
    simclr = F.cross_entropy(logits, (torch.arange(8) + 4) % 8)   # NT-Xent
    assert torch.allclose(contrastive_loss(z, own, 0.5, 0.5), simclr, atol=1e-6)
    untrusted = ss_ctl_loss(z[:4], z[4:], torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), 0.5, 0.5)
    assert torch.allclose(untrusted, simclr, atol=1e-6)
