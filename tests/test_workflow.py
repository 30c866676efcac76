"""`unpoison scan / train / predict / repair` on small user ImageFolders (smoke profile)."""

import csv
import json

import pytest
import torch
from PIL import Image

from unpoison.data.imageset import ImageSet
from unpoison.data.untrusted import load_folder, resize_policy
from unpoison.report.suspects import flag_summary, ranking, suspect_order, summary_lines
from unpoison.defenses import DefenseResult
from unpoison.detect.spectral import spectral_flags, spectral_scores
from userdata import CLASSES, SMOKE, make_archive, make_folder, unpoison


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ----------------------------------------------------------------------- spectral signatures

def test_spectral_scores_put_a_planted_direction_on_top():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(300, 16, generator=g)
    labels = torch.arange(300) % 3
    poisoned = (labels == 0).nonzero().flatten()[:8]      # 8 % of class 0
    features[poisoned] += 6.0 * torch.nn.functional.normalize(torch.ones(16), dim=0)
    scores = spectral_scores(features, labels, 3)
    class0 = (labels == 0).nonzero().flatten()
    top = class0[scores[class0].argsort(descending=True)[:8]]
    assert set(top.tolist()) == set(poisoned.tolist())
    # normalised per class: the mean score of every class is 1
    for c in range(3):
        assert abs(float(scores[labels == c].mean()) - 1) < 1e-4


def test_spectral_flags_follow_the_papers_rule():
    labels = torch.tensor([0] * 100 + [1] * 40 + [2])
    scores = torch.rand(len(labels))
    flagged = spectral_flags(scores, labels, 3, upper_bound=0.1, removal_factor=1.5)
    assert int(flagged[labels == 0].sum()) == 15 and int(flagged[labels == 1].sum()) == 6
    assert not flagged[labels == 2].any()  # a one-sample class has no direction
    class0 = (labels == 0).nonzero().flatten()
    assert scores[class0][flagged[class0]].min() >= scores[class0][~flagged[class0]].max()


# ----------------------------------------------------------------------- scan

@pytest.mark.slow
def test_scan_ranks_writes_a_grid_and_summarises(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=16, poison=4)
    out = tmp_path / "scan"
    assert unpoison("scan", "--data", data, "--out", out, "--detector", "spectral", "--flag-fraction", "0.1",
                    *SMOKE) == 0
    rows = read_csv(out / "suspects.csv")
    assert rows[0] == ["path", "label", "score", "flagged"]
    body = rows[1:]
    assert len(body) == 48 and {r[1] for r in body} == set(CLASSES)
    scores = [float(r[2]) for r in body]
    assert scores == sorted(scores, reverse=True)                    # most suspicious first
    assert [r[3] for r in body] == ["1"] * 5 + ["0"] * 43            # 10 % of 48, rounded
    with Image.open(out / "suspects.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    summary = json.loads((out / "scan.json").read_text())
    assert summary["n_flagged"] == 5 and summary["detector"]["name"] == "spectral"
    assert "resized" in summary["resize_policy"]
    # the suspected target class gets its own picture exactly when the flags concentrate
    assert (out / "suspects_in_class.png").exists() == (summary["concentrated_in"] is not None)
    printed = capsys.readouterr().out
    assert "flagged 5 of 48 images" in printed and "by class:" in printed


@pytest.mark.slow
def test_scan_defaults_to_expand_and_flags_ten_percent(tmp_path):
    data = make_folder(tmp_path / "data", per_class=16, poison=4)
    out = tmp_path / "scan"
    assert unpoison("scan", "--data", data, "--out", out, *SMOKE) == 0
    summary = json.loads((out / "scan.json").read_text())
    assert summary["detector"]["name"] == "expand" and summary["detector"]["neighbours"] == 10
    assert summary["n_flagged"] == 5 and "10%" in summary["flagging_rule"]


def test_suspect_order_can_keep_to_one_label():
    scores = torch.tensor([9.0, 8.0, 1.0, 7.0, 2.0, 3.0])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    assert suspect_order(scores, labels, 4) == [0, 1, 3, 5]
    assert suspect_order(scores, labels, 2, label=0) == [5, 4]


def test_flag_summary_names_the_class_the_flags_concentrate_in():
    data = ImageSet(torch.zeros(40, 3, 4, 4, dtype=torch.uint8), torch.arange(40) % 4, ["a", "b", "c", "d"])
    flagged = torch.zeros(40, dtype=torch.bool)
    flagged[(data.labels == 2).nonzero().flatten()[:8]] = True
    flagged[0] = True
    summary = flag_summary(data, flagged)
    assert summary["n_flagged"] == 9 and summary["concentrated_in"] == "c"
    assert any("concentrate in class 'c'" in line for line in summary_lines(summary))
    spread = torch.zeros(40, dtype=torch.bool)
    spread[:8] = True
    assert flag_summary(data, spread)["concentrated_in"] is None


def test_ranking_is_stable_and_puts_nan_first():
    order = ranking(torch.tensor([0.5, float("nan"), 2.0, 0.5]))
    assert order.tolist() == [1, 2, 0, 3]


# ----------------------------------------------------------------------- train / predict

def test_train_writes_the_model_contract_and_predict_uses_it(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=16)
    out = tmp_path / "run"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", *SMOKE) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["format"] == "unpoison-model" and payload["classes"] == list(CLASSES)
    assert payload["architecture"] == "wrn16-1" and payload["input_size"] == [32, 32]
    assert {"mean", "std"} <= set(payload["normalization"])
    assert read_csv(out / "suspects.csv")[0] == ["path", "label", "score", "flagged"]
    assert (out / "report.html").read_text().lower().startswith("<!doctype html>")
    record = json.loads((out / "train.json").read_text())
    assert record["n_train"] + record["n_held_out"] == 48 and record["n_held_out"] == 6  # 10 % of each class
    assert 0 <= record["held_out_acc"] <= 1 and "validation split" in record["held_out"]
    assert "held-out accuracy" in capsys.readouterr().out

    preds = tmp_path / "preds.csv"
    assert unpoison("predict", "--model", out, "--data", data, "--out", preds, "--device", "cpu") == 0
    rows = read_csv(preds)
    assert rows[0] == ["path", "pred", "class_name", "confidence"] and len(rows) == 49
    for path, pred, name, confidence in rows[1:]:
        assert CLASSES[int(pred)] == name and 0 < float(confidence) <= 1
    assert "accuracy against the folder's class names" in capsys.readouterr().out


def test_split_layout_trains_on_train_and_measures_on_test(tmp_path):
    root = tmp_path / "poisoned"
    make_folder(root / "train", per_class=12)
    make_folder(root / "test", per_class=4, seed=1)
    out = tmp_path / "run"
    assert unpoison("train", "--data", root, "--out", out, "--defense", "none", *SMOKE) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["n_train"] == 36 and record["n_held_out"] == 12 and record["held_out"].endswith("/test")


def test_test_folder_and_archive_inputs(tmp_path):
    data = make_folder(tmp_path / "data", per_class=10)
    archive = make_archive(data, tmp_path / "data.tar.gz", prefix="wrapper/")
    test = make_folder(tmp_path / "test", per_class=3, seed=2)
    out = tmp_path / "run"
    assert unpoison("train", "--data", archive, "--out", out, "--defense", "none", "--test", test, *SMOKE) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["n_train"] == 30 and record["n_held_out"] == 9 and record["classes"] == list(CLASSES)


def test_predict_reads_flat_folders_single_images_and_archives(tmp_path):
    data = make_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "run"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", "--val-split", "0", *SMOKE) == 0
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, source in enumerate(sorted((data / "cat").iterdir())[:3]):
        (flat / f"photo {i}{source.suffix}").write_bytes(source.read_bytes())
    cases = {"flat": (flat, 3), "single": (flat / "photo 0.png", 1),
             "archive": (make_archive(data, tmp_path / "d.tar.gz"), 30)}
    for name, (source, expected) in cases.items():
        preds = tmp_path / f"{name}.csv"
        assert unpoison("predict", "--model", out / "model.pt", "--data", source, "--out", preds) == 0
        assert len(read_csv(preds)) == expected + 1, name


def test_another_input_size_is_kept_from_training_to_prediction(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", "--image-size", "24", *SMOKE) == 0
    assert torch.load(out / "model.pt", weights_only=True)["input_size"] == [24, 24]
    assert unpoison("predict", "--model", out, "--data", data, "--out", tmp_path / "p.csv") == 0
    assert "to 24x24" in capsys.readouterr().err


def test_resize_policy_is_stated_and_images_of_any_mode_load(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6)
    Image.new("P", (50, 10)).save(data / "cat" / "palette.png")
    Image.new("LA", (12, 12)).save(data / "cat" / "gray-alpha.png")
    Image.new("I;16", (9, 9)).save(data / "cat" / "sixteen.png")
    Image.new("CMYK", (9, 9)).save(data / "cat" / "cmyk.jpg")
    loaded = load_folder(data, None, (32, 32))
    assert len(loaded) == 22 and not loaded.skipped
    assert "32x32" in resize_policy((32, 32)) and "bilinear" in resize_policy((32, 32))


# ----------------------------------------------------------------------- resume and atomic outputs

def _reference_and_killed(tmp_path, monkeypatch, data, extra, stage, kill_at):
    """Train once uninterrupted (a), then again (b) killed at the kill_at-th optimiser step
    of `stage`, before that epoch's checkpoint, and resume b."""
    from unpoison.train import engine as engine_module

    args = ("--data", data, *extra, "--no-share", *SMOKE)
    assert unpoison("train", "--out", tmp_path / "a", *args) == 0

    original = engine_module.Engine.step
    calls = {"n": 0}

    def dies(self, loss, images=0):
        calls["n"] += self.name == stage
        if self.name == stage and calls["n"] == kill_at:
            raise KeyboardInterrupt  # what Ctrl-C (or a SIGINT) does mid-epoch
        return original(self, loss, images)

    monkeypatch.setattr(engine_module.Engine, "step", dies)
    assert unpoison("train", "--out", tmp_path / "b", *args) == 130
    assert calls["n"] == kill_at
    monkeypatch.setattr(engine_module.Engine, "step", original)
    # a killed run leaves no half-written output, only checkpoints of finished epochs
    assert not (tmp_path / "b" / "model.pt").exists() and not (tmp_path / "b" / "suspects.csv").exists()
    assert unpoison("train", "--out", tmp_path / "b", "--resume", *args) == 0


def test_resume_refuses_a_run_with_other_data_or_settings(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", *SMOKE) == 0
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", "--seed", "1", "--resume", *SMOKE) == 2
    assert "seed; rerun without --resume" in capsys.readouterr().err  # (the split moves too: data, seed)
    (data / "cat" / "img 0.png").unlink()
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", "--resume", *SMOKE) == 2
    assert "different data" in capsys.readouterr().err


def _assert_same_outputs(a, b):
    ma = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    mb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = (json.loads((d / "train.json").read_text()) for d in (a, b))
    assert ra["held_out_acc"] == rb["held_out_acc"] and ra["held_out_acc_by_stage"] == rb["held_out_acc_by_stage"]
    assert (a / "suspects.csv").read_text() == (b / "suspects.csv").read_text()
    assert not list(b.glob(".*.tmp*"))  # no temporary file survives


@pytest.mark.slow
def test_train_killed_mid_epoch_resumes_to_identical_outputs(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=30)
    # 81 training images, batch 64: 2 steps per epoch; step 3 is the middle of epoch 2 of 3
    _reference_and_killed(tmp_path, monkeypatch, data, ("--defense", "none", "--epochs", "3"), "train", 3)
    _assert_same_outputs(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_multi_stage_defence_killed_in_a_later_stage_resumes_identically(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=12, poison=2)
    # D-BR: the baseline, the SD model, then the unlearn/relearn loop (an unlearn and a
    # relearn step per epoch): its 4th step is mid-epoch, after both earlier stages finished
    # (the unlearned rule off: on this folder it may end the loop after the first epoch; the
    # stall rule stays on, and its decision after epoch 2 reads epoch 1 from the checkpoint)
    _reference_and_killed(tmp_path, monkeypatch, data, ("--defense", "dbr", "--set", "unlearn.stop=never"),
                          "dbr", 4)
    _assert_same_outputs(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "train.json").read_text())["n_flagged"] > 0


@pytest.mark.slow
def test_dlp_killed_during_fine_tuning_resumes_identically(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=16, poison=2)
    # DLP: SL, AU, then ASSFT (FixMatch, several steps per epoch): killed at ASSFT's 3rd step
    _reference_and_killed(tmp_path, monkeypatch, data, ("--defense", "dlp", "--set", "au.epochs=3"), "ASSFT", 3)
    _assert_same_outputs(tmp_path / "a", tmp_path / "b")


# ----------------------------------------------------------------------- repair

def _trained(tmp_path, data):
    out = tmp_path / "backdoored"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", *SMOKE) == 0
    return out / "model.pt"


def test_repair_drives_dbr_repair_and_keeps_the_model_contract(tmp_path, monkeypatch, capsys):
    """With a stand-in for D-BR's repair(), so this tests the command, not D-BR."""
    import unpoison.defenses.dbr as dbr

    data = make_folder(tmp_path / "data", per_class=12, poison=2)
    model_path = _trained(tmp_path, data)
    seen = {}

    def stand_in(model, train, ctx, config):
        seen.update(n=len(train), classes=train.classes, profile=ctx.profile, config=config)
        return DefenseResult(model)

    monkeypatch.setattr(dbr, "repair", stand_in)
    out = tmp_path / "repaired"
    assert unpoison("repair", "--model", model_path, "--data", data, "--out", out, *SMOKE, "--epochs", "3") == 0
    assert seen["classes"] == list(CLASSES) and seen["profile"] == "smoke"
    assert seen["config"].unlearn.epochs == 3 and seen["config"].sd.scorer == "expand"
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["format"] == "unpoison-model" and payload["classes"] == list(CLASSES)
    record = json.loads((out / "repair.json").read_text())
    assert record["held_out_acc_before"] is not None and record["held_out_acc"] is not None
    assert "before" in capsys.readouterr().out


@pytest.mark.slow
def test_repair_with_dbr_flags_and_writes_suspects(tmp_path):
    data = make_folder(tmp_path / "data", per_class=12, poison=2)
    model_path = _trained(tmp_path, data)
    out = tmp_path / "repaired"
    assert unpoison("repair", "--model", model_path, "--data", data, "--out", out, *SMOKE) == 0
    rows = read_csv(out / "suspects.csv")[1:]
    assert len(rows) == 32 and any(r[3] == "1" for r in rows)  # 36 minus 4 held out
    assert (out / "suspects.png").exists() and (out / "report.html").exists()
    # the page embeds both pictures under their own headings, and `unpoison report` redraws it
    page = (out / "report.html").read_text()
    for heading in ("Suspicion scores", "Most suspicious images"):
        assert f"<h2>{heading}</h2><figure><img alt='{heading}' src='data:image/png;base64," in page
    assert "<h2>Held-out accuracy per epoch</h2><table>" in page
    (out / "report.html").unlink()
    assert unpoison("report", out) == 0
    assert (out / "report.html").read_text() == page
    # the user path splits like `scan` (expand, trusted images from every class) ...
    sd = json.loads((out / "repair.json").read_text())["defense_config"]["sd"]
    assert (sd["scorer"], sd["clean_per_class"]) == ("expand", True)
    # ... and --set gives back the paper's SD module
    out_fct = tmp_path / "repaired-fct"
    assert unpoison("repair", "--model", model_path, "--data", data, "--out", out_fct, *SMOKE,
                    "--set", "sd.scorer=fct", "--set", "sd.clean_per_class=false") == 0
    sd = json.loads((out_fct / "repair.json").read_text())["defense_config"]["sd"]
    assert (sd["scorer"], sd["clean_per_class"]) == ("fct", False)


def test_repair_refuses_a_folder_whose_classes_the_model_does_not_know(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8)
    model_path = _trained(tmp_path, data)
    other = make_folder(tmp_path / "other", per_class=8, classes=("x", "y", "z"))
    assert unpoison("repair", "--model", model_path, "--data", other, "--out", tmp_path / "r", *SMOKE) == 2
