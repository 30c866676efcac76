"""FT, FP, NAD, ANP, MCR: each lowers the ASR of a backdoored toy model using only a clean
reference drawn from unpoisoned images, and refuses a reference too small or missing a class."""

import inspect
from statistics import median

import pytest
import torch

from conftest import data_root, requires_cifar
from toy_backdoor import TOY_SEEDS, tiny_backdoor, train_toy_backdoored
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.ft import FT
from unpoison.defenses.posttraining import CleanReferenceError, check_clean_reference
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime, generator

CPU = Runtime.create("cpu", "fp32")
METHODS = ["ft", "fp", "nad", "anp", "mcr"]


@pytest.fixture(scope="module")
def backdoor():
    poisoned, attack, test = tiny_backdoor()
    model = train_toy_backdoored(poisoned)
    clean = poisoned.clean_reference(0.25, generator(0, "clean-reference"))
    return poisoned, attack, test, model, clean


def _ctx(tmp_path, clean=None, seed: int = 0) -> DefenseContext:
    ctx = DefenseContext(CPU, "smoke", seed, "wrn16-1", tmp_path, progress=False)
    ctx.clean_reference = clean
    return ctx


@pytest.mark.slow
def test_clean_reference_holds_only_unpoisoned_images_with_their_true_labels(backdoor):
    poisoned, *_, clean = backdoor
    assert len(clean) == round(0.25 * len(poisoned.is_poison))
    # every image of the reference is an unpoisoned training image, labelled as it was
    clean_index = (~poisoned.is_poison).nonzero().flatten()
    flat = poisoned.train.images[clean_index].flatten(1)
    for image, label in zip(clean.images, clean.labels):
        match = (flat == image.flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(poisoned.original_labels[clean_index[match[0]]]) == int(label)


@pytest.mark.slow
# known defect (issue 19): ANP and MCR leave the toy backdoor in place (as ANP on Blended and
# MCR on BadNets do on CIFAR-10, benchmarks/RESULTS.md)
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.xfail(reason=f"{m} keeps the toy backdoor", strict=False))
                                  if m in ("anp", "mcr") else m for m in METHODS])
def test_repair_lowers_asr_from_the_clean_reference_alone(backdoor, tmp_path, name):
    poisoned, attack, test, model, clean = backdoor
    before = backdoor_metrics(model, test, attack, CPU)
    assert before["asr"] > 0.9
    defense = build_defense(name, "smoke")
    # by construction: repair() takes the model, the clean reference and the context, nothing else
    assert list(inspect.signature(defense.repair).parameters) == ["model", "clean", "ctx", "timer"]
    # One 3-epoch repair on 128 toy images lands anywhere in ASR 0.3-0.9 depending on the seed and
    # on the CPU's kernels (AVX2 and AVX-512 round differently), so the claim is the median's.
    after = [backdoor_metrics(defense.repair(model, clean, _ctx(tmp_path / str(seed), clean, seed)).model,
                              test, attack, CPU) for seed in TOY_SEEDS]
    asr, clean_acc = median(a["asr"] for a in after), median(a["clean_acc"] for a in after)
    assert asr < before["asr"] - 0.25, (name, before, after)
    assert clean_acc > 0.5, (name, after)
    # the input model is left as it was
    assert backdoor_metrics(model, test, attack, CPU)["asr"] == before["asr"]


@pytest.mark.slow
def test_fit_hands_the_method_the_clean_reference_and_never_the_untrusted_set(backdoor, tmp_path, monkeypatch):
    poisoned, _, _, model, clean = backdoor
    seen = {}

    def record(self, m, c, ctx, timer=None):
        seen["clean"] = c
        from unpoison.defenses.base import DefenseResult
        return DefenseResult(m)

    monkeypatch.setattr(FT, "repair", record)
    monkeypatch.setattr("unpoison.defenses.posttraining.train_standard", lambda data, ctx, cfg: model)
    build_defense("ft", "smoke").fit(poisoned.untrusted(), _ctx(tmp_path, clean))
    assert seen["clean"] is clean


@pytest.mark.slow
def test_a_missing_small_or_incomplete_clean_reference_is_a_clear_error(backdoor, tmp_path):
    poisoned, *_, clean = backdoor
    data = poisoned.untrusted()
    with pytest.raises(CleanReferenceError, match="--clean"):
        build_defense("nad", "smoke").fit(data, _ctx(tmp_path, None))
    with pytest.raises(CleanReferenceError, match="at least 20 images"):
        build_defense("ft", "smoke").fit(data, _ctx(tmp_path, clean.subset(torch.arange(10))))
    without_class_1 = clean.subset(clean.labels != 1)
    with pytest.raises(CleanReferenceError, match="'class1'"):
        check_clean_reference(without_class_1, 4, 20, "FT")


@requires_cifar
def test_run_draws_the_clean_reference_for_a_repair_baseline_only(tmp_path):
    from unpoison.run import RunConfig, run

    base = dict(profile="smoke", attack="badnets", data_root=str(data_root()), device="cpu", progress=False,
                share_models=False, report=False)
    metrics = run(RunConfig(out=str(tmp_path / "ft"), defense="ft", clean_fraction=0.2, **base))
    assert metrics["n_clean_reference"] == round(0.2 * metrics["n_train"])
    assert [s["name"] for s in metrics["stages"]] == ["train", "finetune"]
    assert "n_clean_reference" not in run(RunConfig(out=str(tmp_path / "none"), **base))


@pytest.mark.slow
def test_repair_command_with_a_baseline_reads_the_clean_folder_only(tmp_path):
    import json

    from userdata import CLASSES, SMOKE, make_folder, unpoison

    data = make_folder(tmp_path / "data", per_class=12, poison=2)
    backdoored = tmp_path / "backdoored"
    assert unpoison("train", "--data", data, "--out", backdoored, "--defense", "none", *SMOKE) == 0
    out = tmp_path / "repaired"
    # no --clean: a clear error, exit code 2
    assert unpoison("repair", "--model", backdoored / "model.pt", "--data", data, "--out", out,
                    "--method", "ft", *SMOKE) == 2
    clean = make_folder(tmp_path / "clean", per_class=8, seed=1)
    assert unpoison("repair", "--model", backdoored / "model.pt", "--data", data, "--out", out,
                    "--method", "ft", "--clean", clean, *SMOKE) == 0
    record = json.loads((out / "repair.json").read_text())
    assert record["defense"] == "ft" and record["defense_config"]["name"] == "ft"
    assert record["clean"] == str(clean) and any("fine-tuned" in n for n in record["notes"])
    # a clean folder missing a class is refused before any training
    partial = make_folder(tmp_path / "partial", per_class=8, classes=CLASSES[:2], seed=2)
    assert unpoison("repair", "--model", backdoored / "model.pt", "--data", data, "--out", tmp_path / "r2",
                    "--method", "ft", "--clean", partial, *SMOKE) == 2
