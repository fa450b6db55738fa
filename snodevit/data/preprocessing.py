"""The one preprocessing path shared by training, the HTTP service and the CLI: a decoded image to a model input.

:func:`preprocess` turns an image into the model's input tensor. It is split into :func:`to_uint8_tensor` (mode,
resize) and :func:`normalize` (scale, mean/std) so that the data sets, which store uint8 tensors, go through
exactly the same arithmetic as a served image. :class:`Preprocessing` says how, and is stored in checkpoints and
ONNX metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from snodevit.data.modes import standardize_mode

ResizeMode = Literal["resize", "pad_resize"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input. Stored in checkpoints and ONNX metadata (``to_dict``)."""

    image_size: int  # the model's input height and width in pixels
    channels: int  # 1 (images converted to "L") or 3 (converted to "RGB")
    mean: tuple[float, ...]  # per-channel mean subtracted after scaling pixels to [0, 1]
    std: tuple[float, ...]  # per-channel standard deviation divided by after the mean
    resize: ResizeMode = "resize"  # "resize" (stretch to a square) or "pad_resize" (pad with black to a square first)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be one of [1, 3], got {self.channels!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(f"{name} needs {self.channels} value(s) (one per channel), got {len(values)}")
        if any(not np.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"std must be positive and finite, got {self.std}")
        if any(not np.isfinite(m) for m in self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")

    @property
    def mode(self) -> Literal["L", "RGB"]:
        """The Pillow mode images are converted to."""
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`. Raises ValueError on unknown or missing fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}; known fields: {sorted(known)}")
        fields = dict(data)
        for name in ("mean", "std"):
            if name in fields:
                fields[name] = tuple(fields[name])
        try:
            return cls(**fields)
        except TypeError as err:
            raise ValueError(f"incomplete preprocessing {data!r}: {err}") from None


def resize_tensor(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Resize uint8 images to ``prep.image_size`` squared (bilinear, antialiased), as :func:`preprocess` does.

    Args:
        images: uint8 tensor of shape (C, H, W) or (N, C, H, W).
        prep: target size and resize mode ("pad_resize" first pads the short side with black, centred).

    Returns:
        uint8 tensor of shape (C, S, S) or (N, C, S, S) with S = ``prep.image_size``; the input itself when it
        already has that size.
    """
    if images.dtype != torch.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected a uint8 tensor (C, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[-2:]
    size = prep.image_size
    if prep.resize == "pad_resize" and height != width:
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        images = TF.pad(images, [left, top, side - width - left, side - height - top], fill=0)  # (.., C, side, side)
        height = width = side
    if (height, width) == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def to_uint8_tensor(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Mode conversion and resize: the uint8 half of :func:`preprocess`.

    Args:
        image: any Pillow image; non-"L"/"RGB" modes go through :func:`standardize_mode` first.
        prep: target channels, size and resize mode.

    Returns:
        uint8 tensor of shape (C, S, S), C = ``prep.channels``, S = ``prep.image_size``.
    """
    image = standardize_mode(image)
    if image.mode != prep.mode:
        image = image.convert(prep.mode)  # RGB -> L uses ITU-R 601-2 luma; L -> RGB repeats the channel
    return resize_tensor(TF.pil_to_tensor(image), prep)  # (C, S, S)


def normalize(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Scale uint8 pixels to [0, 1] and normalise with the per-channel mean and std.

    Args:
        images: uint8 tensor of shape (C, H, W) or (N, C, H, W), C = ``prep.channels``.
        prep: the mean and std.

    Returns:
        float32 tensor of the same shape: ``(x / 255 - mean) / std``.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[-3] != prep.channels:
        raise ValueError(f"expected shape (C, H, W) or (N, C, H, W) with C={prep.channels}, got {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255.0)
    return TF.normalize(x, list(prep.mean), list(prep.std))


def preprocess(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Turn a decoded image into the model's input. Deterministic.

    Args:
        image: a Pillow image, normally from :func:`decode_image`.
        prep: the model's preprocessing.

    Returns:
        float32 tensor of shape (C, S, S): converted to ``prep.mode``, resized (bilinear, antialiased),
        scaled to [0, 1] and normalised by ``prep.mean`` / ``prep.std``.
    """
    return normalize(to_uint8_tensor(image, prep), prep)
