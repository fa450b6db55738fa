"""``imagefolder:PATH``: class sub-folders of images, decoded with the same decoder as a served image.

Class names are the sorted folder names; images may sit at any depth below their class folder; hidden files and
files without an image extension are skipped. If PATH holds ``train/``, ``val/`` (or ``calibration/``) and
``test/``, those are the splits, each with class sub-folders; otherwise :func:`snodevit.data.specs.stratified_split`
splits on each image's path relative to the folder, so adding files never moves existing files between splits.
Images are decoded with :func:`snodevit.data.decode.load_image_file` and stored resized to ``image_size`` (default
32). Channels: 1 when every image decodes as grayscale ("L": gray PNG/JPEG, 16-bit gray, mode "1", gray
palettes), otherwise 3 (gray images are repeated to RGB). Mean/std are measured on the train split. An unreadable
image raises :class:`~snodevit.data.specs.DataError` naming the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from snodevit.data.datasets import AugmentKind, DatasetBundle, make_bundle
from snodevit.data.decode import load_image_file
from snodevit.data.image_errors import ImageError
from snodevit.data.preprocessing import Preprocessing, to_uint8_tensor
from snodevit.data.specs import VALID_FORMS, DataError, stratified_split

logger = logging.getLogger(__name__)

#: Default model input size of an image folder when ``image_size`` is not given.
IMAGEFOLDER_DEFAULT_SIZE = 32
#: File name endings an image folder loader looks at (case-insensitive); other files are skipped.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)


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


def load_imagefolder(root: Path, image_size: int | None, augment: AugmentKind) -> DatasetBundle:
    """``imagefolder:ROOT`` at ``image_size`` (default 32); see the module docstring for the layout and splits.

    Raises:
        DataError: a missing folder, a malformed layout, an empty class or split, or an unreadable image.
    """
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
    return make_bundle("imagefolder", f"imagefolder:{root}", images, torch.tensor(labels, dtype=torch.int64), splits,
                   class_names, prep, augment)
