"""One process of a test in test_distributed.py: `python ddp_worker.py SCENARIO OUT` alone, or
under `torchrun --nproc-per-node 2` (then every rank runs it). Each process saves what it
computed to OUT/<scenario>-<world size>-<rank>.pt; the test compares the files."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import toy_dataset  # noqa: E402

from unpoison import distributed  # noqa: E402
from unpoison.models import build_model  # noqa: E402
from unpoison.runtime import Runtime, TimeBudgetSpent  # noqa: E402
from unpoison.train import OptimConfig, TrainConfig, train_supervised  # noqa: E402
from unpoison.train.contrastive import ContrastiveNet, ss_ctl_loss  # noqa: E402
from unpoison.train.fixmatch import fixmatch_loss  # noqa: E402
from unpoison.train.supervised import extract_features, predict  # noqa: E402


def gradients(out: Path) -> dict:
    """One step's gradients in float64 (so float rounding cannot hide a wrong formula): a
    plain CE step on 13 images (slices of 7 and 6), a FixMatch step (BatchNorm over the
    labelled and both unlabelled views at once) and an SS-CTL step (negatives across the
    whole batch); QuickNet too, whose whitening is fitted on the first batch it sees."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(13, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (13,), generator=g)
    result = {}
    for name in ("wrn16-1", "quicknet"):
        torch.manual_seed(0)
        model = build_model(name, 4).double().train()
        steps = {
            "ce": lambda m: F.cross_entropy(m(x), y),
            "fixmatch": lambda m: fixmatch_loss(m, x[:5], y[:5], x[5:], x.flip(3)[5:], 0.0, 1.0)[0],
            "ssctl": lambda m: ss_ctl_loss(*ContrastiveNet(m).double()(torch.cat([x, x.flip(3)])).split(13),
                                           y, torch.arange(13) % 2 == 0),
        }
        for step, loss_of in steps.items():
            model.zero_grad()
            torch.manual_seed(1)   # the projection head's initial weights
            loss = loss_of(model)
            loss.backward()
            distributed.average_gradients([p.grad for p in model.parameters()])
            result[f"{name}/{step}/loss"] = loss.detach()
            result.update({f"{name}/{step}/grad/{n}": p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None})
        result.update({f"{name}/buffer/{n}": b.clone() for n, b in model.named_buffers()})
    return result


def _train(out: Path, epochs: int, deadline: float | None = None):
    runtime = Runtime.create("cpu", "fp32", deadline=deadline)
    torch.manual_seed(0)
    model = build_model("wrn16-1", 4)
    cfg = TrainConfig(epochs=epochs, batch_size=32, augment="weak", optim=OptimConfig(lr=0.05, schedule="cosine"))
    # 149 images: the last batch of 21 splits 11 / 10
    return train_supervised(model, toy_dataset(149, 4), cfg, runtime, name="stage", seed=3,
                            checkpoint_dir=out / "checkpoints", log_path=out / "log.jsonl", progress=False)


def engine(out: Path) -> dict:
    """A supervised stage of 3 epochs, then its model's scores."""
    model = _train(out, 3)
    return {"state": model.state_dict(), **_scores(model)}


def scores(out: Path) -> dict:
    """The scores of the weights in OUT/weights.pt."""
    model = build_model("wrn16-1", 4)
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    return _scores(model.eval())


def _scores(model) -> dict:
    """Logits, features and prediction entropy of 101 images in batches of 50: the last
    batch is one image, so one rank's slice of it is empty."""
    images = toy_dataset(101, 4).images   # the training palette: the model knows these classes
    runtime = Runtime.create("cpu", "fp32")
    logits = predict(model, images, runtime, batch_size=50)
    return {"logits": logits, "features": extract_features(model, images, runtime, batch_size=50),
            "entropy": -(logits.softmax(1) * logits.log_softmax(1)).sum(1)}


def interrupted(out: Path) -> dict:
    """The same stage with a deadline already past: it stops after its first epoch."""
    try:
        _train(out, 3, deadline=0.0)
    except TimeBudgetSpent:
        return {"stopped": True}
    return {"stopped": False}


def resumed(out: Path) -> dict:
    """The stage again in the same folder, without a deadline: it resumes from the checkpoint."""
    return {"state": _train(out, 3).state_dict()}


SCENARIOS = {"gradients": gradients, "engine": engine, "scores": scores, "interrupted": interrupted,
             "resumed": resumed}

if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    w = distributed.init_from_env()
    try:
        found = SCENARIOS[scenario](folder)
        torch.save(found, folder / f"{scenario}-{w.size}-{w.rank}.pt")
    finally:
        distributed.shutdown()
