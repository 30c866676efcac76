"""Engine throughput vs a bare forward/backward loop, per network (CIFAR-10).

    python benchmarks/throughput.py --steps 60 --precision fp32 bf16
    python benchmarks/throughput.py --models wrn16-1 quicknet-s quicknet --precision bf16

Each network trains at the batch size of its quick recipe (profiles.model_recipe) unless
`--batch` is given.

The bare loop trains on one fixed random batch already on the device (no data handling at
all); the engine row is a real epoch slice: shuffled CIFAR-10 uint8 images, batched
crop+flip augmentation, the engine's step with its schedule and bookkeeping. The ratio
is the share of the bare speed the engine keeps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from unpoison.data import load_dataset
from unpoison.data.batches import batch_indices
from unpoison.io import environment
from unpoison.models import build_model
from unpoison.profiles import model_recipe
from unpoison.runtime import Runtime, generator
from unpoison.train import Engine, OptimConfig
from unpoison.train.supervised import DeviceData, supervised_epoch


def bare(runtime: Runtime, steps: int, batch: int, network: str = "wrn16-1") -> float:
    model = runtime.prepare_model(build_model(network, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = runtime.to_device(torch.rand(batch, 3, 32, 32))
    y = torch.randint(0, 10, (batch,), device=runtime.device)
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        with runtime.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def engine(runtime: Runtime, steps: int, batch: int, data, network: str = "wrn16-1") -> float:
    model = build_model(network, 10)
    eng = Engine(model, OptimConfig(lr=0.1, schedule="cosine"), runtime, name="throughput", epochs=1,
                 steps_per_epoch=steps + 5, progress=False)
    dev = DeviceData(data.subset(torch.arange((steps + 5) * batch)), runtime)
    epoch = supervised_epoch(dev, batch, "weak")
    timings = []

    def timed(engine_, e, g):
        original = engine_.step

        def step(loss, images=0):
            out = original(loss, images)
            timings.append(time.perf_counter())
            return out
        engine_.step = step
        epoch(engine_, e, g)
    eng.fit(timed)
    return steps * batch / (timings[-1] - timings[4])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=None, help="default: each network's quick recipe's")
    p.add_argument("--models", nargs="+", default=["wrn16-1"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    data = load_dataset("cifar10", "train")
    rows = []
    for network in args.models:
        batch = args.batch or model_recipe("quick", network).batch_size
        parameters = sum(p.numel() for p in build_model(network, 10).parameters())
        for precision in args.precision:
            runtime = Runtime.create(args.device, precision)
            b = bare(runtime, args.steps, batch, network)
            e = engine(runtime, args.steps, batch, data, network)
            rows.append({"model": network, "parameters": parameters, "batch": batch, "precision": precision,
                         "bare_img_per_s": round(b, 1), "engine_img_per_s": round(e, 1),
                         "engine_share": round(e / b, 3)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": Runtime.create(args.device).describe(), "environment": environment()}))


if __name__ == "__main__":
    main()
