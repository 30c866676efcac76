"""Batch index streams over in-memory datasets (no DataLoader, no worker processes)."""

from __future__ import annotations

import torch


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True,
                  drop_last: bool = False) -> list[torch.Tensor]:
    """Split range(n) (shuffled with `generator` when asked) into batches of indices."""
    if n <= 0:
        return []
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def endless_indices(n: int, batch_size: int, generator: torch.Generator):
    """Reshuffled passes over range(n), concatenated, cut into full batches forever
    (the unlabelled stream of FixMatch, which is longer than the labelled one)."""
    buffer = torch.empty(0, dtype=torch.long)
    while True:
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]
