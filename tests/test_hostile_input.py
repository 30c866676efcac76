"""The dataset is the attacker's: every hostile or broken input the user workflow must survive.

Each case runs the real command (in process) and checks: no code from the data runs, bad
files are skipped and reported with a reason, nothing is written outside the output
folder, and structural problems end in a clear warning or a clear error (exit code 2).
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from unpoison.artifacts import NotAnUnpoisonModel, load_model
from userdata import CLASSES, SMOKE, add_member, image_bytes, make_folder, toy_pixels, unpoison

FAST = ("--defense", "none", "--val-split", "0", *SMOKE)


class CodeExecution:
    """Unpickling this runs `touch marker`: if the marker exists, something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def pickle_bytes(obj) -> bytes:
    import pickle

    return pickle.dumps(obj)


def snapshot(root, exclude):
    """Every path under root (files, folders, links) except those under `exclude`."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not any(path == str(e) or path.startswith(str(e) + os.sep) for e in exclude):
                seen.add(path)
    return seen


def train_json(out):
    return json.loads((out / "train.json").read_text())


def skipped(out):
    return (out / "skipped.txt").read_text()


# ----------------------------------------------------------------------- code in the data

def test_no_pickle_from_the_data_folder_is_ever_loaded(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6)
    marker = tmp_path / "PWNED"
    evil = pickle_bytes(CodeExecution(marker))
    for name in ("weights.pkl", "model.pt", "labels.npy", "looks-like.png", "looks-like.jpg"):
        (data / "cat" / name).write_bytes(evil)
    np.save(data / "dog house" / "objects.npy", np.array([CodeExecution(marker)], dtype=object), allow_pickle=True)
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, *FAST) == 0
    assert not marker.exists()
    assert train_json(out)["n_train"] == 18
    report = skipped(out)
    for name in ("weights.pkl", "model.pt", "labels.npy", "objects.npy"):
        assert f"{name}: not an image file extension" in report
    assert "looks-like.png: cannot decode" in report and "looks-like.jpg: cannot decode" in report


def test_a_pickled_model_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil_model = tmp_path / "model.pt"
    torch.save({"format": "unpoison-model", "payload": CodeExecution(marker)}, evil_model)
    data = make_folder(tmp_path / "data", per_class=2)
    assert unpoison("predict", "--model", evil_model, "--data", data, "--out", tmp_path / "p.csv") == 2
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    assert "cannot be loaded safely" in capsys.readouterr().err
    with pytest.raises(NotAnUnpoisonModel):
        load_model(evil_model)
    assert not marker.exists()


def test_a_checkpoint_that_is_not_ours_is_rejected_clearly(tmp_path, capsys):
    from unpoison.models import build_model

    data = make_folder(tmp_path / "data", per_class=2)
    foreign = tmp_path / "foreign.pt"
    torch.save(build_model("wrn16-1", 3).state_dict(), foreign)  # a bare state dict
    assert unpoison("predict", "--model", foreign, "--data", data, "--out", tmp_path / "p.csv") == 2
    assert "not an unpoison model.pt" in capsys.readouterr().err
    forged = tmp_path / "forged.pt"
    torch.save({"format": "unpoison-model", "architecture": "rm -rf /", "num_classes": 3,
                "classes": list(CLASSES), "input_size": [32, 32],
                "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}, "state_dict": {}}, forged)
    assert unpoison("predict", "--model", forged, "--data", data, "--out", tmp_path / "p.csv") == 2
    assert "cannot be rebuilt" in capsys.readouterr().err
    assert unpoison("repair", "--model", foreign, "--data", data, "--out", tmp_path / "r", *SMOKE) == 2
    assert unpoison("predict", "--model", tmp_path / "missing.pt", "--data", data, "--out", tmp_path / "p.csv") == 2


# ----------------------------------------------------------------------- broken and hostile files

def test_broken_files_are_skipped_and_counted_never_a_crash(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6)
    good = image_bytes(toy_pixels((200, 40, 40), np.random.default_rng(0)), "jpg")
    (data / "cat" / "zero.png").write_bytes(b"")
    (data / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (data / "cat" / "notes.txt").write_text("not an image")
    (data / "cat" / "text-as.webp").write_text("not an image either")
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 Mpx in a few kB
    (data / "dog house" / "bomb.png").write_bytes(bomb.getvalue())
    out = tmp_path / "out"
    before = snapshot(tmp_path, [out])
    assert unpoison("train", "--data", data, "--out", out, *FAST) == 0
    assert snapshot(tmp_path, [out]) == before  # nothing written outside the output folder
    report = skipped(out)
    for name, reason in (("zero.png", "empty file"), ("truncated.jpg", "cannot decode"),
                         ("corrupt.png", "cannot decode"), ("notes.txt", "not an image file extension"),
                         ("text-as.webp", "cannot decode"), ("bomb.png", "decompression bomb")):
        assert any(name in line and reason in line for line in report.splitlines()), name
    assert train_json(out)["n_skipped"] == 6 and train_json(out)["n_train"] == 18
    assert "skipped 6 files" in capsys.readouterr().err


def test_pipes_and_devices_are_refused_instead_of_hanging(tmp_path):
    import signal

    def hung(signum, frame):
        raise TimeoutError("reading a FIFO blocked")

    data = make_folder(tmp_path / "data", per_class=5)
    os.mkfifo(data / "cat" / "pipe.png")
    (data / "dog house" / "zeros.png").symlink_to(data / "cat" / "pipe.png")
    flat = tmp_path / "flat"
    flat.mkdir()
    os.mkfifo(flat / "pipe.jpg")
    (flat / "real.png").write_bytes((data / "cat" / "img 0.png").read_bytes())
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        out = tmp_path / "out"
        assert unpoison("train", "--data", data, "--out", out, *FAST) == 0
        assert skipped(out).count("not a regular file") == 2 and train_json(out)["n_train"] == 15
        assert unpoison("predict", "--model", out, "--data", flat, "--out", tmp_path / "p.csv") == 0
        assert len((tmp_path / "p.csv").read_text().splitlines()) == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_symlinks_leaving_the_folder_are_refused(tmp_path):
    data = make_folder(tmp_path / "data", per_class=5)
    outside = tmp_path / "outside"
    make_folder(outside, per_class=3, classes=("secret",))
    (data / "cat" / "stolen.png").symlink_to(next((outside / "secret").iterdir()))
    (data / "secret").symlink_to(outside / "secret", target_is_directory=True)
    (data / "cat" / "inside.png").symlink_to(data / "cat" / "img 0.png")  # stays inside: fine
    (data / "cat" / "dangling.png").symlink_to(data / "cat" / "gone.png")
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, *FAST) == 0
    record = train_json(out)
    assert record["classes"] == list(CLASSES) and record["n_train"] == 16
    report = skipped(out)
    assert "cat/dangling.png: cannot read" in report
    assert "cat/stolen.png: symlink points outside the folder" in report
    assert "secret: symlink points outside the folder" in report


def test_archive_members_escaping_the_archive_are_refused_and_nothing_is_extracted(tmp_path):
    folder = make_folder(tmp_path / "folder", per_class=5)
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    png = image_bytes(toy_pixels((1, 2, 3), np.random.default_rng(1)))
    add_member(archive, "../escaped/0.png", png)
    add_member(archive, "/tmp/absolute/0.png", png)
    add_member(archive, "cat/../../climb.png", png)
    with tarfile.open(archive, "a") as tar:
        link = tarfile.TarInfo("cat/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    out = tmp_path / "out"
    before = snapshot(tmp_path, [out])
    assert unpoison("train", "--data", archive, "--out", out, *FAST) == 0
    assert snapshot(tmp_path, [out]) == before
    assert not os.path.exists("/tmp/absolute/0.png")
    record, report = train_json(out), skipped(out)
    assert record["n_train"] == 15 and record["classes"] == list(CLASSES)
    assert report.count("unsafe path in archive") == 3 and "link inside archive" in report


def test_an_archive_too_big_to_hold_is_a_clear_error_and_non_images_are_never_read(tmp_path, monkeypatch, capsys):
    from unpoison.data import folder

    data = make_folder(tmp_path / "data", per_class=4)
    (data / "cat" / "movie.mp4").write_bytes(os.urandom(4096))
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(data, arcname=".")
    out = tmp_path / "out"
    assert unpoison("train", "--data", archive, "--out", out, *FAST) == 0
    assert "cat/movie.mp4: not an image file extension" in skipped(out)
    assert "unsafe" not in skipped(out)  # the "." root entry of `tar -C dir .` is not an escape
    assert json.loads((out / "train.json").read_text())["n_train"] == 12
    image_bytes_held = sum(p.stat().st_size for p in data.rglob("*.*") if p.suffix != ".mp4")
    monkeypatch.setattr(folder, "MAX_ARCHIVE_BYTES", image_bytes_held - 1)
    copy = tmp_path / "copy.tar"  # new content, so the decode cache cannot answer
    copy.write_bytes(archive.read_bytes() + b"\0" * 1024)
    assert unpoison("train", "--data", copy, "--out", tmp_path / "out2", *FAST) == 2
    assert "extract it and pass the folder" in capsys.readouterr().err


def test_an_output_folder_inside_the_data_folder_is_refused(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    assert unpoison("scan", "--data", data, "--out", data / "results", "--detector", "spectral", *SMOKE) == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert not (data / "results").exists()


@pytest.mark.slow
def test_hostile_class_names_are_escaped_in_the_report_and_the_grid(tmp_path):
    names = ("<img src=x onerror=alert(1)>", "$\\frac{1}{", "a,b\"c")  # a folder name cannot hold '/'
    data = make_folder(tmp_path / "data", per_class=8, classes=names, poison=2)
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", *SMOKE) == 0
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    scan = tmp_path / "scan"
    assert unpoison("scan", "--data", data, "--out", scan, "--detector", "spectral", *SMOKE) == 0
    import csv

    with open(scan / "suspects.csv", newline="", encoding="utf-8") as f:
        labels = {row["label"] for row in csv.DictReader(f)}
    assert labels == set(names)  # CSV quoting keeps commas and quotes intact
    assert (scan / "suspects.png").stat().st_size > 0


# ----------------------------------------------------------------------- odd class structures

def test_one_image_class_and_empty_class_are_warned_about(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6)
    (data / "lonely").mkdir()
    (data / "lonely" / "only.png").write_bytes(image_bytes(toy_pixels((90, 90, 90), np.random.default_rng(3))))
    (data / "empty").mkdir()
    (data / "broken only").mkdir()
    (data / "broken only" / "x.png").write_bytes(b"junk")
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, "--defense", "none", *SMOKE) == 0
    err = capsys.readouterr().err
    assert "single image" in err and "'lonely'" in err
    assert "hold no usable image and are left out of the model" in err and "'empty'" in err and "'broken only'" in err
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["classes"] == sorted([*CLASSES, "lonely"])
    assert len(train_json(out)["warnings"]) == 2


def test_a_single_class_is_a_clear_error(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=5, classes=("cat",))
    (data / "empty").mkdir()
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, *FAST) == 2
    assert "needs at least 2 classes" in capsys.readouterr().err
    assert not (out / "model.pt").exists()
    assert unpoison("scan", "--data", data, "--out", tmp_path / "scan", "--detector", "spectral", *SMOKE) == 2


def test_no_images_at_all_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "a.png").write_bytes(b"")
    (data / "dog").mkdir()
    assert unpoison("train", "--data", data, "--out", tmp_path / "out", *FAST) == 2
    assert "no decodable images" in capsys.readouterr().err
    assert unpoison("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "out", *FAST) == 2


def test_duplicates_across_classes_are_warned_about(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6)
    source = data / "cat" / "img 0.png"
    (data / "dog house" / "copy.png").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    assert unpoison("train", "--data", data, "--out", out, *FAST) == 0
    err = capsys.readouterr().err
    assert "appear with different labels" in err and "cat/img 0.png (cat)" in err
    assert any("different labels" in w for w in train_json(out)["warnings"])


# ----------------------------------------------------------------------- atomic outputs

@pytest.mark.slow
def test_every_output_is_written_by_rename(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=6, poison=2)
    out = tmp_path / "out"
    renamed = []
    original = os.replace

    def recording(src, dst):
        renamed.append(os.path.basename(dst))
        return original(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    assert unpoison("train", "--data", data, "--out", out, *FAST) == 0
    assert unpoison("scan", "--data", data, "--out", tmp_path / "scan", "--detector", "spectral", *SMOKE) == 0
    for name in ("model.pt", "suspects.csv", "report.html", "train.json", "scan.json", "suspects.png"):
        assert name in renamed, name
    leftovers = [p for p in (out, tmp_path / "scan") for p in p.glob(".*tmp*")]
    assert not leftovers
