"""Contrastive building blocks: a projection head and the (semi-)supervised contrastive loss.

The loss is SupCon (Khosla et al. 2020) with an explicit positive mask, so SimCLR, SupCon
and D-ST's semi-supervised SS-CTL (spec §3.6) are the same function with different masks:

    L = 1/|anchors| * sum_a  -(T / T_base) * 1/|P(a)| * sum_{p in P(a)} log softmax_{k != a}(z_a . z_k / T)[p]

Views are stacked as [view 1 of every sample; view 2 of every sample], so anchor a and
anchor a + B come from the same image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .engine import OptimConfig


def contrastive_optim(lr: float, **changes) -> OptimConfig:
    """SimCLR's and SupCon's optimiser (DBD's and D-ST's encoder stage): SGD with momentum
    0.9 and no Nesterov, wd 1e-4, cosine decay; the stages differ in lr and warm-up."""
    return OptimConfig(lr=lr, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="cosine", **changes)


class ProjectionHead(nn.Module):
    """SupCon's MLP head: Linear(d, d) -> ReLU -> Linear(d, out), L2-normalised output."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


class ContrastiveNet(nn.Module):
    """An encoder (any unpoison Classifier; its `features`) with a projection head on top.
    The classifier's own `head` is not used while training contrastively."""

    def __init__(self, encoder: nn.Module, out_dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = ProjectionHead(encoder.feature_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder.features(x))


def ss_ctl_positives(labels: torch.Tensor, trusted: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """SS-CTL positive mask (2B x 2B, bool, no self-pairs) for views stacked [view1; view2].

    A trusted-clean anchor's positives are all other views with its label; every other
    anchor's only positive is the second view of its own image. The mask is row-wise, as in
    the official code: a clean anchor may take a same-label suspicious sample as a positive.
    `strict=True` restricts a clean anchor's label positives to trusted-clean samples
    (its own second view always stays), a documented deviation.
    """
    labels2 = labels.repeat(2)
    trusted2 = trusted.bool().repeat(2)
    n = len(labels2)
    idx = torch.arange(n, device=labels.device)
    own_view = idx[:, None] == ((idx + n // 2) % n)[None, :]
    same_label = labels2[:, None] == labels2[None, :]
    if strict:
        same_label = same_label & trusted2[None, :]
    positives = torch.where(trusted2[:, None], same_label | own_view, own_view)
    return positives & ~torch.eye(n, dtype=torch.bool, device=labels.device)


def contrastive_loss(z: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1,
                     base_temperature: float = 0.07) -> torch.Tensor:
    """SupCon loss of L2-normalised embeddings z (N, D) with a bool positive mask (N, N).

    The denominator runs over every other view (self excluded); each anchor averages the
    log-probabilities of its positives; the result is scaled by T / T_base as in the
    official SupCon code (with T = 0.1, T_base = 0.07 that is a factor of 0.1 / 0.07).
    """
    n = len(z)
    logits = (z @ z.t()).float() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    # subtracting the row max changes nothing mathematically and keeps exp() finite
    logits = logits - logits.detach().max(dim=1, keepdim=True).values
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = positives & ~self_mask
    counts = positives.sum(1).clamp(min=1)
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1) / counts
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def ss_ctl_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor,
                temperature: float = 0.1, base_temperature: float = 0.07, strict: bool = False) -> torch.Tensor:
    """D-ST's semi-supervised contrastive loss of two views (B, D) of the same B images."""
    positives = ss_ctl_positives(labels, trusted, strict)
    return contrastive_loss(torch.cat([z1, z2]), positives, temperature, base_temperature)
