import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import toy_dataset
from toyroot import write_toy_cifar
from unpoison.report import write_report
from unpoison.report.arrays import SCORES_FILE, TRIGGER_FILE, load_arrays, save_trigger_examples

SECTIONS = ("summary", "trigger", "curves", "subsets", "scores", "stages", "config")


class LossScoringDefense:
    """Test double: the no-defence model, plus per-sample suspicion = minus its training loss
    (poisoned samples are fitted first), so the run records detection scores."""

    @staticmethod
    def wrap(base):
        fit = base.fit

        def fit_and_score(data, ctx):
            from unpoison.train.supervised import predict

            result = fit(data, ctx)
            loss = F.cross_entropy(predict(result.model, data.images, ctx.runtime), data.labels, reduction="none")
            result.suspicion = -loss
            result.flagged = result.suspicion >= result.suspicion.quantile(0.9)
            return result

        base.fit = fit_and_score
        return base


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_cifar(tmp_path_factory.mktemp("toy-data"))


@pytest.fixture(scope="module")
def stored_run(toy_root, tmp_path_factory) -> Path:
    """One smoke run on toy data with per-epoch monitoring and detection scores, kept for the module."""
    import unpoison.run as run_module
    from unpoison.defenses import build_defense

    out = tmp_path_factory.mktemp("runs") / "badnets-scoring"
    patch = pytest.MonkeyPatch()
    patch.setattr(run_module, "build_defense",
                  lambda name, profile, network=None, **kw:
                  LossScoringDefense.wrap(build_defense(name, profile, network, **kw)))
    try:
        run_module.run(run_module.RunConfig(profile="smoke", attack="badnets", out=str(out), data_root=str(toy_root),
                                            device="cpu", precision="fp32", progress=False, monitor="epochs",
                                            defense_params={"train.epochs": 3}, share_models=False))
    finally:
        patch.undo()
    return out


def embedded_images(page: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page):
        images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def section(page: str, name: str) -> str:
    match = re.search(rf"<section id='{name}'>(.*?)</section>", page, re.S)
    assert match, f"section {name} missing"
    return match.group(1)


@pytest.mark.slow
def test_run_saves_what_the_report_draws(stored_run):
    metrics = json.loads((stored_run / "metrics.json").read_text())
    scores = load_arrays(stored_run / SCORES_FILE)
    assert scores["scores"].shape == scores["is_poison"].shape == (metrics["n_train"],)
    assert int(scores["is_poison"].sum()) == metrics["n_poisoned"]
    assert scores["flagged"].dtype == bool
    trigger = load_arrays(stored_run / TRIGGER_FILE)
    assert trigger["train_clean"].shape == trigger["train_poisoned"].shape == (4, 3, 32, 32)
    assert (trigger["test_target"] == 0).all() and (trigger["test_label"] != 0).all()
    assert len(metrics["curves"]) == 3 and "train_acc_poison" in metrics["curves"][0]


def test_report_of_a_stored_smoke_run_has_every_section_and_picture(stored_run):
    page = (stored_run / "report.html").read_text()              # written by run() itself
    for name in SECTIONS:
        section(page, name)
    assert "could not be drawn" not in page and "class='missing'" not in page
    for name in ("trigger", "curves", "subsets", "scores"):
        assert len(embedded_images(section(page, name))) == 1, name
    images = embedded_images(page)
    assert len(images) == 4 and all(img.format == "PNG" and img.width >= 400 for img in images)
    # the figures are not blank
    assert all(np.asarray(img.convert("L")).std() > 10 for img in images)
    summary = section(page, "summary")
    assert "detection AUROC" in summary and "attack success rate" in summary
    assert "http://" not in page and "https://" not in page     # self-contained: nothing to fetch


def test_unpoison_report_regenerates_the_page(stored_run, tmp_path):
    from unpoison.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(stored_run, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert len(embedded_images((copy / "report.html").read_text())) == 4
    assert main(["report", str(tmp_path / "nothing-here")]) == 1


def test_report_says_why_a_picture_is_missing(stored_run, tmp_path):
    """An old run (no arrays saved, no per-epoch curves) still gets a page, with reasons."""
    old = tmp_path / "old"
    old.mkdir()
    metrics = json.loads((stored_run / "metrics.json").read_text())
    metrics.pop("curves")
    (old / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(old).read_text()
    assert "trigger.npz is missing" in section(page, "trigger")
    assert "--monitor epochs" in section(page, "curves")
    assert len(embedded_images(section(page, "curves"))) == 1    # CA/ASR after each stage instead
    assert "scores.npz is missing" in section(page, "scores")
    assert "could not be drawn" not in page


def test_clean_baseline_report(toy_root, tmp_path):
    from unpoison.run import RunConfig, run

    run(RunConfig(profile="smoke", attack="none", out=str(tmp_path), data_root=str(toy_root), device="cpu",
                  precision="fp32", progress=False, monitor="stages"))
    assert not (tmp_path / TRIGGER_FILE).exists() and not (tmp_path / SCORES_FILE).exists()
    page = (tmp_path / "report.html").read_text()
    assert "no trigger" in section(page, "trigger") and "no attack" in section(page, "summary")
    assert "could not be drawn" not in page


def test_trigger_examples_pair_clean_and_poisoned_images(tmp_path):
    from unpoison.attacks.badnets import BadNets

    data = toy_dataset(64, 4, size=32)
    attack = BadNets(target=1)
    poisoned = attack.poison(data, torch.Generator().manual_seed(0))
    test = toy_dataset(32, 4, size=32, seed=1)
    target = tmp_path / TRIGGER_FILE
    assert save_trigger_examples(target, data, poisoned, attack, test, attack.backdoor_test(test), n=3)
    arrays = load_arrays(target)
    changed = arrays["train_clean"] != arrays["train_poisoned"]
    assert changed[..., 29:, 29:].any() and not changed[..., :29, :].any()      # only the 3x3 corner
    assert (arrays["train_given_label"] == 1).all() and (arrays["train_label"] != 1).all()
    assert list(arrays["classes"]) == data.classes


@pytest.mark.slow
def test_chromium_renders_the_report(stored_run, tmp_path):
    from unpoison.report.browser import find_chromium, images_loaded, screenshot

    if find_chromium() is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium); "
                    "benchmarks/screenshot_report.py does the same check by hand")
    assert images_loaded(stored_run / "report.html") == (4, 4)
    shot = screenshot(stored_run / "report.html", tmp_path / "report.png", width=1000, height=2400)
    image = Image.open(shot)
    assert image.size == (1000, 2400)
    pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 20                                     # text and figures, not a blank page
    assert (pixels[:200] < 128).mean() > 0.005                   # the heading and table are drawn at the top
