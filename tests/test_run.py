import json
import subprocess
import sys

import pytest

from conftest import data_root, requires_cifar
from unpoison.run import RunConfig, run

CONTRACT = {"dataset", "attack", "defense", "model", "profile", "seed", "n_train", "n_poisoned", "poison_rate",
            "target", "clean_acc", "asr", "robust_acc", "wall_seconds", "device", "stages"}


@requires_cifar
def test_run_writes_the_metrics_contract(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "unpoison.cli", "run", "--profile", "smoke", "--attack", "badnets",
           "--out", str(out), "--data-root", str(data_root()), "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert CONTRACT <= set(metrics)
    assert metrics["profile"] == "smoke" and metrics["n_train"] == 512 and metrics["n_poisoned"] == 51
    assert 0 <= metrics["clean_acc"] <= 1 and 0 <= metrics["asr"] <= 1
    assert metrics["stages"][0]["name"] == "train" and {"seconds", "epochs"} <= set(metrics["stages"][0])
    # every setting that is not the paper's is named, in metrics.json and in the run's output
    assert "train.epochs: 2 (paper: 100)" in metrics["deviations"]
    assert "not the paper's setting: train.epochs: 2 (paper: 100)" in done.stderr


@requires_cifar
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    from unpoison.train import engine as engine_module

    base = dict(profile="smoke", attack="badnets", data_root=str(data_root()), device="cpu", progress=False,
                share_models=False, defense_params={"train.epochs": 3}, monitor="epochs")
    reference = run(RunConfig(out=str(tmp_path / "a"), **base))

    original = engine_module.Engine._save
    calls = {"n": 0}

    def killed_after_two_epochs(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine_module.Engine, "_save", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig(out=str(tmp_path / "b"), **base))
    monkeypatch.setattr(engine_module.Engine, "_save", original)
    resumed = run(RunConfig(out=str(tmp_path / "b"), resume=True, **base))
    for key in ("clean_acc", "asr", "robust_acc", "n_poisoned"):
        assert resumed[key] == reference[key]
    # the curves keep the epochs measured before the kill, and the wall time counts them
    assert [c["epoch"] for c in resumed["curves"]] == [1, 2, 3]
    assert resumed["curves"] == reference["curves"]
    before_kill = [json.loads(line)["elapsed"] for line in (tmp_path / "b" / "monitor.jsonl").read_text().splitlines()]
    assert resumed["wall_seconds"] >= before_kill[1]


@requires_cifar
def test_detection_only_run_records_the_detectors_scores(tmp_path):
    # `run --detector` once passed its notes where DefenseResult now keeps `trusted` (a crash)
    metrics = run(RunConfig(out=str(tmp_path / "d"), profile="smoke", attack="badnets", detector="expand",
                            data_root=str(data_root()), device="cpu", progress=False, share_models=False,
                            report=False))
    assert metrics["detector"] == "expand" and 0 <= metrics["detection"]["auroc"] <= 1
    assert [s["name"] for s in metrics["stages"]] == ["SL"] and "detection-only" in metrics["notes"][0]


@requires_cifar
def test_tta_run_records_both_measurements_and_quicknet_trains_through_run(tmp_path):
    base = dict(profile="smoke", attack="badnets", model="quicknet-s", data_root=str(data_root()),
                progress=False, report=False, test_subset=128)
    metrics = run(RunConfig(out=str(tmp_path / "tta"), tta=True, **base))
    assert metrics["tta"] is True and metrics["model"] == "quicknet-s"
    for key in ("clean_acc", "asr", "robust_acc"):
        assert 0 <= metrics[key] <= 1 and 0 <= metrics[f"{key}_no_tta"] <= 1
    plain = run(RunConfig(out=str(tmp_path / "plain"), **base))
    assert "tta" not in plain and "clean_acc_no_tta" not in plain
    # the same training (the cache reuses it): without TTA, the plain numbers are the TTA run's
    assert plain["clean_acc"] == pytest.approx(metrics["clean_acc_no_tta"])
