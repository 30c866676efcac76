from pathlib import Path
from statistics import median

import pytest
import torch

from toy_backdoor import TOY_SEEDS, tiny_backdoor, train_toy_backdoored
from unpoison.defenses import build_defense
from unpoison.defenses.base import DefenseContext
from unpoison.defenses.dst import DSTConfig
from unpoison.metrics import backdoor_metrics
from unpoison.runtime import Runtime

CPU = Runtime.create("cpu", "fp32")


def test_configs_follow_the_paper():
    paper = DSTConfig.for_profile("paper")
    assert paper.sd.model == "resnet18-maxpool" and (paper.sd.ce_epochs, paper.sd.intra_epochs) == (2, 10)
    assert (paper.ctl_epochs, paper.ctl_batch_size, paper.ctl_optim.lr) == (200, 512, 0.5)
    assert (paper.temperature, paper.base_temperature, paper.unlearn_weight) == (0.1, 0.07, 0.001)
    assert (paper.cls_epochs, paper.cls_optim.lr, paper.cls_optim.weight_decay) == (10, 5.0, 0.0)
    assert not paper.strict_positives
    assert build_defense("dst", "quick", strict_positives=True).config.strict_positives
    # the encoder is the paper's SupCon ResNet-18 (no stem max-pool) whatever --model says
    assert paper.model == "resnet18"
    o = paper.ctl_optim
    assert (o.warmup_epochs, o.schedule, o.weight_decay, paper.projection_dim) == (10, "cosine", 1e-4, 128)
    assert build_defense("dst", "paper").deviations("wrn16-1") == []
    assert "model: 'wrn16-1' (paper: 'resnet18')" in build_defense("dst", "quick").deviations("wrn16-1")


def test_encoder_is_built_from_the_config_model(tmp_path, monkeypatch):
    from unpoison.defenses import dst as dst_module
    from unpoison.models import ResNet18

    built = []
    monkeypatch.setattr(dst_module, "ContrastiveNet", lambda model, dim: built.append(model) or (_ for _ in ()).throw(
        RuntimeError("stop")))
    poisoned, _, _ = tiny_backdoor(64, 8)
    ctx = DefenseContext(CPU, "smoke", 0, "wrn16-1", Path(tmp_path), progress=False)
    cfg = build_defense("dst", "smoke", model="resnet18").config
    split = dst_module.SampleSplit(torch.zeros(64), torch.ones(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="stop"):
        dst_module.train_extractor(poisoned.untrusted(), split, ctx, cfg)
    assert isinstance(built[0], ResNet18)


@pytest.mark.slow
def test_smoke_dst_lowers_asr_against_a_tiny_backdoor(tmp_path):
    poisoned, attack, test = tiny_backdoor()
    undefended = train_toy_backdoored(poisoned, name="undefended")
    before = backdoor_metrics(undefended, test, attack, CPU)
    assert before["asr"] > 0.9
    runs = []
    for seed in TOY_SEEDS[:3]:
        ctx = DefenseContext(CPU, "smoke", seed, "wrn16-1", Path(tmp_path) / str(seed), progress=False)
        result = build_defense("dst", "smoke").fit(poisoned.untrusted(), ctx)
        runs.append(backdoor_metrics(result.model, test, attack, CPU))
    # one seed's outcome swings with the CPU's kernels (CA 0.25 on one with AVX2 kernels): the
    # claim is the median's over three
    assert median(r["asr"] for r in runs) < before["asr"] - 0.5, runs
    # the toy classes differ only in colour, which SS-CTL's colour jitter and grayscale views
    # scramble: a few smoke epochs get well above chance (0.25), not to the undefended 1.0
    assert median(r["clean_acc"] for r in runs) > 0.4, runs
    assert [s["name"] for s in result.stages] == ["sd_model", "fct", "ss_ctl", "mixed_ce"]
    assert result.suspicion.shape == (512,) and int(result.flagged.sum()) == int(0.05 * 512)
    # the returned network is the run's architecture with a new linear head, ready to save
    assert isinstance(result.model.head, torch.nn.Linear) and result.model.head.out_features == 4
    assert all(p.requires_grad for p in result.model.parameters())


@pytest.mark.slow
def test_dst_killed_during_ss_ctl_resumes_to_the_same_model(tmp_path, monkeypatch):
    from unpoison.train import engine as engine_module

    poisoned, _, _ = tiny_backdoor(n_train=128, n_test=8)
    data = poisoned.untrusted()
    defense = build_defense("dst", "smoke", ctl_epochs=2, cls_epochs=1)
    reference = defense.fit(data, DefenseContext(CPU, "smoke", 0, "wrn16-1", tmp_path / "a", progress=False)).model

    original, calls = engine_module.Engine.step, {"n": 0}

    def dies(self, loss, images=0):
        calls["n"] += self.name == "ss_ctl"
        if self.name == "ss_ctl" and calls["n"] == 3:   # mid-way through SS-CTL's second epoch (2 steps each)
            raise KeyboardInterrupt
        return original(self, loss, images)

    monkeypatch.setattr(engine_module.Engine, "step", dies)
    ctx = DefenseContext(CPU, "smoke", 0, "wrn16-1", tmp_path / "b", progress=False)
    with pytest.raises(KeyboardInterrupt):
        defense.fit(data, ctx)
    monkeypatch.setattr(engine_module.Engine, "step", original)
    resumed = defense.fit(data, ctx).model
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
