import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toy_backdoor import tiny_backdoor, train_toy_backdoored
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.dbr import DBRConfig, repair, stop_reason, unlearn_relearn, unlearning_loss
from unpoison.detect.fct import SampleSplit, SDConfig
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime
from unpoison.train import Engine, OptimConfig, predict

CPU = Runtime.create("cpu", "fp32")


@pytest.fixture(scope="module")
def backdoor():
    """The tiny backdoor of toy_backdoor.py and a model trained on it without augmentation
    (it learns the backdoor: ASR ~ 1)."""
    poisoned, attack, test = tiny_backdoor()
    return poisoned, attack, test, train_toy_backdoored(poisoned)


@pytest.fixture
def fitted_engines(monkeypatch) -> list:
    """Every Engine that runs `fit` during the test, in order (to read its history)."""
    engines = []
    original = Engine.fit
    monkeypatch.setattr(Engine, "fit", lambda self, fn: engines.append(self) or original(self, fn))
    return engines


def _ctx(tmp_path: Path) -> DefenseContext:
    return DefenseContext(CPU, "smoke", 0, "wrn16-1", tmp_path, progress=False)


def _loss(model, data) -> float:
    return float(F.cross_entropy(predict(model, data.images, CPU), data.labels))


def _split(n: int, poisoned: torch.Tensor, clean: torch.Tensor) -> SampleSplit:
    return SampleSplit(torch.zeros(n), clean, poisoned)


# ours (running BN statistics, complement loss, clipped at chance) and the official loop
@pytest.mark.parametrize("ascent_bn,bound,loss,epochs", [("running", "chance", "complement", 10),
                                                         ("running", "none", "margin", 10), ("batch", "none", "ce", 1)])
def test_unlearning_pass_raises_the_suspected_set_loss(backdoor, tmp_path, ascent_bn, bound, loss, epochs):
    poisoned, _, _, model = backdoor
    data = poisoned.untrusted()
    suspected = poisoned.is_poison
    trusted = ~poisoned.is_poison & (torch.arange(len(data)) % 4 == 0)
    cfg = DBRConfig(epochs=epochs, batch_size=32, mode="unlearn", augment="none", ascent_bn=ascent_bn, unlearn_bound=bound,
                    unlearn_loss=loss,
                    optim=OptimConfig(lr=0.05, momentum=0.9, nesterov=False, schedule="constant"))
    before = _loss(model, data.subset(suspected))
    after_model = unlearn_relearn(copy.deepcopy(model).requires_grad_(True), data, _split(len(data), suspected, trusted),
                                  _ctx(tmp_path), cfg)
    # measured in eval mode, as the model is used
    assert _loss(after_model, data.subset(suspected)) > before + 0.2
    # relearning alone lowers (or keeps) the trusted loss
    cfg_relearn = DBRConfig(epochs=1, batch_size=32, mode="relearn", augment="none", optim=cfg.optim)
    relearned = unlearn_relearn(copy.deepcopy(after_model).requires_grad_(True), data, _split(len(data), suspected, trusted),
                                _ctx(tmp_path / "r"), cfg_relearn)
    assert _loss(relearned, data.subset(trusted)) < _loss(after_model, data.subset(trusted))


def test_alternating_epoch_runs_both_passes_on_one_optimiser(backdoor, tmp_path, monkeypatch):
    poisoned, _, _, model = backdoor
    engines = []
    original = Engine.fit

    def spy(self, epoch_fn):
        engines.append(self)
        return original(self, epoch_fn)

    monkeypatch.setattr(Engine, "fit", spy)
    split = _split(len(poisoned.is_poison), poisoned.is_poison, ~poisoned.is_poison)
    unlearn_relearn(copy.deepcopy(model).requires_grad_(True), poisoned.untrusted(), split, _ctx(tmp_path),
                    DBRConfig(epochs=1, batch_size=64))
    (engine,) = engines
    assert {"unlearn_loss", "relearn_loss"} <= set(engine.history[0])
    # one optimiser, one step per batch of both passes: 51 suspected (1 batch) + 461 trusted (8)
    assert engine.step_count == 1 + 8 == engine.steps_per_epoch


def test_br_with_a_precise_split_removes_the_backdoor_and_keeps_clean_accuracy(backdoor, tmp_path):
    poisoned, attack, test, model = backdoor
    before = backdoor_metrics(model, test, attack, CPU)
    assert before["asr"] > 0.9
    n = len(poisoned.is_poison)
    suspected = torch.zeros(n, dtype=torch.bool)
    suspected[torch.nonzero(poisoned.is_poison).flatten()[:25]] = True     # 5 %, all poison
    trusted = ~poisoned.is_poison & (torch.arange(n) % 5 == 0)            # ~20 %, all clean
    # the toy model was trained without augmentation (a flip moves the grid to the other
    # corner, which it never saw), so D-BR's passes run without it too
    config = replace(DBRConfig.for_profile("smoke"), augment="none")
    repaired = unlearn_relearn(copy.deepcopy(model).requires_grad_(True), poisoned.untrusted(),
                               _split(n, suspected, trusted), _ctx(tmp_path), config)
    after = backdoor_metrics(repaired, test, attack, CPU)
    assert after["asr"] < 0.1
    assert after["clean_acc"] > 0.9


def test_repair_runs_sd_then_br_and_leaves_the_input_model_untouched(backdoor, tmp_path):
    """End to end on the toy set: the pipeline, the split's precision and that the input is
    not modified (the test above checks BR's effect)."""
    poisoned, attack, test, model = backdoor
    before = backdoor_metrics(model, test, attack, CPU)
    config = replace(DBRConfig.for_profile("smoke"), augment="none")
    result = repair(model, poisoned.untrusted(), _ctx(tmp_path), config)
    assert backdoor_metrics(model, test, attack, CPU)["asr"] == before["asr"]
    assert result.suspicion.shape == (512,) and int(result.flagged.sum()) == int(0.05 * 512)
    precision = float((result.flagged & poisoned.is_poison).sum()) / int(result.flagged.sum())
    assert precision >= 0.8
    assert [s["name"] for s in result.stages] == ["sd_model", "fct", "unlearn_relearn"]
    assert result.model is not model


def test_modes_are_validated():
    with pytest.raises(ValueError, match="mode"):
        build_defense("dbr", "smoke", mode="sideways")
    assert build_defense("dbr", "smoke", mode="unlearn").config.mode == "unlearn"
    with pytest.raises(ValueError, match="ascent_bn"):
        build_defense("dbr", "smoke", ascent_bn="sometimes")
    with pytest.raises(ValueError, match="unlearn_bound"):
        build_defense("dbr", "smoke", unlearn_bound="lots")
    with pytest.raises(ValueError, match="unlearn_loss"):
        build_defense("dbr", "smoke", unlearn_loss="hinge")
    assert build_defense("dbr", "smoke", unlearn_bound="1.5").config.bound(10) == 1.5
    official = DBRConfig.official()
    assert (official.ascent_bn, official.bound(10), official.unlearn_loss) == ("batch", None, "ce")
    assert DBRConfig().bound(10) == pytest.approx(math.log(10))


def test_complement_loss_keeps_a_gradient_where_ce_ascent_vanishes():
    """On a sample fitted with p_y ~ 1, -CE has a gradient ~ 1 - p_y (nothing to push); the
    complement loss -log(1 - p_y) still pushes the label's logit down at O(1)."""
    logits = torch.tensor([[12.0, 0.0, 0.0]], requires_grad=True)
    label = torch.tensor([0])
    grads = {}
    for kind in ("ce", "complement"):
        logits.grad = None
        unlearning_loss(logits, label, kind, bound=None).backward()
        grads[kind] = logits.grad[0, 0].item()
    assert 0 < grads["ce"] < 1e-4          # minimising -CE lowers the logit, but barely
    assert grads["complement"] > 0.5


@pytest.mark.parametrize("kind", ["ce", "complement"])
def test_samples_past_the_bound_give_no_gradient(kind):
    logits = torch.tensor([[5.0, 0.0], [-5.0, 0.0]], requires_grad=True)   # fitted, unfitted
    unlearning_loss(logits, torch.tensor([0, 0]), kind, bound=math.log(2)).backward()
    assert logits.grad[0].abs().sum() > 0
    assert logits.grad[1].abs().sum() == 0


def test_repair_with_the_expand_scorer_and_a_per_class_trusted_set(backdoor, tmp_path):
    poisoned, attack, test, model = backdoor
    config = replace(DBRConfig.for_profile("smoke"), augment="none",
                     sd=replace(SDConfig.for_profile("smoke"), scorer="expand", clean_per_class=True))
    result = repair(model, poisoned.untrusted(), _ctx(tmp_path), config)
    assert [s["name"] for s in result.stages] == ["SL", "unlearn_relearn"]
    precision = float((result.flagged & poisoned.is_poison).sum()) / int(result.flagged.sum())
    assert precision >= 0.8
    labels = poisoned.train.labels
    for y in labels.unique():   # the trusted set holds alpha_c of every class
        assert int((result.trusted & (labels == y)).sum()) == int(0.2 * int((labels == y).sum()))
    with pytest.raises(ValueError, match="scorer"):
        SDConfig(scorer="psychic")


@pytest.mark.parametrize("ascent_bn,changes", [("running", False), ("batch", True)])
def test_ascent_pass_with_running_statistics_leaves_them_untouched(backdoor, tmp_path, ascent_bn, changes):
    """With running statistics the triggered batches are normalised as at test time and do
    not overwrite the statistics the clean data produced; the official loop updates them."""
    poisoned, _, _, model = backdoor
    n = len(poisoned.is_poison)
    split = _split(n, poisoned.is_poison, ~poisoned.is_poison)
    config = replace(DBRConfig.for_profile("smoke"), epochs=1, mode="unlearn", augment="none", ascent_bn=ascent_bn)
    before = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    after_model = unlearn_relearn(copy.deepcopy(model).requires_grad_(True), poisoned.untrusted(), split,
                                  _ctx(tmp_path), config)
    after = [m.running_mean for m in after_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert before and any(not torch.equal(a, b) for a, b in zip(before, after)) == changes


@pytest.mark.parametrize("stop", [True, False])
def test_loop_ends_once_the_suspected_set_is_unlearned(backdoor, tmp_path, fitted_engines, stop):
    poisoned, _, _, model = backdoor
    n = len(poisoned.is_poison)
    suspected = torch.zeros(n, dtype=torch.bool)
    suspected[torch.nonzero(poisoned.is_poison).flatten()[:25]] = True
    trusted = ~poisoned.is_poison & (torch.arange(n) % 5 == 0)
    config = replace(DBRConfig.for_profile("smoke"), augment="none", stop_when_unlearned=stop, stall_epochs=0,
                     epochs=20)
    unlearn_relearn(copy.deepcopy(model).requires_grad_(True), poisoned.untrusted(), _split(n, suspected, trusted),
                    _ctx(tmp_path), config)
    history = fitted_engines[0].history
    if stop:   # ends at the first epoch where no suspected image keeps its label, the trusted set refitted
        trusted_before = float((predict(model, poisoned.untrusted().subset(trusted).images, CPU).argmax(1)
                                == poisoned.untrusted().subset(trusted).labels).float().mean())

        def done(h):
            return h["suspected_acc"] == 0 and h["trusted_acc"] >= trusted_before - 0.01
        assert len(history) < config.epochs and done(history[-1])
        assert not any(done(h) for h in history[:-1])
    else:
        assert len(history) == config.epochs and "suspected_acc" not in history[-1]


def test_stop_reason_tells_unlearned_from_stalled_and_eroding():
    cfg = DBRConfig.for_profile("quick")            # stall_epochs 2, stall_delta 0.01

    def reason(suspected, trusted, before=0.8, config=cfg):
        return stop_reason(suspected, trusted, before, config)
    # a backdoor the split holds: one epoch of no change is not a stall, the next unlearns it
    assert reason([1.0, 1.0], [0.8]) is None
    assert reason([1.0, 1.0, 0.0], [0.8, 0.8]) == "unlearned"
    # unlearned but the trusted set not yet refitted: go on, even with no change
    assert reason([1.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7]) is None
    # at chance is not unlearned: a 10 % suspected set left ~10 % ASR
    assert reason([1.0, 0.3, 0.1], [0.8, 0.8]) is None
    # clean images the split suspected (clean data): relearning holds them up
    assert reason([0.95, 0.938, 0.936], [0.79, 0.79]) is None     # 0.014 in 2 epochs
    assert reason([0.95, 0.938, 0.936, 0.934], [0.79, 0.79, 0.79]) == "stalled"
    # ... or a stronger ascent unlearns them and the trusted set goes with them
    assert reason([0.95, 0.936, 0.916, 0.878], [0.789, 0.783, 0.77]) == "eroding"
    # the first epoch's ascent costs trusted accuracy that relearning then gives back
    assert reason([0.99, 0.40, 0.09, 0.08], [0.67, 0.74, 0.77]) is None
    # still falling fast enough, then a residue the loop cannot push down
    assert reason([0.99, 0.78, 0.25, 0.14, 0.126], [0.68, 0.75, 0.78, 0.83]) is None
    assert reason([0.99, 0.78, 0.25, 0.14, 0.126, 0.135], [0.68, 0.75, 0.78, 0.83, 0.85]) == "stalled"
    off = replace(cfg, stall_epochs=0)
    assert reason([0.95, 0.938, 0.936, 0.934], [0.79, 0.79, 0.70], config=off) is None
    assert reason([1.0, 0.0], [0.8], config=replace(cfg, stop_when_unlearned=False)) is None


@pytest.mark.parametrize("stall_epochs", [2, 0])
def test_loop_ends_when_unlearning_stalls_on_clean_suspects(backdoor, tmp_path, fitted_engines, stall_epochs):
    """Clean images as the suspected set (what SD flags on clean data): the loop ends at the
    first epoch where the suspected set's accuracy fell < stall_delta, or the trusted set's
    > stall_delta, over stall_epochs epochs; never before."""
    poisoned, _, _, model = backdoor
    n = len(poisoned.is_poison)
    clean = torch.nonzero(~poisoned.is_poison).flatten()
    suspected = torch.zeros(n, dtype=torch.bool)
    suspected[clean[:25]] = True
    trusted = torch.zeros(n, dtype=torch.bool)
    trusted[clean[25:]] = True      # every other clean image: relearning refits the suspects
    config = replace(DBRConfig.for_profile("smoke"), augment="none", stall_epochs=stall_epochs, stall_delta=0.05,
                     stop_when_unlearned=False, epochs=12)
    data = poisoned.untrusted()
    before = float((predict(model, data.subset(suspected).images, CPU).argmax(1)
                    == data.subset(suspected).labels).float().mean())
    unlearn_relearn(copy.deepcopy(model).requires_grad_(True), data, _split(n, suspected, trusted),
                    _ctx(tmp_path), config)
    if not stall_epochs:
        assert len(fitted_engines[0].history) == config.epochs
        return
    accs = [before] + [h["suspected_acc"] for h in fitted_engines[0].history]
    trusted = [h["trusted_acc"] for h in fitted_engines[0].history]
    reasons = [stop_reason(accs[:i + 1], trusted[:i], 1.0, config) for i in range(1, len(accs))]
    assert len(accs) - 1 < config.epochs and fitted_engines[0].history[-1]["stop_reason"] in ("stalled", "eroding")
    assert reasons[-1] == fitted_engines[0].history[-1]["stop_reason"] and not any(reasons[:-1])
