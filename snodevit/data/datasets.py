"""The three splits of a data set as uint8 tensors normalised on access, their augmentation, and their loaders.

Every split is an :class:`ImageTensorDataset` over uint8 tensors; items are ``(float32 (C, S, S), int)``,
normalised exactly like a served image (:func:`snodevit.data.preprocessing.normalize`). Augmentation
(:func:`train_transform`) acts on the uint8 tensor before resizing and normalisation, so its fill value 0 is
black, MNIST's background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from snodevit.data.preprocessing import Preprocessing, normalize, resize_tensor
from snodevit.data.specs import SPLITS, Split, check_split

logger = logging.getLogger(__name__)

AugmentKind = Literal["none", "light", "light_flip"]
AUGMENT_KINDS: tuple[str, ...] = get_args(AugmentKind)


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
        check_split(split)
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
        check_split(split)
        ds: ImageTensorDataset = getattr(self, split)
        return ds.images, ds.labels


def make_bundle(
    name: str,
    spec: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    splits: dict[str, np.ndarray],
    class_names: list[str],
    prep: Preprocessing,
    augment: AugmentKind,
) -> DatasetBundle:
    """The bundle every loader returns: one :class:`ImageTensorDataset` per split, augmentation on train only.

    Args:
        name: the data set kind.
        spec: the canonical spec string.
        images: uint8 (N, C, H, W) images of all splits.
        labels: int64 (N,) labels.
        splits: split name -> int64 indices into ``images``.
        class_names: index -> class name.
        prep: the preprocessing of the model input.
        augment: augmentation of the train split.
    """
    parts = {s: ImageTensorDataset(images[torch.from_numpy(i)].contiguous(), labels[torch.from_numpy(i)], prep)
             for s, i in splits.items()}
    train = parts["train"].with_transform(train_transform(prep, augment)) if augment != "none" else parts["train"]
    logger.info("data %s: %d train / %d calibration / %d test, %d classes", spec, len(train),
                len(parts["calibration"]), len(parts["test"]), len(class_names))
    return DatasetBundle(name=name, spec=spec, train=train, calibration=parts["calibration"], test=parts["test"],
                         class_names=list(class_names), preprocessing=prep)


def prep_for(image_size: int | None, native: int, channels: int, mean: tuple[float, ...],
             std: tuple[float, ...]) -> Preprocessing:
    """The preprocessing of a data set with fixed statistics, at ``image_size`` or else its ``native`` size."""
    return Preprocessing(image_size=native if image_size is None else image_size, channels=channels, mean=mean, std=std)


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
