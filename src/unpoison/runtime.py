"""Where and how tensors are computed: device, precision, memory format, seeds.

Everything that trains or evaluates takes a `Runtime` explicitly instead of reading
global state, so a test can pin the CPU and fp32 while a benchmark uses CUDA AMP.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass

import torch

from .distributed import main_decides, world


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix units (AVX512-BF16 or AMX).

    Without them bf16 autocast is emulated and runs several times *slower* than fp32
    (measured on an AVX2-only EPYC: 35 vs 320 img/s for WRN-16-1), so it must never be
    switched on by default there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} was requested but CUDA is not available")
    if device.type == "cuda" and device.index is None and world().size > 1:
        device = torch.device("cuda", world().local_rank)   # torchrun: one GPU per process
    return device


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """'bf16', 'fp16' or 'fp32'. 'auto' picks the fastest one that is safe here."""
    if precision != "auto":
        if precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"unknown precision {precision!r} (choose auto, bf16, fp16, fp32)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


class TimeBudgetSpent(Exception):
    """The run's deadline passed: raised at the end of an epoch, after its checkpoint, so
    the same command with --resume continues from there."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    # wall-clock time (time.time()) after which training stops at the next epoch end
    # (`unpoison bench --budget`): where a run may compute includes for how long
    deadline: float | None = None

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", channels_last: bool = True,
               compile: bool = False, deadline: float | None = None) -> "Runtime":
        dev = resolve_device(device)
        return cls(dev, resolve_precision(dev, precision), channels_last, compile, deadline)

    def check_deadline(self, what: str) -> None:
        """Raise TimeBudgetSpent once the deadline has passed (rank 0's clock decides for all)."""
        if self.deadline is not None and main_decides(time.time() >= self.deadline):
            raise TimeBudgetSpent(f"time budget spent after {what}")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name()
        ranks = f", {world().size} processes (torchrun)" if world().size > 1 else ""
        return f"{self.device.type} ({name}), {self.precision}, torch {torch.__version__}{ranks}"

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile and not getattr(model, "_unpoison_compiled", False):
            model.compile()  # in place: state_dict keys and the module type stay the same
            model._unpoison_compiled = True
        return model


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"cpu, {os.cpu_count()} cores"


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (seed, stage name, epoch...).

    Each epoch draws its randomness from its own derived seed, so resuming at epoch k
    replays exactly what an uninterrupted run would have drawn, with no RNG state to save.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g
