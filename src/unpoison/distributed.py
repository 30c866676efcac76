"""Several processes, one run: data parallelism under `torchrun`.

Every rank runs the whole program on the whole dataset: it draws the same batch indices and
the same augmentations from the same (seed, stage, epoch) generator, computes every loss,
score and decision the single-process run computes, and differs from it only here:

- `split_batch`: a Classifier's backbone (the costly part) runs on this rank's contiguous
  slice of each batch, and the slices' outputs are gathered back in the batch's order, so
  everything after the backbone (the head, projection heads, CBD's critic, every loss and
  per-sample score) sees the full batch on every rank. Training and inference are split
  alike: `predict`, `extract_features` and every score built on them come out complete,
  in the original order, on every rank.
- `GlobalBatchNorm2d`: in training mode each BatchNorm normalises with the statistics of
  the whole batch (all ranks' slices), as one process would. Per-rank statistics (what
  DDP does by default) would change FixMatch's and the contrastive steps' batches, and
  the ascent pass on triggered-only batches; torch's SyncBatchNorm refuses CPU tensors.
- `average_gradients`: after backward, every gradient is averaged across ranks.

Why not `DistributedDataParallel`: methods call `model.features()` and `model.head`
directly, run several forwards per step (FixMatch, ANP's ascent, CBD's two networks) and
compute losses over the whole batch (contrastive negatives, CBD's critic), which DDP's
forward-hook bookkeeping does not follow. Splitting only the backbone keeps every method's
code as it is, and makes the result depend on the rank count only through float rounding.

Gradient convention: inside the split region a rank's gradients carry the world size as a
factor (the gather's backward scales by it), so that averaging *every* parameter's
gradient, split or replicated, gives the full-batch gradient. Input gradients leaving the
split region are gathered and exact on every rank (the label-consistent attack and
TrojanNN optimise inputs).

At world size 1 (no torchrun) nothing here calls torch.distributed: each helper is the
identity. Only rank 0 writes files (`is_main`); choices that depend on the file system or
the clock are made by rank 0 and broadcast (`main_decides`), so ranks never take
different branches around a collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


def world() -> World:
    """This process's place in the run: World() unless torchrun started it and
    `init_from_env` joined the process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env() -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo for CPU tensors, NCCL for
    CUDA ones where there is a GPU); otherwise do nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return world().rank == 0


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def main_decides(value: T) -> T:
    """Rank 0's `value` on every rank (a file's existence, whether time is up)."""
    if world().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block (e.g. decoding a dataset into the shared cache) before the
    others do, so they read what it wrote instead of racing it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:   # also when rank 0 fails: the others then fail on their own instead of waiting
        if is_main():
            barrier()


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Ranks other than 0 print nothing (rank 0 prints the same lines); an exception that
    ends one still shows, with its rank."""
    w = world()
    if w.rank == 0:
        yield
        return
    stderr = sys.stderr
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        try:
            yield
        except Exception:
            stderr.write(f"[rank {w.rank}] " + traceback.format_exc())
            raise


# ----------------------------------------------------------------------- collectives

def _slices(n: int, size: int) -> list[int]:
    """Rows per rank when n rows are split into contiguous slices (torch.tensor_split's rule)."""
    return [n // size + (r < n % size) for r in range(size)]


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (slices may differ in length by one)."""
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def all_rows(x: torch.Tensor) -> torch.Tensor:
    """Inside the split region, the whole batch this rank holds a slice of (no gradient)."""
    w = world()
    if w.size == 1:
        return x
    counts = torch.tensor([len(x)], device=x.device)
    every = [torch.empty_like(counts) for _ in range(w.size)]
    dist.all_gather(every, counts)
    return gather_rows(x.detach(), [int(c) for c in every])


class _Slice(torch.autograd.Function):
    """Forward: this rank's rows of the full batch. Backward: every rank's input gradient
    gathered (divided by the world size, undoing the split region's factor)."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.counts = counts
        start = sum(counts[:world().rank])
        return full[start:start + counts[world().rank]].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_rows(grad.contiguous(), ctx.counts) / world().size, None


class _Gather(torch.autograd.Function):
    """Forward: every rank's output rows in the batch's order. Backward: the gradient of this
    rank's rows (the same full gradient arrives on every rank), times the world size."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.counts = counts
        return gather_rows(local, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.counts[:world().rank])
        return grad[start:start + ctx.counts[world().rank]] * world().size, None


class _AllReduceSum(torch.autograd.Function):
    """A sum over ranks whose gradient is the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def split_batch(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """fn(x) for a batch x, with each rank computing its contiguous slice of the rows."""
    w = world()
    if w.size == 1:
        return fn(x)
    sync_batchnorm(module)
    counts = _slices(len(x), w.size)
    return _Gather.apply(fn(_Slice.apply(x, counts)), counts)


def average_gradients(tensors: list[torch.Tensor | None]) -> None:
    """Average gradients across ranks, in place, in one collective per dtype."""
    if world().size == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            by_kind.setdefault((t.device, t.dtype), []).append(t)
    for group in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world().size
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


# ----------------------------------------------------------------------- BatchNorm

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the whole batch across ranks
    (two passes: the mean, then the mean squared deviation from it, for float accuracy).
    Its parameters and buffers are BatchNorm2d's, so checkpoints do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world().size > 1):
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))   # statistics never in half precision
        dims = (0, 2, 3)
        # one collective for the sums and the element count (this rank's slice may be empty)
        totals = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / x.shape[1]])]))
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(count))
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # the running variance is the unbiased one, as F.batch_norm keeps it
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), factor)


def sync_batchnorm(module: nn.Module) -> None:
    """Make every BatchNorm2d of `module` a GlobalBatchNorm2d, in place (same parameter
    objects, so an optimiser built before keeps working)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d

