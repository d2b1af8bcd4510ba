"""Long-tailed profiles, groups, class selection, the CIFAR reader, augmentation, batches."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from train import data as D
from train.data import DataError

from _cifar import write_cifar


# --------------------------------------------------------------------------------------------
# Class profile and groups


def _profile(n_max, num_classes, imb_factor):
    """The published formula, evaluated independently: n_c = int(n_max * IF^(-c / (C - 1)))."""
    return [int(n_max * (1.0 / imb_factor) ** (c / (num_classes - 1))) for c in range(num_classes)]


def test_cifar100_if100_profile():
    counts = D.class_counts(500, 100, 100)
    assert len(counts) == 100
    assert counts[0] == 500 and counts[-1] == 5
    assert sum(counts) == 10_847
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_cifar10_if100_profile():
    counts = D.class_counts(5000, 10, 100)
    assert counts[0] == 5000 and counts[-1] == 50
    assert sum(counts) == 12_406
    assert counts == _profile(5000, 10, 100)


@pytest.mark.parametrize("n_max,num_classes,imb", [(500, 100, 50), (500, 100, 10), (5000, 10, 10),
                                                     (120, 10, 20), (500, 100, 1)])
def test_profile_formula(n_max, num_classes, imb):
    assert D.class_counts(n_max, num_classes, imb) == _profile(n_max, num_classes, imb)


def test_profile_rejects_imb_below_one():
    with pytest.raises(DataError, match="imb_factor"):
        D.class_counts(500, 100, 0.5)


@pytest.mark.parametrize("eta,n_tail", [(100, 65), (20, 30)])
def test_cifar100_tail_classes(eta, n_tail):
    counts = D.class_counts(500, 100, 100)
    groups = D.split_groups(counts, eta)
    assert len(groups["tail"]) == n_tail
    assert sorted(groups["head"] + groups["tail"]) == list(range(100))
    assert all(counts[c] < eta for c in groups["tail"])
    assert all(counts[c] >= eta for c in groups["head"])


def test_tail_is_strictly_below_eta():
    groups = D.split_groups([100, 99, 100, 101], 100)
    assert groups == {"head": [0, 2, 3], "tail": [1]}


@pytest.mark.parametrize("eta", [0, -1])
def test_split_groups_rejects_bad_eta(eta):
    with pytest.raises(DataError, match="eta"):
        D.split_groups([10, 5], eta)


def test_cifar100_accuracy_splits():
    counts = D.class_counts(500, 100, 100)
    splits = D.accuracy_splits(counts, D.SPECS["cifar100"])
    many = [c for c in range(100) if counts[c] > 100]
    few = [c for c in range(100) if counts[c] < 20]
    assert splits["many"] == many and splits["few"] == few
    assert len(splits["medium"]) == 100 - len(many) - len(few)
    # Medium + Few is the eta=100 tail, Few the eta=20 tail.
    assert sorted(splits["medium"] + splits["few"]) == D.split_groups(counts, 100)["tail"]
    assert splits["few"] == D.split_groups(counts, 20)["tail"]


# --------------------------------------------------------------------------------------------
# Which images are kept


def _labels_interleaved(num_classes=5, per_class=12, seed=3):
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.RandomState(seed).shuffle(labels)
    return labels


def test_selection_first_keeps_first_in_file_order():
    labels = _labels_interleaved()
    counts = [12, 7, 4, 2, 1]
    kept = D._select(labels, counts, "first")
    expected = []
    for c, n_c in enumerate(counts):  # a plain scan over the file
        seen = [i for i, y in enumerate(labels) if y == c]
        expected += seen[:n_c]
    assert kept.tolist() == expected


def test_selection_shuffled_is_the_ldam_recipe():
    """LDAM / Saddle-SAM: np.random.seed(0), then per class (ascending) shuffle its indices."""
    labels = _labels_interleaved()
    counts = [12, 7, 4, 2, 1]
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        expected = []
        for c, n_c in zip(np.unique(labels), counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            expected += idx[:n_c].tolist()
    finally:
        np.random.set_state(saved)
    kept = D._select(labels, counts, "shuffled")
    assert kept.tolist() == expected
    assert kept.tolist() != D._select(labels, counts, "first").tolist()


def test_selection_errors():
    labels = _labels_interleaved()
    with pytest.raises(DataError, match="class 0 has 12 images"):
        D._select(labels, [13, 1, 1, 1, 1], "first")
    with pytest.raises(DataError, match="selection"):
        D._select(labels, [1] * 5, "random")


# --------------------------------------------------------------------------------------------
# Digits


def test_digits_sets():
    data = D.load_dataset("digits", imb_factor=20)
    counts = D.class_counts(120, 10, 20)
    assert data.counts == counts
    assert torch.bincount(data.train_y, minlength=10).tolist() == counts
    assert torch.bincount(data.test_y, minlength=10).tolist() == [50] * 10  # balanced
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (1, 8, 8)
    assert int(data.train_x.max()) <= 16
    assert data.test_x.shape == (500, 1, 8, 8)


# --------------------------------------------------------------------------------------------
# CIFAR files


def _image_from_row(row):
    """Slow reference of the CIFAR layout: value (ch, r, c) is row[ch * 1024 + r * 32 + c]."""
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    for ch in range(3):
        for r in range(32):
            img[ch, r, :] = row[ch * 1024 + r * 32: ch * 1024 + r * 32 + 32]
    return img


@pytest.mark.parametrize("name,n_max,imb,selection", [("cifar10", 12, 6, "first"),
                                                     ("cifar10", 12, 6, "shuffled"),
                                                     ("cifar100", 3, 3, "first")])
def test_cifar_reader(tmp_path, monkeypatch, name, n_max, imb, selection):
    monkeypatch.setitem(D.SPECS, name, dataclasses.replace(D.SPECS[name], n_max=n_max))
    written = write_cifar(tmp_path, name, train_per_class=n_max + 1, test_per_class=2)
    data = D.load_dataset(name, imb, selection=selection, data_dir=tmp_path, download=False)
    num_classes = 10 if name == "cifar10" else 100
    counts = _profile(n_max, num_classes, imb)
    assert data.counts == counts
    assert torch.bincount(data.train_y, minlength=num_classes).tolist() == counts
    assert torch.bincount(data.test_y, minlength=num_classes).tolist() == [2] * num_classes
    # the kept rows, chosen by an independent scan of the written files
    rows = []
    rng_state = np.random.RandomState(0)
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(written.train_labels == c)
        if selection == "shuffled":
            rng_state.shuffle(idx)
        rows += idx[:n_c].tolist()
    assert data.train_y.tolist() == written.train_labels[rows].tolist()
    for k in (0, len(rows) // 2, len(rows) - 1):
        assert np.array_equal(data.train_x[k].numpy(), _image_from_row(written.train_data[rows[k]]))
    assert np.array_equal(data.test_x[-1].numpy(), _image_from_row(written.test_data[-1]))
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("name,missing", [("cifar10", "data_batch_3"), ("cifar10", None),
                                          ("cifar100", "test")])
def test_cifar_missing_files(tmp_path, monkeypatch, name, missing):
    monkeypatch.setitem(D.SPECS, name, dataclasses.replace(D.SPECS[name], n_max=1))
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if missing is not None:
        write_cifar(tmp_path, name, 1, 1)
        (tmp_path / folder / missing).unlink()
    with pytest.raises(DataError) as info:
        D.load_dataset(name, 1, data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path.resolve()) in message  # where to put the files
    assert folder in message and "cifar-1" in message and ".tar.gz" in message
    if missing is not None:
        assert missing in message


class _Payload:
    """An object whose unpickling would create a folder (stands in for arbitrary code)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(D.SPECS, "cifar100", dataclasses.replace(D.SPECS["cifar100"], n_max=1))
    write_cifar(tmp_path, "cifar100", 1, 1)
    marker = tmp_path / "pwned"
    evil = {"data": np.zeros((100, 3072), np.uint8), "fine_labels": list(range(100)),
            "x": _Payload(str(marker))}
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle posix.mkdir|refusing to unpickle"):
        D.load_dataset("cifar100", 1, data_dir=tmp_path, download=False)
    assert not marker.exists()


def test_cifar_corrupt_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(D.SPECS, "cifar100", dataclasses.replace(D.SPECS["cifar100"], n_max=1))
    write_cifar(tmp_path, "cifar100", 1, 1)
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable CIFAR batch") as info:
        D.load_dataset("cifar100", 1, data_dir=tmp_path, download=False)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# Augmentation and batches


def _reference_augment(images, pad, flip, offsets, flips):
    """Per image: zero-pad, crop at (offsets[i, 0], offsets[i, 1]), then maybe flip."""
    out = []
    for i, img in enumerate(images.numpy()):
        _, h, w = img.shape
        padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[:, top:top + h, left:left + w]
        if flip and bool(flips[i]):
            crop = crop[:, :, ::-1]
        out.append(crop)
    return np.stack(out)


@pytest.mark.parametrize("pad,flip", [(4, True), (1, False), (0, True), (2, True), (3, False)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(9, 3, 32, 32), (5, 1, 7, 6), (1, 2, 5, 9)])
def test_augment_equals_per_image_reference(pad, flip, dtype, shape):
    gen = torch.Generator().manual_seed(11)
    images = (torch.arange(int(np.prod(shape))).reshape(shape) % 251 + 1).to(dtype)
    # the draws augment makes: offsets (B, 2) in [0, 2 pad], then B uniforms for the flips
    twin = torch.Generator().set_state(gen.get_state())
    offsets = torch.randint(0, 2 * pad + 1, (shape[0], 2), generator=twin)
    flips = torch.rand(shape[0], generator=twin) < 0.5
    out = D.augment(images, pad, flip, gen)
    assert out.dtype == dtype and out.shape == images.shape and out.device == images.device
    assert out.is_contiguous()
    expected = _reference_augment(images, pad, flip, offsets, flips)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_augment_is_random_per_image():
    img = torch.arange(3 * 32 * 32, dtype=torch.int64).reshape(1, 3, 32, 32) % 200 + 1
    batch = img.repeat(256, 1, 1, 1).to(torch.uint8)
    out = D.augment(batch, 4, True, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 100  # 81 offsets x 2 flips: most of the 256 copies differ
    flipped = sum(bool((o == batch[0].flip(2)).all()) for o in D.augment(
        batch, 0, True, torch.Generator().manual_seed(1)))
    assert 80 < flipped < 176  # about half (binomial 256, 1/2: 6 sigma is +-48)
    other = D.augment(batch, 4, True, torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)  # another seed, other draws
    again = D.augment(batch, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # and the same seed, the same draws


@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.slow
def test_augment_stays_on_device(device):
    images = torch.zeros(4, 3, 8, 8, dtype=torch.float16, device=device)
    out = D.augment(images, 2, True, torch.Generator().manual_seed(0))
    assert out.device.type == device and out.dtype == torch.float16 and out.shape == images.shape


def test_train_batches_cover_the_epoch():
    spec = D.SPECS["digits"]
    n = 70
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    y = torch.arange(n) % 10
    data = D.LongTailData(spec, x, y, x[:10], y[:10], [7] * 10)
    batches = list(D.train_batches(data, 32, D.epoch_generator(1, 0), augmentation=False))
    assert [len(t) for _, t in batches] == [32, 32, 6]  # the last batch is short
    inputs = torch.cat([b for b, _ in batches])
    targets = torch.cat([t for _, t in batches])
    # un-normalise the centre pixel to recover each image's index: a permutation of 0..n-1
    ids = (inputs[:, 0, 4, 4] * spec.std[0] + spec.mean[0]) * spec.pixel_scale
    ids = ids.round().long()
    assert sorted(ids.tolist()) == list(range(n))
    assert torch.equal(targets, ids % 10)  # images and labels stay paired
    assert ids.tolist() != list(range(n))  # shuffled
    again = list(D.train_batches(data, 32, D.epoch_generator(1, 0), augmentation=False))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again))
    other = list(D.train_batches(data, 32, D.epoch_generator(1, 1), augmentation=False))
    assert not torch.equal(batches[0][0], other[0][0])


def test_normalize():
    spec = D.SPECS["cifar10"]
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = D.normalize(images, spec)
    ref = images.double() / 255.0
    for ch in range(3):
        ref[:, ch] = (ref[:, ch] - spec.mean[ch]) / spec.std[ch]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
