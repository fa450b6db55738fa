"""Shifted and out-of-distribution inputs for calibration-under-shift experiments, as uint8 images.

Everything here returns uint8 (N, C, H, W) tensors, so the images go through the same normalisation as a served
image (:class:`snodevit.data.ImageTensorDataset` -> :func:`snodevit.data.normalize`):

* :func:`rotate_images`: test images rotated by a fixed angle, the "rotated MNIST" shift of Ovadia et al.
  (angles 0-180 degrees in 15 degree steps, :data:`ROTATION_ANGLES`).
* :func:`uniform_noise_images`: every pixel drawn uniformly from 0..255, a far-OOD input.
* :func:`photo_crops`: grayscale (or RGB) crops of scikit-learn's two sample photographs, resized to the model's
  input size, a far-OOD input with natural-image structure.
* :func:`inverted_images`: dark strokes on white, as a scan or a photo of ink on paper shows a digit.
* :func:`pixel_noise_images`: the test images under heavy Gaussian pixel noise (a shifted, still labelled set).
* :func:`constant_images`: blank images of one grey level (what a 1x1 PNG becomes after the resize).
* :func:`letter_images`: printed Latin letters drawn like MNIST digits.

None of these is used in training: the out-of-distribution gate is fitted on training features and
in-distribution calibration images only, so every set here is held out.

References:
    Ovadia et al. "Can You Trust Your Model's Uncertainty? Evaluating Predictive Uncertainty Under Dataset
    Shift." NeurIPS 2019.
"""

from __future__ import annotations

import math
import string

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import InterpolationMode

from snodevit.data.preprocessing import Preprocessing, resize_tensor

#: Rotation angles of the shift sweep, in degrees (Ovadia et al. 2019: 0 to 180 in 15 degree steps).
ROTATION_ANGLES: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))
#: Side range (pixels, in the 427x640 photographs) of the square photo crops before resizing.
CROP_SIDES: tuple[int, int] = (28, 192)
#: Standard deviation, in grey levels, of the "heavy pixel noise" shift (:func:`pixel_noise_images`).
PIXEL_NOISE_STD: float = 100.0


def _check_uint8(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")


def _check_count(n: int, name: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {n!r}")


def rotate_images(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate every image counter-clockwise about its centre (bilinear; uncovered corners black, i.e. 0).

    Args:
        images: uint8 (N, C, H, W).
        angle: degrees; 0 returns ``images`` itself, so the unrotated pass is exactly the plain test split.

    Returns:
        uint8 (N, C, H, W).

    Raises:
        ValueError: on a non-uint8 or non-4-D tensor, or a non-finite angle.
    """
    _check_uint8(images)
    angle = float(angle)
    if not math.isfinite(angle):
        raise ValueError(f"angle must be finite, got {angle}")
    if angle % 360.0 == 0.0:
        return images
    return TF.rotate(images, angle, interpolation=InterpolationMode.BILINEAR, fill=[0.0] * images.shape[1])


def uniform_noise_images(n: int, prep: Preprocessing, seed: int = 0) -> torch.Tensor:
    """``n`` images of independent uniform pixels in 0..255 at the model's input size.

    Args:
        n: number of images, >= 1.
        prep: the model's preprocessing (channels and size).
        seed: seed of the generator; the same seed gives the same images.

    Returns:
        uint8 (n, C, S, S).
    """
    _check_count(n)
    gen = torch.Generator().manual_seed(seed)
    shape = (n, prep.channels, prep.image_size, prep.image_size)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


def _sample_photos(channels: int) -> list[torch.Tensor]:
    """scikit-learn's sample photographs (china.jpg, flower.jpg) as uint8 (C, H, W), gray or RGB."""
    from sklearn.datasets import load_sample_images  # scikit-learn takes about a second to import; only here

    mode = "L" if channels == 1 else "RGB"
    out = []
    for array in load_sample_images().images:  # (427, 640, 3) uint8 each
        image = Image.fromarray(array).convert(mode)  # RGB -> L: ITU-R 601-2 luma, as a served image
        out.append(TF.pil_to_tensor(image))  # (C, H, W)
    return out


def photo_crops(n: int, prep: Preprocessing, seed: int = 0) -> torch.Tensor:
    """``n`` random square crops of scikit-learn's sample photographs, resized to the model's input size.

    The side of each crop is drawn uniformly from :data:`CROP_SIDES` (28 to 192 pixels of a 427x640 photo), so
    the set holds both near-flat texture patches and crops with objects and edges; the crops are resized like a
    served image (:func:`snodevit.data.resize_tensor`, bilinear, antialiased). Grayscale for a 1-channel model.

    Args:
        n: number of crops, >= 1.
        prep: the model's preprocessing (channels and size).
        seed: seed of the generator; the same seed gives the same crops.

    Returns:
        uint8 (n, C, S, S).
    """
    _check_count(n)
    photos = _sample_photos(prep.channels)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = CROP_SIDES
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        height, width = photo.shape[-2:]
        side = int(torch.randint(lo, min(hi, height, width) + 1, (1,), generator=gen))
        top = int(torch.randint(height - side + 1, (1,), generator=gen))
        left = int(torch.randint(width - side + 1, (1,), generator=gen))
        crops.append(resize_tensor(photo[:, top:top + side, left:left + side].contiguous(), prep))  # (C, S, S)
    return torch.stack(crops)  # (n, C, S, S)


def inverted_images(images: torch.Tensor) -> torch.Tensor:
    """Dark strokes on a light background (255 - x): a digit as a scan or a photo of ink on paper shows it."""
    _check_uint8(images)
    return 255 - images


def pixel_noise_images(images: torch.Tensor, std: float = PIXEL_NOISE_STD, seed: int = 0) -> torch.Tensor:
    """Images under heavy additive Gaussian pixel noise of ``std`` grey levels (0..255 scale), clipped to 0..255.

    Args:
        images: uint8 (N, C, H, W).
        std: noise standard deviation in grey levels, > 0.
        seed: seed of the generator; the same seed gives the same noise.
    """
    _check_uint8(images)
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a finite number > 0, got {std}")
    gen = torch.Generator().manual_seed(seed)
    noisy = images.float() + std * torch.randn(images.shape, generator=gen)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def constant_images(n: int, prep: Preprocessing) -> torch.Tensor:
    """``n`` blank images, each one grey level, spread evenly over 0..255 (0 and 255 included when n >= 2).

    A 1x1 PNG of any colour becomes one of these after the served resize.
    """
    _check_count(n)
    levels = torch.linspace(0, 255, n).round().to(torch.uint8)
    return levels.view(n, 1, 1, 1).expand(n, prep.channels, prep.image_size, prep.image_size).contiguous()


def letter_images(n: int, prep: Preprocessing, seed: int = 0) -> torch.Tensor:
    """``n`` Latin letters (a-z, A-Z) drawn white on black like MNIST digits, with random size, position and tilt.

    Drawn with Pillow's built-in scalable font (``ImageFont.load_default(size)``): a printed, not handwritten,
    alphabet, so they are out of distribution by class and by style.
    """
    _check_count(n)
    gen = torch.Generator().manual_seed(seed)
    letters = string.ascii_letters
    side = prep.image_size
    out = []
    for _ in range(n):
        ch = letters[int(torch.randint(len(letters), (1,), generator=gen))]
        size = int(torch.randint(int(0.6 * side), int(0.85 * side) + 1, (1,), generator=gen))
        dx, dy = (int(v) for v in torch.randint(-side // 14, side // 14 + 1, (2,), generator=gen))
        tilt = float(torch.empty(1).uniform_(-15.0, 15.0, generator=gen))
        image = Image.new("L", (side, side), 0)
        ImageDraw.Draw(image).text((side / 2 + dx, side / 2 + dy), ch, fill=255,
                                   font=ImageFont.load_default(size=size), anchor="mm")
        image = image.rotate(tilt, resample=Image.Resampling.BILINEAR)
        gray = TF.pil_to_tensor(image)  # (1, S, S)
        out.append(gray.expand(prep.channels, side, side))
    return torch.stack(out).contiguous()  # (n, C, S, S)
