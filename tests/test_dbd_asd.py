"""DBD and ASD on the tiny generated backdoor: the split ranks poisoned above clean, and the
trained model's ASR stays far below the ~1 of a model trained on the same data as if clean."""

from statistics import median

import pytest

from toy_backdoor import TOY_SEEDS, tiny_backdoor
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
    runs = []
    for seed in TOY_SEEDS:
        ctx = DefenseContext(CPU, "smoke", seed, "wrn16-1", tmp_path / str(seed), progress=False)
        if build_defense(name, "smoke").needs_clean_reference:   # ASD's clean seed
            ctx.clean_reference = poisoned.clean_reference(0.2, generator(0, "clean-reference"))
        result = build_defense(name, "smoke").fit(poisoned.untrusted(), ctx)
        assert result.trusted is not None and not (result.trusted & result.flagged).any()
        runs.append({**detection_metrics(result.suspicion, poisoned.is_poison, result.flagged),
                     **backdoor_metrics(result.model, test, attack, CPU)})
    # a 4-epoch run on 512 toy images swings with the seed and the CPU's kernels (one seed gave
    # AUROC 0.67 on an AVX2 host and 0.81-1.0 here), so the claim is the median's
    assert median(r["auroc"] for r in runs) > 0.8, runs
    assert median(r["asr"] for r in runs) < 0.6 and median(r["clean_acc"] for r in runs) > 0.4, runs


def test_symmetric_ce_is_ce_plus_a_bounded_reverse_term():
    import torch

    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([0, 0])
    loss = symmetric_ce(logits, labels, 0.1, 1.0, reduction="none")
    assert loss[0] < 0.01 and 9.0 < loss[1] < 10.3   # the reverse term saturates at -log(1e-4) = 9.2
