"""DBD and ASD on the tiny generated backdoor: the split ranks poisoned above clean, and the
trained model's ASR stays far below the ~1 of a model trained on the same data as if clean."""

import pytest

from toy_backdoor import tiny_backdoor
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.dbd import symmetric_ce
from unpoison.metrics import backdoor_metrics, detection_metrics
from unpoison.runtime import Runtime, generator

CPU = Runtime.create("cpu", "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dbd", "asd"])
def test_training_time_baseline_resists_the_toy_backdoor(tmp_path, name):
    poisoned, attack, test = tiny_backdoor()
    ctx = DefenseContext(CPU, "smoke", 0, "wrn16-1", tmp_path, progress=False)
    if build_defense(name, "smoke").needs_clean_reference:   # ASD's clean seed
        ctx.clean_reference = poisoned.clean_reference(0.2, generator(0, "clean-reference"))
    result = build_defense(name, "smoke").fit(poisoned.untrusted(), ctx)
    detection = detection_metrics(result.suspicion, poisoned.is_poison, result.flagged)
    assert detection["auroc"] > 0.8, detection
    metrics = backdoor_metrics(result.model, test, attack, CPU)
    assert metrics["asr"] < 0.6 and metrics["clean_acc"] > 0.4, metrics
    assert result.trusted is not None and not (result.trusted & result.flagged).any()


def test_symmetric_ce_is_ce_plus_a_bounded_reverse_term():
    import torch

    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([0, 0])
    loss = symmetric_ce(logits, labels, 0.1, 1.0, reduction="none")
    assert loss[0] < 0.01 and 9.0 < loss[1] < 10.3   # the reverse term saturates at -log(1e-4) = 9.2
