"""Augmentation: vectorised crops/flips against per-sample loops, normalisation,
the CIFAR- and ImageNet-style pipelines (shapes, ranges, determinism)."""
import json

import numpy as np
import pytest

from tinynorm.datasets import CifarAugment, ImageNetAugment, Normalize, PixelNormalizer
from tinynorm.datasets.augment import (crop_batch, crop_batch_reference, flip_batch,
                                       flip_batch_reference)


def images(rng, n=6, c=3, h=32, w=32):
    return rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)


@pytest.mark.parametrize("shape, crop", [((5, 3, 32, 32), (28, 28)), ((4, 1, 9, 13), (5, 7)),
                                         ((3, 2, 6, 6), (6, 6)), ((7, 3, 10, 10), (1, 1))])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_crop_batch_matches_reference(rng, shape, crop, dtype):
    x = rng.integers(0, 256, shape).astype(dtype)
    n, _, h, w = shape
    top = rng.integers(0, h - crop[0] + 1, n)
    left = rng.integers(0, w - crop[1] + 1, n)
    got = crop_batch(x, top, left, *crop)
    assert got.shape == (n, shape[1]) + crop and got.dtype == dtype
    np.testing.assert_array_equal(got, crop_batch_reference(x, top, left, *crop))


def test_flip_batch_matches_reference(rng):
    x = rng.standard_normal((8, 3, 5, 7)).astype(np.float32)
    mask = rng.random(8) < 0.5
    mask[:2] = [True, False]
    expected = flip_batch_reference(x, mask)
    np.testing.assert_array_equal(flip_batch(x.copy(), mask), expected)
    np.testing.assert_array_equal(expected[0], x[0, :, :, ::-1])
    np.testing.assert_array_equal(expected[1], x[1])


def test_pixel_normalizer_fit_and_round_trip(rng):
    x = images(rng, n=50, c=3, h=5, w=4)
    x[:, 0, 0, 0] = 7  # a constant pixel: std floored at min_std
    norm = PixelNormalizer.fit(x, min_std=1.0, chunk=16)  # several chunks
    assert norm.mean.shape == (3, 5, 4) and norm.mean.dtype == np.float32
    np.testing.assert_allclose(norm.mean, x.mean(axis=0), rtol=1e-6)
    expected_std = np.maximum(x.astype(np.float64).std(axis=0), 1.0)
    np.testing.assert_allclose(norm.std, expected_std, rtol=1e-5)
    assert norm.std[0, 0, 0] == 1.0
    z = norm(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, 1:].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, 1:].std(axis=0), 1, rtol=1e-4)
    state = json.loads(json.dumps(norm.to_dict()))
    assert PixelNormalizer.from_dict(state) == norm  # exact: float32 survives JSON
    with pytest.raises(ValueError, match="fitted on"):
        norm(x[:, :, :4])


def test_cifar_train_shapes_determinism_and_content(rng):
    x = images(rng, n=16)
    norm = PixelNormalizer.fit(x)
    aug = CifarAugment(norm, crop=28, train=True)
    out = aug(x, np.random.default_rng(7))
    assert out.shape == (16, 3, 28, 28) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, aug(x, np.random.default_rng(7)))
    assert not np.array_equal(out, aug(x, np.random.default_rng(8)))
    # same draws, done the slow way: normalise, crop at the offsets, mirror
    draw = np.random.default_rng(7)
    top, left = draw.integers(0, 5, 16), draw.integers(0, 5, 16)
    mirror = draw.random(16) < 0.5
    expected = flip_batch_reference(crop_batch_reference(norm(x), top, left, 28, 28), mirror)
    np.testing.assert_allclose(out, expected, rtol=0, atol=0)
    assert 0 < mirror.sum() < 16


def test_cifar_test_is_centre_crop(rng):
    x = images(rng)
    mean, std = np.float32(120.0), np.float32(60.0)
    out = CifarAugment(mean, std, crop=28, train=False)(x)
    np.testing.assert_allclose(out, (x[:, :, 2:30, 2:30] - 120.0) / 60.0, rtol=1e-6)
    per_channel = CifarAugment(np.array([1.0, 2, 3]), np.array([2.0, 4, 8]), crop=30, train=False)
    np.testing.assert_allclose(per_channel(x)[:, 2], (x[:, 2, 1:31, 1:31].astype(float) - 3) / 8, rtol=1e-6)


def test_cifar_padding_for_fashion_mnist(rng):
    x = images(rng, n=32, c=1, h=28, w=28)
    norm = PixelNormalizer.fit(x)
    # test: centre 28x28 of the 32x32 padded image is the image itself
    test_out = CifarAugment(norm, crop=28, pad=2, train=False)(x)
    np.testing.assert_allclose(test_out, norm(x), rtol=1e-6)
    train_out = CifarAugment(norm, crop=28, pad=2, train=True)(x, np.random.default_rng(1))
    assert train_out.shape == (32, 1, 28, 28)
    # shifted crops carry zero (= mean) borders; the centred ones none
    draw = np.random.default_rng(1)
    top, left = draw.integers(0, 5, 32), draw.integers(0, 5, 32)
    shifted = (top != 2) | (left != 2)
    assert shifted.any()
    padded = np.pad(norm(x), ((0, 0), (0, 0), (2, 2), (2, 2)))
    mirror = draw.random(32) < 0.5
    np.testing.assert_array_equal(
        train_out, flip_batch_reference(crop_batch_reference(padded, top, left, 28, 28), mirror))
    i = int(np.flatnonzero(top == 0)[0])
    assert np.all(train_out[i, :, :2] == 0)


def test_no_augmentation_and_errors(rng):
    x = images(rng, n=3)
    np.testing.assert_allclose(Normalize(0, 255)(x), x / 255.0, rtol=1e-6)
    norm = PixelNormalizer.fit(x)
    np.testing.assert_allclose(Normalize(norm)(x), norm(x))
    no_flip = CifarAugment(norm, crop=None, train=True, flip=False)
    np.testing.assert_allclose(no_flip(x, np.random.default_rng(0)), norm(x))
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        CifarAugment(norm, crop=28)(x)
    with pytest.raises(TypeError, match="uint8"):
        CifarAugment(norm, crop=28)(x.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="larger than"):
        CifarAugment(norm, crop=40, train=False)(x)


def test_imagenet_train_ranges_and_determinism(rng):
    x = images(rng, n=5, h=64, w=64)
    aug = ImageNetAugment(crop=48, train=True)
    out = aug(x, np.random.default_rng(3))
    assert out.shape == (5, 3, 48, 48) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.9 and out.max() > 0.9  # still spans the range
    np.testing.assert_array_equal(out, aug(x, np.random.default_rng(3)))
    assert not np.array_equal(out, aug(x, np.random.default_rng(4)))
    # without colour distortion: exactly crop + flip + [-1, 1]
    plain = ImageNetAugment(crop=48, train=True, color=False)(x, np.random.default_rng(3))
    draw = np.random.default_rng(3)
    top, left = draw.integers(0, 17, 5), draw.integers(0, 17, 5)
    mirror = draw.random(5) < 0.5
    expected = flip_batch_reference(crop_batch_reference(x, top, left, 48, 48), mirror)
    np.testing.assert_allclose(plain, expected / 127.5 - 1, atol=1e-6)
    assert not np.allclose(out, plain, atol=1e-3)  # colour distortion changed something


def test_imagenet_colour_reference(rng):
    """The vectorised distortion against a per-image float64 loop of the documented formulas."""
    x = images(rng, n=4, h=20, w=20)
    out = ImageNetAugment(crop=20, train=True, flip=False)(x, np.random.default_rng(9))
    draw = np.random.default_rng(9)
    draw.integers(0, 1, 4), draw.integers(0, 1, 4), draw.random(4)
    delta = draw.uniform(-32 / 255, 32 / 255, 4)
    sat, con = draw.uniform(0.5, 1.5, 4), draw.uniform(0.5, 1.5, 4)
    for i in range(4):
        v = x[i].astype(np.float64) / 255 + delta[i]
        grey = np.tensordot([0.299, 0.587, 0.114], v, axes=1)
        v = grey + sat[i] * (v - grey)
        m = v.mean(axis=(1, 2), keepdims=True)
        v = np.clip(m + con[i] * (v - m), 0, 1)
        np.testing.assert_allclose(out[i], 2 * v - 1, atol=1e-5)


def test_imagenet_test_centre_crop(rng):
    x = images(rng, n=2, h=256, w=256)
    out = ImageNetAugment(crop=224, train=False)(x)
    assert out.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(out, x[:, :, 16:240, 16:240] / 127.5 - 1, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1


def test_make_transforms(rng):
    from tinynorm.datasets import ArraySplit, make_transforms
    split = ArraySplit(images(rng, n=20, c=1, h=28, w=28), rng.integers(0, 10, 20), 10)
    train, test, norm = make_transforms("fashion-mnist", split, pad=2)
    assert norm == PixelNormalizer.fit(split.images)
    x = split.images[:4]
    assert train(x, np.random.default_rng(0)).shape == (4, 1, 28, 28)
    np.testing.assert_allclose(test(x, None), norm(x), rtol=1e-6)
    same, test2, _ = make_transforms("fashion-mnist", split, augment=False, pad=2)
    np.testing.assert_array_equal(same(x, np.random.default_rng(0)), test2(x, None))
    tr, te, none = make_transforms("imagenet", None, crop=16)
    big = images(rng, n=2, h=24, w=24)
    assert none is None and te(big, None).shape == (2, 3, 16, 16)
    assert tr(big, np.random.default_rng(0)).max() <= 1
    with pytest.raises(ValueError, match="no transforms"):
        make_transforms("mnist", split)
