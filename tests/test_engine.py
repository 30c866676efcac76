import pytest
import torch

from conftest import toy_dataset
from unpoison.models import build_model
from unpoison.train import Engine, OptimConfig, TrainConfig, lr_at, train_supervised
from unpoison.train.supervised import DeviceData, predict, supervised_epoch


def test_training_learns_a_separable_toy_problem(cpu):
    data = toy_dataset(256, 4)
    model = build_model("wrn16-1", 4)
    cfg = TrainConfig(epochs=3, batch_size=32, augment="weak", optim=OptimConfig(lr=0.05, schedule="constant"))
    model = train_supervised(model, data, cfg, cpu, name="toy", seed=0, progress=False)
    acc = (predict(model, data.images, cpu).argmax(1) == data.labels).float().mean()
    assert acc > 0.9


class Interrupt(Exception):
    pass


def _engine(data, cpu, ckpt, ema):
    torch.manual_seed(123)
    model = build_model("wrn16-1", 4)
    return Engine(model, OptimConfig(lr=0.05, schedule="cosine"), cpu, name="stage", epochs=4,
                  steps_per_epoch=8, seed=7, checkpoint_dir=ckpt, ema_decay=ema, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, cpu, ema):
    data = toy_dataset(256, 4)
    device_data = DeviceData(data, cpu)
    epoch = supervised_epoch(device_data, 32, "strong")

    reference = _engine(data, cpu, tmp_path / "a", ema).fit(epoch)

    def dies_in_epoch_3(engine, e, g):
        if e == 2:
            raise Interrupt
        return epoch(engine, e, g)

    with pytest.raises(Interrupt):
        _engine(data, cpu, tmp_path / "b", ema).fit(dies_in_epoch_3)
    resumed_engine = _engine(data, cpu, tmp_path / "b", ema)
    resumed = resumed_engine.fit(epoch)
    assert resumed_engine.history[0]["epoch"] == 1 and len(resumed_engine.history) == 4
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_stopped_epoch_ends_the_stage_and_resume_keeps_it_ended(tmp_path, cpu):
    data = toy_dataset(64, 4)
    epoch = supervised_epoch(DeviceData(data, cpu), 32, "none")

    def stops_after_two(engine, e, g):
        return {"stopped": True} if e == 2 else epoch(engine, e, g)

    engine = _engine(data, cpu, tmp_path, None)
    engine.fit(stops_after_two)
    assert [r["epoch"] for r in engine.history] == [1, 2, 3] and engine.history[-1]["stopped"]
    steps = engine.step_count
    again = _engine(data, cpu, tmp_path, None)
    again.fit(epoch)                       # the checkpoint says the stage is finished
    assert again.step_count == steps and len(again.history) == 3


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, schedule="cosine")
    assert lr_at(cos, 0, 10) == 1.0 and abs(lr_at(cos, 5, 10) - 0.5) < 1e-9 and lr_at(cos, 10, 10) < 1e-9
    step = OptimConfig(lr=0.1, schedule="multistep", milestones=(20, 70))
    assert lr_at(step, 19.9, 100) == 0.1 and abs(lr_at(step, 20, 100) - 0.01) < 1e-12
    assert abs(lr_at(step, 70, 100) - 0.001) < 1e-12
    one = OptimConfig(lr=1.0, schedule="onecycle", warmup_epochs=2, warmup_start=0.0)
    assert lr_at(one, 1, 10) == 0.5 and lr_at(one, 2, 10) == 1.0 and lr_at(one, 6, 10) == 0.5


def test_nan_loss_stops_with_a_clear_error(cpu):
    model = build_model("wrn16-1", 4)
    engine = Engine(model, OptimConfig(), cpu, name="nan", epochs=1, steps_per_epoch=1, progress=False)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        engine.step(torch.tensor(float("nan"), requires_grad=True))
