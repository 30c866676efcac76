import io
import tarfile

import pytest
import torch
from PIL import Image

from conftest import requires_cifar, data_root
from unpoison.data import DataFormatError, DatasetNotFound, load_dataset, load_image_folder, read_image_folder
from unpoison.data import datasets as datasets_module


def png_bytes(color=(255, 0, 0), size=(8, 8), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, per_class=3):
    for name, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(color))
    return root


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    data = read_image_folder(make_folder(tmp_path / "ds"), image_size=8)
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[0, 0, 0, 0] == 200 and data.images[3, 1, 0, 0] == 200


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "truncated.png").write_bytes(png_bytes()[:40])
    data = read_image_folder(root, image_size=8)
    assert len(data) == 6
    reasons = "\n".join(data.skipped)
    assert "broken.jpg" in reasons and "empty.png" in reasons and "truncated.png" in reasons


def test_images_of_any_size_and_mode_are_converted(tmp_path):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "a" / "big.png").write_bytes(png_bytes(size=(100, 60)))
    (root / "a" / "gray.png").write_bytes(png_bytes(color=128, mode="L"))
    (root / "a" / "alpha.png").write_bytes(png_bytes(color=(0, 0, 0, 0), mode="RGBA"))
    data = read_image_folder(root, image_size=32)
    assert data.images.shape == (3, 3, 32, 32)
    alpha = data.paths.index("a/alpha.png")
    assert data.images[alpha].min() == 255  # transparent composited on white


def test_archive_with_unsafe_members_is_read_without_extracting(tmp_path):
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train/cat/0.png", "train/dog/0.png", "../evil/0.png", "/abs/0.png"):
            blob = png_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = read_image_folder(archive, split="train", image_size=8)
    assert data.classes == ["cat", "dog"] and len(data) == 2
    assert sum("unsafe path" in s for s in data.skipped) == 2
    assert not (tmp_path / "evil").exists()


def test_symlink_outside_the_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "ds")
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (root / "cat" / "link.png").symlink_to(outside)
    data = read_image_folder(root, image_size=8)
    assert len(data) == 6
    assert any("symlink" in s for s in data.skipped)


def test_decompression_bomb_is_skipped(tmp_path):
    root = make_folder(tmp_path / "ds")
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 Mpx, tiny file
    (root / "cat" / "bomb.png").write_bytes(buf.getvalue())
    data = read_image_folder(root, image_size=8)
    assert len(data) == 6 and any("bomb" in s for s in data.skipped)


def test_folder_without_classes_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no class folders"):
        read_image_folder(tmp_path / "empty")


def test_decoded_folder_is_cached(tmp_path):
    root = make_folder(tmp_path / "ds")
    first = load_image_folder(root, image_size=8)
    (root / "cat" / "0.png").write_bytes(png_bytes((1, 2, 3)))  # content changes -> new key
    second = load_image_folder(root, image_size=8)
    again = load_image_folder(root, image_size=8)
    assert not torch.equal(first.images, second.images)
    assert torch.equal(second.images, again.images) and again.paths == second.paths


def test_offline_data_root_without_cifar_gives_the_documented_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("cifar10", "train", tmp_path)
    message = str(err.value)
    assert "cifar10-jpeg.tar.gz" in message and str(tmp_path) in message and "UNPOISON_DATA" in message


@requires_cifar
def test_cifar10_from_the_shared_archive():
    train = load_dataset("cifar10", "train", data_root())
    test = load_dataset("cifar10", "test", data_root())
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.classes == datasets_module.CIFAR10_CLASSES
    assert torch.bincount(train.labels).tolist() == [5000] * 10
