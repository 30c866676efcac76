"""The shared unlearning block (train/unlearn.py): losses, BatchNorm mode, the loop, stop rules."""

import copy
import math
from statistics import median
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from toy_backdoor import TOY_SEEDS, tiny_backdoor, train_toy_backdoored
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime
from unpoison.train import Engine, OptimConfig, predict
from unpoison.train.unlearn import UnlearnConfig, describe, stop_reason, unlearn, unlearning_loss

CPU = Runtime.create("cpu", "fp32")


@pytest.fixture(scope="module")
def backdoor():
    """The tiny backdoor of toy_backdoor.py and a model that learnt it (ASR ~ 1): the
    suspected images are saturated (p_y ~ 1), the case where -CE ascent has no gradient."""
    poisoned, attack, test = tiny_backdoor()
    return poisoned, attack, test, train_toy_backdoored(poisoned)


@pytest.fixture
def fitted_engines(monkeypatch) -> list:
    """Every Engine that runs `fit` during the test, in order (to read its history)."""
    engines = []
    original = Engine.fit
    monkeypatch.setattr(Engine, "fit", lambda self, fn: engines.append(self) or original(self, fn))
    return engines


def _sets(poisoned, n_suspected: int = 25, every: int = 5):
    """(suspected: the first n poisoned images, trusted: every `every`-th clean image)."""
    data = poisoned.untrusted()
    n = len(data)
    suspected = torch.nonzero(poisoned.is_poison).flatten()[:n_suspected]
    trusted = ~poisoned.is_poison & (torch.arange(n) % every == 0)
    return data.subset(suspected), data.subset(trusted)


def _loss(model, data) -> float:
    return float(F.cross_entropy(predict(model, data.images, CPU), data.labels))


def _accuracy(model, data) -> float:
    return float((predict(model, data.images, CPU).argmax(1) == data.labels).float().mean())


def _bn_buffers(model) -> list[torch.Tensor]:
    return [b.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var)]


def _run(model, suspected, cfg, trusted=None, name="unlearn", seed=0):
    return unlearn(copy.deepcopy(model), suspected, cfg, CPU, trusted=trusted, name=name, seed=seed, progress=False)


# ---------------------------------------------------------------------------- losses


def test_margin_and_complement_keep_a_gradient_where_ce_ascent_vanishes():
    """On a sample fitted with p_y ~ 1, -CE's gradient is ~ 1 - p_y (nothing); the complement
    and margin losses still push the label's logit down at O(1)."""
    logits = torch.tensor([[12.0, 0.0, 0.0]], requires_grad=True)
    label = torch.tensor([0])
    grads = {}
    for kind in ("ce", "complement", "margin"):
        logits.grad = None
        unlearning_loss(logits, label, kind).backward()
        grads[kind] = logits.grad[0, 0].item()
    assert 0 < grads["ce"] < 1e-4
    assert grads["complement"] > 0.5 and grads["margin"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["ce", "complement"])
def test_samples_past_the_bound_give_no_gradient(kind):
    logits = torch.tensor([[5.0, 0.0], [-5.0, 0.0]], requires_grad=True)   # fitted, unfitted
    unlearning_loss(logits, torch.tensor([0, 0]), kind, bound=math.log(2)).backward()
    assert logits.grad[0].abs().sum() > 0
    assert logits.grad[1].abs().sum() == 0


def test_margin_loss_is_zero_once_the_label_trails_by_the_margin():
    logits = torch.tensor([[0.0, 1.5], [0.0, 0.5]], requires_grad=True)
    loss = unlearning_loss(logits, torch.tensor([0, 0]), "margin", margin=1.0)
    loss.backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0
    assert float(loss.detach()) == pytest.approx(0.25)     # (0 + 0.5) / 2


def test_bound_is_in_units_of_chance_and_settings_are_checked():
    assert UnlearnConfig(bound=1.0).bound_nats(10) == pytest.approx(math.log(10))
    assert UnlearnConfig(bound="none").bound is None and UnlearnConfig(bound="0.5").bound == 0.5
    for bad in ({"batchnorm": "sometimes"}, {"loss": "hinge"}, {"stop": "whenever"}, {"mode": "sideways"},
                {"bound": -1.0}, {"stall_epochs": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UnlearnConfig(**bad)


def test_presets_name_the_unguarded_and_guarded_loops():
    plain, guarded = UnlearnConfig.plain_ascent(), UnlearnConfig.guarded()
    assert (plain.mode, plain.batchnorm, plain.loss, plain.bound, plain.stop, plain.stall_epochs) == (
        "unlearn", "train", "ce", None, "never", 0)
    assert (guarded.mode, guarded.batchnorm, guarded.loss, guarded.stop, guarded.stall_epochs) == (
        "alternate", "running", "margin", "unlearned", 2)
    assert "all" not in describe(plain) and "the last epoch" in describe(plain)
    assert "no suspected image keeps its label" in describe(guarded)


# ---------------------------------------------------------------------------- the ascent pass


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm,changes", [("running", False), ("train", True)])
def test_ascent_with_running_statistics_leaves_batchnorm_buffers_unchanged(backdoor, batchnorm, changes):
    """With running statistics the triggered batches are normalised as at test time and do
    not overwrite the statistics the clean data produced; train mode updates them."""
    poisoned, _, _, model = backdoor
    suspected, _ = _sets(poisoned)
    before = _bn_buffers(model)
    after = _bn_buffers(_run(model, suspected, UnlearnConfig(epochs=1, batch_size=32, batchnorm=batchnorm,
                                                             loss="margin")))
    assert before and any(not torch.equal(a, b) for a, b in zip(before, after)) == changes


@pytest.mark.parametrize("loss,bound", [("margin", None), ("complement", 1.0), ("complement", None)])
def test_running_statistics_ascent_raises_the_suspected_loss_without_diverging(backdoor, loss, bound):
    """The case the issue measured: BatchNorm on running statistics, saturated suspected
    images, a high lr with momentum. The margin and complement losses raise their loss (eval
    mode) and stay finite (-CE does not move them: the next test)."""
    poisoned, _, _, model = backdoor
    suspected, _ = _sets(poisoned)
    before = _loss(model, suspected)
    cfg = UnlearnConfig(epochs=6, batch_size=32, batchnorm="running", loss=loss, bound=bound,
                        optim=OptimConfig(lr=0.05, momentum=0.9, nesterov=False, schedule="constant"))
    after_model = _run(model, suspected, cfg)
    after = _loss(after_model, suspected)
    assert math.isfinite(after) and after > before + 0.2
    assert all(torch.isfinite(p).all() for p in after_model.parameters())


def test_unbounded_ce_ascent_with_running_statistics_gives_the_saturated_set_no_push(backdoor):
    """-CE on saturated samples: its gradient ~ 1 - p_y is tiny, so a step of the same size
    as above leaves them fitted; the margin loss unlearns them (why quick uses it)."""
    poisoned, _, _, model = backdoor
    suspected, _ = _sets(poisoned)
    optim = OptimConfig(lr=0.05, momentum=0.9, nesterov=False, schedule="constant")
    ce = _run(model, suspected, UnlearnConfig(epochs=1, batch_size=32, batchnorm="running", loss="ce", optim=optim))
    margin = _run(model, suspected, UnlearnConfig(epochs=1, batch_size=32, batchnorm="running", loss="margin",
                                                  optim=optim))
    assert _accuracy(ce, suspected) > 0.9
    assert _accuracy(margin, suspected) < _accuracy(ce, suspected)


# ---------------------------------------------------------------------------- the alternating loop


def test_alternating_epoch_runs_both_passes_on_one_optimiser(backdoor, fitted_engines):
    poisoned, _, _, model = backdoor
    data = poisoned.untrusted()
    suspected, trusted = data.subset(poisoned.is_poison), data.subset(~poisoned.is_poison)
    _run(model, suspected, UnlearnConfig(epochs=1, batch_size=64, mode="alternate", loss="margin"), trusted)
    (engine,) = fitted_engines
    assert {"unlearn_ce", "relearn_loss"} <= set(engine.history[0])
    # one optimiser, one step per batch of both passes: 51 suspected (1 batch) + 461 trusted (8)
    assert engine.step_count == 1 + 8 == engine.steps_per_epoch


@pytest.mark.slow
@pytest.mark.parametrize("loss,lr,stall", [("margin", 2e-4, 0), ("complement", 1e-3, 2)])
def test_guarded_loop_removes_the_toy_backdoor_and_keeps_clean_accuracy(backdoor, loss, lr, stall):
    poisoned, attack, test, model = backdoor
    suspected, trusted = _sets(poisoned)
    before = backdoor_metrics(model, test, attack, CPU)
    assert before["asr"] > 0.9
    cfg = UnlearnConfig.guarded(epochs=10, batch_size=32, loss=loss, bound=1.0, stall_epochs=stall,
                                optim=OptimConfig(lr=lr, momentum=0.9, nesterov=False, schedule="constant"))
    after = [backdoor_metrics(_run(model, suspected, cfg, trusted, seed=seed), test, attack, CPU) for seed in TOY_SEEDS[:3]]
    # the outcome depends on the CPU's kernels: margin's CA was above 0.85 on the hosts CI ran
    # on and 0.81-0.82 for every seed on an AVX512-BF16 Xeon; chance is 0.25, the backdoored
    # model ~1.0. The claim: the median of three seeds keeps most of the clean accuracy.
    assert median(a["asr"] for a in after) < 0.1, after
    assert median(a["clean_acc"] for a in after) > 0.75, after


def test_modes_that_relearn_need_a_trusted_set(backdoor):
    poisoned, _, _, model = backdoor
    suspected, _ = _sets(poisoned)
    with pytest.raises(ValueError, match="trusted"):
        _run(model, suspected, UnlearnConfig(mode="alternate"))


# ---------------------------------------------------------------------------- stop rules


def test_stop_reason_tells_chance_unlearned_stalled_and_eroding():
    cfg = UnlearnConfig.guarded()            # unlearned, stall_epochs 2, stall_delta 0.01

    def reason(suspected, trusted, before=0.8, config=cfg):
        return stop_reason(suspected, trusted, before, config, 10)
    # a backdoor the split holds: one epoch of no change is not a stall, the next unlearns it
    assert reason([1.0, 1.0], [0.8]) is None
    assert reason([1.0, 1.0, 0.0], [0.8, 0.8]) == "unlearned"
    # unlearned but the trusted set not yet refitted: go on, even with no change
    assert reason([1.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7]) is None
    # at chance is not unlearned (a 10 % suspected set left ~10 % ASR) ...
    assert reason([1.0, 0.3, 0.1], [0.8, 0.8]) is None
    # ... but it is DLP's "chance" rule; without a trusted set nothing waits for it
    assert reason([1.0, 0.3, 0.1], [0.8, 0.8], config=replace(cfg, stop="chance")) == "chance"
    assert stop_reason([1.0, 0.1], [], None, replace(cfg, stop="chance"), 10) == "chance"
    # clean images the split suspected (clean data): relearning holds them up
    assert reason([0.95, 0.938, 0.936], [0.79, 0.79]) is None     # 0.014 in 2 epochs
    assert reason([0.95, 0.938, 0.936, 0.934], [0.79, 0.79, 0.79]) == "stalled"
    # ... or a stronger ascent unlearns them and the trusted set goes with them
    assert reason([0.95, 0.936, 0.916, 0.878], [0.789, 0.783, 0.77]) == "eroding"
    # the first epoch's ascent costs trusted accuracy that relearning then gives back
    assert reason([0.99, 0.40, 0.09, 0.08], [0.67, 0.74, 0.77]) is None
    assert reason([0.99, 0.78, 0.25, 0.14, 0.126, 0.135], [0.68, 0.75, 0.78, 0.83, 0.85]) == "stalled"
    # at chance with the trusted set still being refitted: relearning is not done, no stall
    assert reason([1.0, 0.01, 0.062, 0.03], [0.22, 0.30, 0.33], before=0.4) is None
    assert reason([1.0, 0.01, 0.062, 0.03, 0.03, 0.03], [0.22, 0.30, 0.33, 0.335, 0.336], before=0.4) == "stalled"
    off = replace(cfg, stall_epochs=0)
    assert reason([0.95, 0.938, 0.936, 0.934], [0.79, 0.79, 0.70], config=off) is None
    assert reason([1.0, 0.0], [0.8], config=replace(cfg, stop="never")) is None


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["unlearned", "never"])
def test_loop_ends_once_no_suspected_image_keeps_its_label(backdoor, fitted_engines, stop):
    poisoned, _, _, model = backdoor
    suspected, trusted = _sets(poisoned)
    cfg = UnlearnConfig.guarded(epochs=20, batch_size=32, loss="complement", bound=1.0, stop=stop, stall_epochs=0,
                                optim=OptimConfig(lr=1e-3, momentum=0.9, nesterov=False, schedule="constant"))
    _run(model, suspected, cfg, trusted)
    history = fitted_engines[0].history
    if stop == "never":
        assert len(history) == cfg.epochs and "suspected_acc" not in history[-1]
        return
    trusted_before = _accuracy(model, trusted)

    def done(h):
        return h["suspected_acc"] == 0 and h["trusted_acc"] >= trusted_before - 0.01
    assert len(history) < cfg.epochs and done(history[-1]) and history[-1]["stop_reason"] == "unlearned"
    assert not any(done(h) for h in history[:-1])


def test_chance_rule_stops_the_plain_ascent_once_the_set_is_at_chance(backdoor, fitted_engines):
    poisoned, _, _, model = backdoor
    suspected, _ = _sets(poisoned)
    cfg = UnlearnConfig(epochs=20, batch_size=32, stop="chance",
                        optim=OptimConfig(lr=0.05, momentum=0.9, nesterov=False, schedule="constant"))
    after = _run(model, suspected, cfg)
    history = fitted_engines[0].history
    assert len(history) < cfg.epochs and history[-1]["stop_reason"] == "chance"
    assert _accuracy(after, suspected) <= 0.25 and all(h["suspected_acc"] > 0.25 for h in history[:-1])


def test_a_set_already_unlearned_takes_no_step(backdoor):
    poisoned, _, _, model = backdoor
    suspected, _ = _sets(poisoned)
    wrong = suspected.with_labels((predict(model, suspected.images, CPU).argmax(1) + 1) % 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = _run(model, wrong, UnlearnConfig(stop="unlearned"))
    assert all(torch.equal(before[k], v) for k, v in after.state_dict().items())


@pytest.mark.slow
def test_loop_ends_when_unlearning_stalls_on_clean_suspects(backdoor, fitted_engines):
    """Clean images as the suspected set (what a detector flags on clean data): relearning
    holds them up; the loop ends at the first epoch where a stall or erosion shows, never
    before, and the engine's history (kept in its checkpoint) gives the same decision."""
    poisoned, _, _, model = backdoor
    data = poisoned.untrusted()
    clean = torch.nonzero(~poisoned.is_poison).flatten()
    suspected, trusted = data.subset(clean[:25]), data.subset(clean[25:])
    cfg = UnlearnConfig.guarded(epochs=12, batch_size=32, loss="complement", bound=1.0, stop="never",
                                stall_delta=0.05,
                                optim=OptimConfig(lr=1e-3, momentum=0.9, nesterov=False, schedule="constant"))
    before = _accuracy(model, suspected)
    _run(model, suspected, cfg, trusted)
    history = fitted_engines[0].history
    accs = [before] + [h["suspected_acc"] for h in history]
    trusted_accs = [h["trusted_acc"] for h in history]
    reasons = [stop_reason(accs[:i + 1], trusted_accs[:i], 1.0, cfg, 4) for i in range(1, len(accs))]
    assert len(history) < cfg.epochs and history[-1]["stop_reason"] in ("stalled", "eroding")
    assert reasons[-1] == history[-1]["stop_reason"] and not any(reasons[:-1])
