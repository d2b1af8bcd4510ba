"""Image-folder and list-file datasets (train.folder): layout, profile cut, cache, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _folders import pixels as _pixels
from _folders import write_folder
from train import folder
from train.data import DataError, class_counts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_folder_profile_first_keeps_sorted_file_order(tmp_path, cache):
    root = write_folder(tmp_path / "data")
    data = folder.load_folder(root, imb_factor=3, cache_dir=cache)
    assert data.classes == ["a_dog", "b_cat", "c_emu"]  # sorted names are the labels
    assert data.counts == class_counts(6, 3, 3) == [6, 3, 2]
    assert data.train_y.tolist() == [0] * 6 + [1] * 3 + [2] * 2
    # "first" = the first n_c files in sorted name order, decoded exactly (PNG is lossless).
    expected = [_pixels(c, i) for c, n in enumerate(data.counts) for i in range(n)]
    assert torch.equal(data.train_x, torch.from_numpy(np.stack(expected).transpose(0, 3, 1, 2)))
    assert data.test_x.shape == (6, 3, 8, 8) and data.test_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_shuffled_selection_matches_cifar_rule(tmp_path, cache):
    root = write_folder(tmp_path / "data")
    data = folder.load_folder(root, imb_factor=3, selection="shuffled", cache_dir=cache)
    rng = np.random.RandomState(0)  # the LDAM rule: one RandomState(0), class after class
    expected = []
    for c, n in enumerate([6, 3, 2]):
        index = np.arange(6)
        rng.shuffle(index)
        expected += [_pixels(c, i) for i in index[:n]]
    assert torch.equal(data.train_x, torch.from_numpy(np.stack(expected).transpose(0, 3, 1, 2)))


def test_normalisation_statistics_are_the_kept_training_images(tmp_path, cache):
    data = folder.load_folder(write_folder(tmp_path / "data"), imb_factor=3, cache_dir=cache)
    pixels = data.train_x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(data.spec.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(data.spec.std, pixels.std(axis=(0, 2, 3)), rtol=1e-12)
    assert data.spec.num_classes == 3 and data.spec.image_shape == (3, 8, 8)


def test_list_files_are_kept_as_they_are(tmp_path, cache):
    root = write_folder(tmp_path / "data", per_class=(5, 1, 3))
    train = "\n".join([f"train/a_dog/{i:03d}.png 0" for i in range(5)]
                      + ["", "train/b_cat/000.png 1"]
                      + [f"train/c_emu/{i:03d}.png 2" for i in range(3)])
    (tmp_path / "train.txt").write_text(train + "\n")
    (tmp_path / "test.txt").write_text("test/c_emu/000.png 2\ntest/a_dog/001.png 0\n"
                                       "test/b_cat/000.png 1\n")
    data = folder.load_folder(root, imb_factor=100, train_list=tmp_path / "train.txt",
                              test_list=tmp_path / "test.txt", cache_dir=cache)
    assert data.counts == [5, 1, 3] and data.classes == ["0", "1", "2"]
    assert data.train_y.tolist() == [0] * 5 + [1] + [2] * 3
    assert data.test_y.tolist() == [2, 0, 1]
    assert torch.equal(data.test_x[0], torch.from_numpy(_pixels(102, 0).transpose(2, 0, 1)))


def test_image_size_resizes_mixed_sizes(tmp_path, cache):
    root = write_folder(tmp_path / "data", size=(8, 8))
    Image.fromarray(_pixels(0, 99, (12, 16))).save(root / "train" / "a_dog" / "zzz.png")
    with pytest.raises(DataError, match=r"zzz.png: size 12x16 differs from 8x8.*--image_size"):
        folder.load_folder(root, cache_dir=cache)
    data = folder.load_folder(root, image_size=4, cache_dir=cache)
    assert data.train_x.shape[1:] == (3, 4, 4) and data.spec.pad == 1


def test_cache_is_used_and_keyed_by_mtimes(tmp_path, cache, monkeypatch):
    root = write_folder(tmp_path / "data")
    first = folder.load_folder(root, imb_factor=3, cache_dir=cache)
    assert len(list(cache.glob("images-*.npz"))) == 2 and not list(cache.glob(".*tmp"))
    decoded = []
    real = folder._decode
    monkeypatch.setattr(folder, "_decode", lambda *a: decoded.append(a) or real(*a))
    again = folder.load_folder(root, imb_factor=3, cache_dir=cache)
    assert decoded == [] and torch.equal(first.train_x, again.train_x)
    changed = root / "train" / "a_dog" / "000.png"
    Image.fromarray(_pixels(7, 7)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new mtime (and content): the cache must not be reused
    fresh = folder.load_folder(root, imb_factor=3, cache_dir=cache)
    assert len(decoded) == 18  # the training split decoded again; the test split was cached
    assert torch.equal(fresh.train_x[0], torch.from_numpy(_pixels(7, 7).transpose(2, 0, 1)))


def test_damaged_cache_is_decoded_again(tmp_path, cache):
    root = write_folder(tmp_path / "data")
    first = folder.load_folder(root, cache_dir=cache)
    for path in cache.glob("images-*.npz"):
        path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(folder.load_folder(root, cache_dir=cache).train_x, first.train_x)


@pytest.mark.parametrize("damage, message", [
    (lambda r: [p.unlink() for p in r.glob("train/*/*")], r"train: no images"),
    (lambda r: (r / "train" / "b_cat" / "001.png").write_bytes(b"not an image"),
     r"b_cat/001.png: not a readable image"),
    (lambda r: [p.unlink() for p in r.glob("test/c_emu/*")], r"class 'c_emu' has no test images"),
    (lambda r: (r / "test" / "zebra").mkdir(), r"class 'zebra' has no training folder"),
])
def test_bad_folders_are_one_clear_error(tmp_path, cache, damage, message):
    root = write_folder(tmp_path / "data")
    damage(root)
    with pytest.raises(DataError, match=message):
        folder.load_folder(root, cache_dir=cache)


def test_class_left_empty_by_the_cut(tmp_path, cache):
    root = write_folder(tmp_path / "data", per_class=(4, 4, 4))
    with pytest.raises(DataError, match=r"class 'c_emu' has no image left after the cut to "
                                        r"imbalance factor 10"):
        folder.load_folder(root, imb_factor=10, cache_dir=cache)


@pytest.mark.parametrize("train, test, message", [
    ("train/a_dog/001.png 0\ntrain/a_dog/000.png -1", "test/a_dog/000.png 0",
     r"train.txt:2: label -1 out of range"),
    ("train/a_dog/001.png 0\ntrain/a_dog/000.png", "test/a_dog/000.png 0",
     r"train.txt:2: expected 'relative/path label'"),
    ("train/a_dog/001.png 0\ntrain/a_dog/000.png x", "test/a_dog/000.png 0",
     r"train.txt:2: expected 'relative/path label'"),
    ("train/a_dog/000.png 0\ntrain/b_cat/000.png 1", "test/a_dog/000.png 0\ntest/c_emu/000.png 2",
     r"test.txt:2: label 2 out of range \(the training list has 0..1\)"),
    ("train/a_dog/000.png 0\ntrain/b_cat/000.png 2", "test/a_dog/000.png 0",
     r"class '1' has no training images"),  # a gap in the labels is an empty class
])
def test_bad_list_files(tmp_path, cache, train, test, message):
    root = write_folder(tmp_path / "data")
    (tmp_path / "train.txt").write_text(train + "\n")
    (tmp_path / "test.txt").write_text(test + "\n")
    with pytest.raises(DataError, match=message):
        folder.load_folder(root, train_list=tmp_path / "train.txt",
                           test_list=tmp_path / "test.txt", cache_dir=cache)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason=f"real CIFAR-10 archive not found at {SHARED} "
                    "(only the project's shared data folder has it)")
def test_real_cifar10_lt_from_the_jpeg_archive(tmp_path):
    import tarfile

    with tarfile.open(SHARED) as tar:
        tar.extractall(tmp_path / "cifar10", filter="data")
    data = folder.load_folder(tmp_path / "cifar10", imb_factor=100, cache_dir=tmp_path / "cache")
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]
    assert data.counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(data.train_y) == 12406 and data.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    # "first" keeps each class's files in name order: the last kept truck is 0049.jpg.
    last = np.asarray(Image.open(tmp_path / "cifar10" / "train" / "truck" / "0049.jpg"))
    assert torch.equal(data.train_x[-1], torch.from_numpy(last.transpose(2, 0, 1).copy()))
