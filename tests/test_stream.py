"""Streamed folder datasets (train.stream): the cut, workers, resume, shards, augmentation, and
the ResNet-50 they are for; on a generated folder of JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataError, epoch_generator, normalize
from train.folder import load_folder
from train.models import build_model, count_parameters
from train.stream import augment
from train.stream import CACHE_LIMIT_BYTES, CropFlip, FolderImages, cache_bytes, \
    choose_decode, load_stream, make_loader, stream_batches

SIZE = 28  # the tests' image_size: small, so that an epoch decodes in a fraction of a second
NAMES = ("ant", "bee", "cow")
TRAIN_PER_CLASS, TEST_PER_CLASS, IMB = 80, 8, 4  # kept: 80, 40, 20


def _texture(seed: int, size=(64, 64)) -> Image.Image:
    """A smooth random RGB image (an upsampled 8x8 noise), distinct for each seed."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def write_jpegs(root: Path, names=NAMES, train_per_class=TRAIN_PER_CLASS,
                test_per_class=TEST_PER_CLASS) -> Path:
    """``root/{train,test}/<name>/NNN.jpg``: 64x64 textures, distinct for every file."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                seed = 10_000 * (split == "test") + 1000 * c + i
                _texture(seed).save(root / split / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return write_jpegs(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="module")
def data(jpegs):
    return load_stream(jpegs, imb_factor=IMB, selection="shuffled", image_size=SIZE)


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader.batches(epoch, start)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b))


def _torchvision_or_skip():
    try:
        return augment.resolve_backend("torchvision")
    except ValueError as error:
        pytest.skip(f"torchvision path not testable here: {error}")


# -- the cut and the order are the cached path's -------------------------------------------------


def test_cut_and_images_match_load_folder(jpegs, tmp_path):
    cached = load_folder(jpegs, imb_factor=IMB, selection="shuffled", cache_dir=tmp_path)
    streamed = load_stream(jpegs, imb_factor=IMB, selection="shuffled", image_size=56)
    assert streamed.counts == cached.counts == [80, 40, 20]
    assert streamed.classes == cached.classes == list(NAMES)
    assert list(streamed.train.labels) == cached.train_y.tolist()
    assert (streamed.spec.num_classes, streamed.spec.n_max) == (3, 80)
    # The test view at 56 resizes 64 -> 64 (56 * 8 // 7) and keeps the centre: the cached
    # images' pixels, image for image, in the cut's order.
    loader = make_loader(streamed.train, False, 64, image_size=56, backend="tensor")
    images = torch.cat([x for x, _ in loader.batches(0)])
    assert torch.equal(images, cached.train_x[:, :, 4:60, 4:60])


def test_training_order_is_the_cached_paths_permutation(data):
    loader = make_loader(data.train, True, 32, seed=5, image_size=SIZE)
    labels = torch.cat([y for _, y in loader.batches(2)])
    n = len(data.train.paths)
    order = torch.randperm(n, generator=epoch_generator(5, 2))
    assert torch.equal(labels, torch.tensor(data.train.labels)[order])


# -- workers, resume, shards ----------------------------------------------------------------------


def test_workers_do_not_change_the_batches(data):
    serial = make_loader(data.train, True, 32, workers=0, seed=1, image_size=SIZE)
    parallel = make_loader(data.train, True, 32, workers=2, seed=1, image_size=SIZE)
    first = _epoch(serial, 0)
    assert _same(first, _epoch(parallel, 0))
    second = _epoch(parallel, 1)  # the same (persistent) workers, a new epoch
    assert _same(_epoch(serial, 1), second)
    assert not torch.equal(first[0][0], second[0][0])  # a new order and new crops
    assert [len(y) for _, y in first] == [32, 32, 32, 32, 12]


def test_resume_mid_epoch_is_bitwise(data):
    whole = _epoch(make_loader(data.train, True, 32, seed=3, image_size=SIZE), 4)
    restarted = make_loader(data.train, True, 32, seed=3, image_size=SIZE)  # a fresh process
    assert _same(_epoch(restarted, 4, start=2), whole[2:])
    assert _epoch(restarted, 4, start=len(whole)) == []
    with pytest.raises(DataError, match="start batch 6 outside 0..5"):
        restarted.batches(4, start_batch=6)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_concatenate_to_the_one_process_batches(data, world):
    n, batch = len(data.train.paths), 46  # 140 = 3 * 46 + 2: with 3 ranks, rank 2 gets none
    one = _epoch(make_loader(data.train, True, batch, seed=2, image_size=SIZE), 0)
    ranks = [_epoch(make_loader(data.train, True, batch, seed=2, image_size=SIZE, rank=r,
                                world=world), 0) for r in range(world)]
    assert n == 140 and all(len(part) == len(one) == 4 for part in ranks)
    for whole, *parts in zip(one, *ranks):
        assert torch.equal(torch.cat([x for x, _ in parts]), whole[0])
        assert torch.equal(torch.cat([y for _, y in parts]), whole[1])
        assert max(len(y) for _, y in parts) - min(len(y) for _, y in parts) <= 1
    if world == 3:
        assert ranks[2][-1][0].shape == (0, 3, SIZE, SIZE)  # an empty part keeps its shape
    # Normalised on the device as the cached path normalises.
    loader = make_loader(data.train, True, batch, seed=2, image_size=SIZE, rank=0, world=world)
    inputs, targets = next(stream_batches(loader, data.spec, epoch=0))
    assert torch.equal(inputs, normalize(ranks[0][0][0], data.spec))
    assert inputs.dtype == torch.float32 and torch.equal(targets, ranks[0][0][1])


# -- augmentation --------------------------------------------------------------------------------


@pytest.fixture(params=["tensor", "torchvision"])
def backend(request):
    return _torchvision_or_skip() if request.param == "torchvision" else "tensor"


def test_crop_draws_follow_random_resized_crop():
    boxes = [augment.draw_crop(48, 64, augment.sample_generator(0, 0, i)) for i in range(300)]
    for b in boxes:
        assert 0 <= b.top and b.top + b.height <= 48 and 0 <= b.left and b.left + b.width <= 64
        # Rounding w and h to pixels moves area and ratio a little past the drawn ones.
        assert 0.08 * 0.8 <= b.height * b.width / (48 * 64) <= 1.0
        assert 0.75 * 0.85 <= b.width / b.height <= 4 / 3 * 1.15
    assert 100 < sum(b.flip for b in boxes) < 200
    assert len({(b.top, b.left, b.height, b.width) for b in boxes}) > 250


def test_training_view_crops_the_drawn_box_and_flips(jpegs, backend):
    image = Image.open(jpegs / "train" / "ant" / "000.jpg").convert("RGB")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    box = CropFlip(top=8, left=16, height=32, width=32, flip=False)
    view = augment.train_transform(image, 32, box, backend)  # no resampling: the box itself
    assert view.dtype == torch.uint8 and torch.equal(view, pixels[:, 8:40, 16:48])
    small = augment.train_transform(image, SIZE, box, backend)
    flipped = augment.train_transform(image, SIZE, CropFlip(8, 16, 32, 32, True), backend)
    assert small.shape == (3, SIZE, SIZE) and torch.equal(flipped, small.flip(-1))


def test_each_sample_draws_from_its_own_generator(data, backend):
    images = FolderImages(data.train, True, SIZE, seed=7, backend=backend)
    torch.manual_seed(0)
    first = images[(1, 5)][0]
    torch.manual_seed(1)  # another worker's global state
    np.random.seed(1)
    assert torch.equal(images[(1, 5)][0], first)
    assert not torch.equal(images[(2, 5)][0], first)  # another epoch, another crop
    assert not torch.equal(FolderImages(data.train, True, SIZE, seed=8, backend=backend)[(1, 5)][0],
                           first)


def test_test_view_is_deterministic_and_centred(backend):
    image = _texture(3, size=(80, 60))  # landscape: the shorter side is the height
    view = augment.test_transform(image, SIZE, backend)
    assert view.shape == (3, SIZE, SIZE) and view.dtype == torch.uint8
    assert torch.equal(view, augment.test_transform(image, SIZE, backend))
    exact = _texture(3, size=(augment.resize_size(SIZE) + 6, augment.resize_size(SIZE)))
    pixels = torch.from_numpy(np.array(exact)).permute(2, 0, 1)  # no resize: the centre only
    top, left = (augment.resize_size(SIZE) - SIZE) // 2, (pixels.shape[2] - SIZE) // 2
    assert torch.equal(augment.test_transform(exact, SIZE, backend),
                       pixels[:, top:top + SIZE, left:left + SIZE])


def test_the_two_backends_resample_alike():
    tv = _torchvision_or_skip()
    image = _texture(4, size=(80, 60))
    box = augment.draw_crop(60, 80, augment.sample_generator(0, 0, 1))
    pairs = [(augment.train_transform(image, SIZE, box, b), augment.test_transform(image, SIZE, b))
             for b in ("tensor", tv)]
    for ours, theirs in zip(*pairs):
        diff = (ours.int() - theirs.int()).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 8  # kernels round differently, no more


# -- decode choice, bad input ------------------------------------------------------------------


def test_choose_decode_streams_above_the_stated_cache_size():
    shape = (3, 224, 224)
    fits = CACHE_LIMIT_BYTES // cache_bytes(1, shape)
    assert cache_bytes(fits, shape) <= CACHE_LIMIT_BYTES < cache_bytes(fits + 1, shape)
    assert choose_decode(fits, shape) == "cache" and choose_decode(fits + 1, shape) == "stream"
    assert choose_decode(10, (3, 8, 8), limit=640) == "stream"
    assert choose_decode(10, (3, 8, 8), limit=1920) == "cache"


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_one_line(tmp_path, workers):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            _texture(1).save(tmp_path / split / name / "0.jpg")
    (tmp_path / "test" / "b" / "1.jpg").write_bytes(b"not a jpeg")
    data = load_stream(tmp_path, image_size=SIZE)  # the test split is kept whole
    loader = make_loader(data.test, False, 4, workers=workers, image_size=SIZE)
    with pytest.raises(DataError) as error:
        _epoch(loader, 0)
    assert str(error.value) == (f"{tmp_path / 'test' / 'b' / '1.jpg'}: not a readable image "
                                "(UnidentifiedImageError)")


def test_bad_arguments_are_refused(data):
    with pytest.raises(DataError, match="batch_size >= 1"):
        make_loader(data.train, True, 0)
    with pytest.raises(DataError, match="rank 2 is not one of world 2"):
        make_loader(data.train, True, 8, rank=2, world=2)
    with pytest.raises(DataError, match="workers must be >= 0"):
        make_loader(data.train, True, 8, workers=-1)
    with pytest.raises(DataError, match="image_size must be >= 1"):
        load_stream(data.train.root, image_size=0)
    with pytest.raises(ValueError, match="unknown augmentation backend 'pil'"):
        make_loader(data.train, True, 8, backend="pil")


# -- ResNet-50 ----------------------------------------------------------------------------------


def test_resnet50_size_and_output():
    model = build_model("resnet50", (3, 224, 224), 1000, seed=0)
    assert count_parameters(model) == 25_557_032
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)


def test_resnet50_is_torchvisions_network():
    try:
        from train._torchvision import import_torchvision

        reference = import_torchvision().models.resnet50()
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"no torchvision to compare with: {error}")
    model = build_model("resnet50", (3, 224, 224), 1000, seed=0)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    model.load_state_dict(theirs)  # same names and shapes: the same network on its weights
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
