"""Augmentation: callables mapping a uint8 NCHW batch to a float32 NCHW batch.

Every transform is called as ``transform(images, rng)``:

    images  uint8 (N, C, H, W)
    rng     numpy.random.Generator (ignored, and may be None, by test-time transforms)
    ->      float32 (N, C, h, w), C-contiguous

A transform keeps no state between calls: everything random is drawn from
``rng``, so a batch's result depends only on the images and the generator
(``BatchIterator`` hands every batch its own seeded generator).  Crops and
flips are vectorised over the batch (a gather through
``sliding_window_view``; a masked reversed slice); ``crop_batch_reference``
and ``flip_batch_reference`` are the slow per-sample loops the tests hold
them equal to.

The paper's two pipelines (Gitman & Ginsburg 2017):

* footnote 3, CIFAR-10: "a random crop of size 28x28 and random horizontal
  flips" for training, "the central 28x28 crop" for testing; inputs
  "normalized by subtracting mean and dividing by standard deviation
  independently for each pixel" -> ``PixelNormalizer`` + ``CifarAugment``.
* footnote 4 / Section 5, ImageNet: images rescaled to 256x256, random
  224x224 crops, "random color distortions and horizontal flips", inputs in
  [-1, 1]; test: the central 224x224 crop -> ``ImageNetAugment``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "crop_batch", "crop_batch_reference", "flip_batch", "flip_batch_reference",
    "PixelNormalizer", "Normalize", "CifarAugment", "ImageNetAugment", "make_transforms",
]


# ----------------------------------------------------------------------------
# crops and flips


def crop_batch(images, top, left, height, width):
    """Per-sample crops, vectorised.

    Parameters
    ----------
    images : (N, C, H, W) array of any dtype
    top, left : int (N,) offsets, 0 <= top <= H - height, 0 <= left <= W - width
    height, width : int, the crop size

    Returns
    -------
    (N, C, height, width) array (a new array, same dtype)
    """
    n = images.shape[0]
    top = np.asarray(top, dtype=np.intp)
    left = np.asarray(left, dtype=np.intp)
    if top.shape != (n,) or left.shape != (n,):
        raise ValueError(f"top/left must have shape ({n},), got {top.shape} and {left.shape}")
    # windows: (N, C, H-height+1, W-width+1, height, width), a view, nothing copied
    windows = sliding_window_view(images, (height, width), axis=(2, 3))
    # advanced indices on axes 0, 2, 3 (split by the slice on axis 1) put the
    # batch axis first: result (N, C, height, width)
    return windows[np.arange(n), :, top, left]


def crop_batch_reference(images, top, left, height, width):
    """Slow, obviously correct ``crop_batch``: one slice per sample."""
    out = np.empty(images.shape[:2] + (height, width), dtype=images.dtype)
    for i in range(images.shape[0]):
        out[i] = images[i, :, top[i]:top[i] + height, left[i]:left[i] + width]
    return out


def flip_batch(images, mask):
    """Mirror (left-right) the samples where ``mask`` is true, in place.

    Parameters
    ----------
    images : (N, C, H, W) array, modified in place and returned
    mask : bool (N,)
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.any():
        images[mask] = images[mask][..., ::-1]
    return images


def flip_batch_reference(images, mask):
    """Slow ``flip_batch`` on a copy: one reversed slice per sample."""
    out = images.copy()
    for i in range(images.shape[0]):
        if mask[i]:
            out[i] = images[i, :, :, ::-1]
    return out


def _check_batch(images, name):
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"{name} expects a uint8 (N, C, H, W) numpy array, got "
                        f"{getattr(images, 'dtype', type(images))} "
                        f"{getattr(images, 'shape', '')}")


# ----------------------------------------------------------------------------
# per-pixel normalisation (CIFAR-style)


class PixelNormalizer:
    """Per-pixel mean/std normalisation: x -> (x - mean[c, i, j]) / std[c, i, j].

    ``mean`` and ``std`` (float32 (C, H, W), in pixel units 0..255) are
    computed over the *full* training images.  The CIFAR-style pipeline
    normalises the full image first and crops afterwards, so each crop pixel
    is normalised with the statistics of the source pixel it came from (a
    crop's mean moves with the crop, as in Caffe's mean-file handling);
    flipping after normalising mirrors the statistics with the image.

    ``min_std`` floors the standard deviation so a pixel that is (nearly)
    constant over the training set does not divide by ~0.  It is 1 grey
    level by default, which leaves CIFAR-10 untouched; note that
    Fashion-MNIST's border pixels have per-pixel std as low as 0.09, so with
    the default a rare non-zero border pixel normalises to |x| up to ~150.
    A larger ``min_std`` (e.g. 10-20) tames that, at the price of leaving the
    paper's recipe.
    """

    def __init__(self, mean, std, min_std=None):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if self.mean.shape != self.std.shape or self.mean.ndim != 3:
            raise ValueError(f"mean and std must both be (C, H, W), got {self.mean.shape} "
                             f"and {self.std.shape}")
        if not (np.all(np.isfinite(self.mean)) and np.all(self.std > 0)):
            raise ValueError("mean must be finite and std positive")
        self.min_std = min_std

    @classmethod
    def fit(cls, images, min_std=1.0, chunk=8192):
        """Per-pixel mean and std of a training set.

        Parameters
        ----------
        images : uint8 (N, C, H, W) array, or a Split (read in chunks of ``chunk``)
        min_std : float, lower bound on std, in pixel units

        Returns
        -------
        PixelNormalizer with mean, std float32 (C, H, W)
        """
        n = len(images)
        if n == 0:
            raise ValueError("cannot fit a normaliser on an empty set")
        total = total_sq = None
        for start in range(0, n, chunk):
            if isinstance(images, np.ndarray):
                block = images[start:start + chunk]
            else:
                block = images.get_batch(np.arange(start, min(start + chunk, n)))[0]
            block = block.astype(np.float64)
            # sums of integers < 2**53: exact in float64
            s, sq = block.sum(axis=0), np.square(block).sum(axis=0)
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
        mean = total / n
        var = np.maximum(total_sq / n - np.square(mean), 0.0)
        std = np.maximum(np.sqrt(var), min_std)
        return cls(mean, std, min_std=min_std)

    def __call__(self, images):
        """uint8 or float (N, C, H, W) -> float32 (N, C, H, W), normalised per pixel."""
        if images.shape[1:] != self.mean.shape:
            raise ValueError(f"images are {images.shape[1:]}, the normaliser was fitted on "
                             f"{self.mean.shape}")
        out = images.astype(np.float32)
        out -= self.mean
        out /= self.std
        return out

    def to_dict(self):
        """JSON-serialisable state (nested lists of float32 values, exact on round trip)."""
        return {"kind": "per-pixel", "shape": list(self.mean.shape),
                "mean": self.mean.tolist(), "std": self.std.tolist(), "min_std": self.min_std}

    @classmethod
    def from_dict(cls, state):
        if state.get("kind", "per-pixel") != "per-pixel":
            raise ValueError(f"not a PixelNormalizer state: kind={state.get('kind')!r}")
        return cls(state["mean"], state["std"], min_std=state.get("min_std"))

    def __eq__(self, other):
        return (isinstance(other, PixelNormalizer) and np.array_equal(self.mean, other.mean)
                and np.array_equal(self.std, other.std))

    __hash__ = None


def _mean_std(mean, std):
    """mean/std as float32 arrays broadcastable to (C, H, W): a normaliser, arrays or scalars."""
    if isinstance(mean, PixelNormalizer):
        if std is not None:
            raise ValueError("pass either a PixelNormalizer or mean and std, not both")
        return mean.mean, mean.std
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if mean.ndim == 1:  # per channel (C,) -> (C, 1, 1)
        mean = mean[:, None, None]
    if std.ndim == 1:
        std = std[:, None, None]
    if np.any(std <= 0):
        raise ValueError("std must be positive")
    return mean, std


class Normalize:
    """No augmentation: ``(x - mean) / std`` as float32, nothing cropped or flipped.

    ``Normalize(normalizer)`` or ``Normalize(mean, std)`` with mean/std
    float32 (C, H, W), (C,) or scalars (``Normalize(0, 255)`` maps to [0, 1]).
    """

    def __init__(self, mean, std=None):
        self.mean, self.std = _mean_std(mean, std)

    def __call__(self, images, rng=None):
        _check_batch(images, "Normalize")
        out = images.astype(np.float32)
        out -= self.mean
        out /= self.std
        return out

    def __repr__(self):
        return f"Normalize(mean {self.mean.shape}, std {self.std.shape})"


class CifarAugment:
    """The paper's CIFAR-10 pipeline (footnote 3), with optional zero padding.

    Training: normalise per pixel, zero-pad by ``pad`` on each side, take a
    random ``crop`` x ``crop`` window (offsets uniform over every position) and
    mirror it with probability 1/2.  Test (``train=False``): the same, but the
    central window and no flip.

    Padding happens *after* normalisation, so padded pixels are 0 in the
    normalised space (the training-set mean of that position, in pixel
    terms).  Fashion-MNIST in the cpu presets uses ``pad=2, crop=28``: a
    random 28x28 crop of the image zero-padded to 32x32; its test transform is
    then the unpadded image itself.

    Parameters
    ----------
    mean, std : a PixelNormalizer (and std=None), or float32 arrays of shape
        (C, H, W) of the unpadded image, (C,), or scalars
    crop : int, or None for no crop
    pad : int >= 0
    train : bool
    flip : bool, random horizontal flips when training

    Call: ``(images uint8 (N, C, H, W), rng) -> float32 (N, C, crop, crop)``.
    Random draws, in order: top offsets (N,), left offsets (N,), flip (N,).
    """

    def __init__(self, mean, std=None, crop=28, pad=0, train=True, flip=True):
        self.mean, self.std = _mean_std(mean, std)
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.crop, self.pad, self.train, self.flip = crop, int(pad), bool(train), bool(flip)

    def __call__(self, images, rng=None):
        _check_batch(images, "CifarAugment")
        n, _, h, w = images.shape
        x = images.astype(np.float32)
        x -= self.mean
        x /= self.std
        if self.pad:
            p = self.pad
            x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
            h, w = h + 2 * p, w + 2 * p
        if self.crop is None:
            ch, cw = h, w
        else:
            ch = cw = int(self.crop)
            if ch > h or cw > w:
                raise ValueError(f"crop {ch} is larger than the (padded) image {h}x{w}")
        if self.train:
            if rng is None:
                raise ValueError("a training transform needs a numpy Generator")
            top = rng.integers(0, h - ch + 1, size=n)
            left = rng.integers(0, w - cw + 1, size=n)
            mirror = rng.random(n) < 0.5
            out = crop_batch(x, top, left, ch, cw) if (ch, cw) != (h, w) else x
            if self.flip:
                flip_batch(out, mirror)
        else:
            t, l = (h - ch) // 2, (w - cw) // 2
            out = x[:, :, t:t + ch, l:l + cw]
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self):
        return (f"CifarAugment(crop={self.crop}, pad={self.pad}, train={self.train}, "
                f"flip={self.flip})")


# ----------------------------------------------------------------------------
# ImageNet-style


# ITU-R BT.601 luma weights (what PIL's convert("L") and TF's rgb_to_grayscale use)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageNetAugment:
    """The paper's ImageNet pipeline (Section 5): crop, colour distortion, flip, [-1, 1].

    Input images are the 256x256 prepared ones (``data/prepare_imagenet.py``).

    Training: a random ``crop`` x ``crop`` window; pixel values to [0, 1];
    mirror with probability 1/2; then, if ``color``, per image and in this
    order (the order of TensorFlow's Inception ``distort_color``, without hue):

        brightness  x += d,                     d ~ U(-brightness, brightness)
        saturation  x = g + s (x - g),          s ~ U(saturation),  g = luma(x)
        contrast    x = m_c + k (x - m_c),      k ~ U(contrast),    m_c = channel mean

    then clip to [0, 1] and map to [-1, 1] by 2x - 1.  The paper only says
    "random color distortions"; these ranges are TensorFlow's (32/255,
    [0.5, 1.5], [0.5, 1.5]).  Test (``train=False``): the central window,
    mapped to [-1, 1].

    Call: ``(images uint8 (N, 3, H, W), rng) -> float32 (N, 3, crop, crop)`` in [-1, 1].
    Random draws, in order: top (N,), left (N,), flip (N,), brightness (N,),
    saturation (N,), contrast (N,).
    """

    def __init__(self, crop=224, train=True, flip=True, color=True, brightness=32 / 255,
                 saturation=(0.5, 1.5), contrast=(0.5, 1.5)):
        self.crop, self.train, self.flip, self.color = int(crop), bool(train), bool(flip), bool(color)
        self.brightness = float(brightness)
        self.saturation = tuple(map(float, saturation))
        self.contrast = tuple(map(float, contrast))

    def __call__(self, images, rng=None):
        _check_batch(images, "ImageNetAugment")
        n, c, h, w = images.shape
        ch = cw = self.crop
        if ch > h or cw > w:
            raise ValueError(f"crop {ch} is larger than the image {h}x{w}")
        if not self.train:
            t, l = (h - ch) // 2, (w - cw) // 2
            x = images[:, :, t:t + ch, l:l + cw].astype(np.float32)
            x *= np.float32(2 / 255)
            x -= np.float32(1)
            return np.ascontiguousarray(x)
        if rng is None:
            raise ValueError("a training transform needs a numpy Generator")
        top = rng.integers(0, h - ch + 1, size=n)
        left = rng.integers(0, w - cw + 1, size=n)
        mirror = rng.random(n) < 0.5
        # crop the uint8 images first: 4x less to convert than float32 full frames
        x = crop_batch(images, top, left, ch, cw).astype(np.float32)
        x *= np.float32(1 / 255)
        if self.flip:
            flip_batch(x, mirror)
        if self.color:
            shape = (n, 1, 1, 1)
            delta = rng.uniform(-self.brightness, self.brightness, n).astype(np.float32)
            sat = rng.uniform(*self.saturation, n).astype(np.float32)
            con = rng.uniform(*self.contrast, n).astype(np.float32)
            x += delta.reshape(shape)
            if c == 3:
                # luma (N, 1, h, w); x <- s x + (1 - s) luma
                gray = (_LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2]
                        + _LUMA[2] * x[:, 2:3])
                x *= sat.reshape(shape)
                x += (1 - sat).reshape(shape) * gray
            # channel means (N, C, 1, 1); x <- k x + (1 - k) mean
            mean = x.mean(axis=(2, 3), keepdims=True)
            x *= con.reshape(shape)
            x += (1 - con).reshape(shape) * mean
            np.clip(x, 0.0, 1.0, out=x)
        x *= np.float32(2)
        x -= np.float32(1)
        return np.ascontiguousarray(x)

    def __repr__(self):
        return (f"ImageNetAugment(crop={self.crop}, train={self.train}, flip={self.flip}, "
                f"color={self.color})")


# ----------------------------------------------------------------------------
# the pipelines per data set


def make_transforms(name, train_split, *, augment=True, crop=None, pad=0, flip=True,
                    min_std=1.0):
    """The training and test transforms of a data set, and its fitted normaliser.

    Parameters
    ----------
    name : "fashion-mnist", "cifar10" or "imagenet"
    train_split : the training Split (or uint8 (N, C, H, W) array) the
        per-pixel statistics are computed on (not used for ImageNet)
    augment : False serves the test transform (centre crop, no flip) for
        training too, so both see the same input size
    crop : crop side; default 28 (CIFAR-style) or 224 (ImageNet)
    pad : zero padding before cropping (CIFAR-style only; 2 for Fashion-MNIST
        28 -> 32 in the cpu presets, 0 in the paper's CIFAR-10 recipe)
    flip : random horizontal flips when training
    min_std : see ``PixelNormalizer``

    Returns
    -------
    (train_transform, test_transform, normalizer): the normaliser is a
    PixelNormalizer (save ``normalizer.to_dict()`` with the run), or None for
    ImageNet, whose inputs are mapped to [-1, 1] instead.
    """
    key = str(name).lower().replace("_", "-")
    if key in ("imagenet", "ilsvrc2012"):
        crop = 224 if crop is None else crop
        test = ImageNetAugment(crop=crop, train=False)
        train = ImageNetAugment(crop=crop, train=True, flip=flip) if augment else test
        return train, test, None
    if key not in ("fashion-mnist", "fashionmnist", "cifar10", "cifar-10"):
        raise ValueError(f"no transforms for data set {name!r}")
    crop = 28 if crop is None else crop
    images = getattr(train_split, "images", None)
    normalizer = PixelNormalizer.fit(images if isinstance(images, np.ndarray) else train_split,
                                     min_std=min_std)
    test = CifarAugment(normalizer, crop=crop, pad=pad, train=False)
    train = CifarAugment(normalizer, crop=crop, pad=pad, train=True, flip=flip) if augment else test
    return train, test, normalizer
