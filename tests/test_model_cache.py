"""One model cache for every command, keyed by a digest of every pixel, label and class name."""

from __future__ import annotations

import pytest
import torch

from conftest import toy_dataset
from unpoison.artifacts import ModelCache, dataset_digest
from unpoison.context import DefenseContext
from unpoison.data.imageset import ImageSet
from unpoison.runtime import Runtime


def _copy(data: ImageSet, images=None, labels=None, classes=None) -> ImageSet:
    return ImageSet(data.images.clone() if images is None else images,
                    data.labels.clone() if labels is None else labels,
                    list(data.classes) if classes is None else classes)


def test_digest_is_equal_only_for_identical_pixels_labels_and_classes():
    data = toy_dataset(64)
    assert dataset_digest(_copy(data)) == dataset_digest(data)
    one_pixel = data.images.clone()
    one_pixel[37, 1, 5, 9] ^= 1
    one_label = data.labels.clone()
    one_label[3] = (one_label[3] + 1) % data.num_classes
    variants = [
        _copy(data, images=one_pixel),
        _copy(data, labels=one_label),
        _copy(data, classes=list(reversed(data.classes))),
        _copy(data, classes=[*data.classes[:-1], "renamed"]),
        data.subset(torch.arange(1, len(data))),                       # one image dropped
        data.subset(torch.cat([torch.arange(1, len(data)), torch.tensor([0])])),   # reordered
    ]
    digests = {dataset_digest(v) for v in variants}
    assert len(digests) == len(variants) and dataset_digest(data) not in digests


def test_digest_does_not_depend_on_memory_layout():
    data = toy_dataset(32)
    strided = ImageSet(data.images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), data.labels, data.classes)
    assert not strided.images.is_contiguous()
    assert dataset_digest(strided) == dataset_digest(data)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test starts from an empty cache (the session's is shared between tests)."""
    monkeypatch.setenv("UNPOISON_CACHE", str(tmp_path / "cache"))


def _context(tmp_path, seed: int = 0) -> DefenseContext:
    return DefenseContext(Runtime.create("cpu", "fp32"), "smoke", seed, "wrn16-1", tmp_path, progress=False)


def _trainer(ctx: DefenseContext, data: ImageSet, calls: list):
    def build():
        calls.append(1)
        model = ctx.new_model(data)
        with torch.no_grad():
            next(model.parameters()).add_(len(calls))   # weights no fresh model has
        return model
    return build


def test_cache_trains_once_and_gives_the_same_weights_back(tmp_path):
    data, calls = toy_dataset(64), []
    ctx = _context(tmp_path)
    key = {"stage": "train", "recipe": {"epochs": 1}}
    first = ModelCache.for_context(ctx, data).shared_model(key, _trainer(ctx, data, calls))
    again = ModelCache.for_context(ctx, _copy(data))
    second = again.shared_model(key, _trainer(ctx, data, calls))
    assert len(calls) == 1
    assert again.reused == [f"train (cache {again.key(key)})"]
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_misses_on_other_data_seed_recipe_or_when_disabled(tmp_path):
    data, calls = toy_dataset(64), []
    ctx = _context(tmp_path)
    key = {"stage": "train", "recipe": {"epochs": 1}}
    ModelCache.for_context(ctx, data).shared_model(key, _trainer(ctx, data, calls))
    changed = data.images.clone()
    changed[0, 0, 0, 0] ^= 1
    ModelCache.for_context(ctx, _copy(data, images=changed)).shared_model(key, _trainer(ctx, data, calls))
    ModelCache.for_context(_context(tmp_path, seed=1), data).shared_model(key, _trainer(ctx, data, calls))
    ModelCache.for_context(ctx, data).shared_model({**key, "recipe": {"epochs": 2}}, _trainer(ctx, data, calls))
    ModelCache.for_context(ctx, data, enabled=False).shared_model(key, _trainer(ctx, data, calls))
    assert len(calls) == 5


def test_a_damaged_entry_is_trained_again(tmp_path):
    data, calls = toy_dataset(64), []
    ctx = _context(tmp_path)
    key = {"stage": "train"}
    cache = ModelCache.for_context(ctx, data)
    cache.shared_model(key, _trainer(ctx, data, calls))
    (entry,) = (tmp_path / "cache" / "models").glob("*.pt")
    entry.write_bytes(b"not a checkpoint")
    cache.shared_model(key, _trainer(ctx, data, calls))
    assert len(calls) == 2 and cache.reused == []
