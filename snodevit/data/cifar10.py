"""``cifar10:PATH``: a local copy of the CIFAR-10 *binary* version, parsed with numpy.

PATH is ``cifar-10-batches-bin/`` or its parent; the Python version is refused because it is a pickle. Test =
``test_batch.bin``; calibration = the last 10% of the training records in file order (the last 5000 of 50000,
which is all of ``data_batch_5.bin``); train = the rest. Mean/std are the usual constants of the CIFAR-10
training set.

Reference:
    Krizhevsky. "Learning Multiple Layers of Features from Tiny Images." Technical report, 2009.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from snodevit.data.datasets import AugmentKind, DatasetBundle, make_bundle, prep_for
from snodevit.data.specs import VALID_FORMS, DataError

#: The usual per-channel statistics of the 50000 CIFAR-10 training images (population std of all pixels).
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)

_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN_FILES, "test_batch.bin", "batches.meta.txt")
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _cifar_dir(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"CIFAR-10 folder {path} does not exist; download {_CIFAR_URL}, extract it and pass "
                        f"cifar10:<folder holding cifar-10-batches-bin/>; {VALID_FORMS}")
    for pickled in (path / "cifar-10-batches-py", path, path / "cifar-10-batches-bin"):
        if (pickled / "data_batch_1").is_file() and not (pickled / "data_batch_1.bin").is_file():
            raise DataError(f"{pickled} holds the Python (pickle) version of CIFAR-10, which is never unpickled "
                            f"here; download the binary version {_CIFAR_URL} and extract it next to it")
    if (path / "data_batch_1.bin").exists() or path.name == "cifar-10-batches-bin":
        return path
    return path / "cifar-10-batches-bin"


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{path} is {raw.size} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records "
                        "(1 label byte + 3072 pixel bytes); the file is truncated or not CIFAR-10 binary")
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= num_classes:
        raise DataError(f"{path} has label {labels.max()}, but batches.meta.txt names {num_classes} classes")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels  # planes R, G, B of 32 rows x 32 columns


def load_cifar10(path: Path, image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    """``cifar10:PATH``: 45000 / 5000 / 10000 images of 32x32 RGB (``image_size`` resizes on access).

    Raises:
        DataError: a missing folder or file, the pickled Python version, or a malformed batch.
    """
    folder = _cifar_dir(path)
    missing = [name for name in _CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 binary files missing: place {', '.join(missing)} in {folder} (all of them come "
                        f"in {_CIFAR_URL}, folder cifar-10-batches-bin/)")
    class_names = [ln.strip() for ln in (folder / "batches.meta.txt").read_text(encoding="utf-8").splitlines()
                   if ln.strip()]
    if len(class_names) < 2:
        raise DataError(f"{folder / 'batches.meta.txt'} should name the classes one per line, got {class_names}")
    batches = [_read_cifar_batch(folder / name, len(class_names)) for name in _CIFAR_TRAIN_FILES]
    train_images = np.concatenate([b[0] for b in batches])
    train_labels = np.concatenate([b[1] for b in batches])
    test_images, test_labels = _read_cifar_batch(folder / "test_batch.bin", len(class_names))
    # Calibration = the last 10% of the training records (the last 5000 of 50000, i.e. data_batch_5).
    n_train = len(train_labels)
    n_cal = n_train // 10
    images = torch.from_numpy(np.concatenate([train_images, test_images]))  # (N, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([train_labels, test_labels]))
    splits = {"train": np.arange(n_train - n_cal), "calibration": np.arange(n_train - n_cal, n_train),
              "test": np.arange(n_train, n_train + len(test_labels))}
    prep = prep_for(image_size, 32, 3, CIFAR10_MEAN, CIFAR10_STD)
    return make_bundle("cifar10", f"cifar10:{path.resolve()}", images, labels, splits, class_names, prep, augment)
