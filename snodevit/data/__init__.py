"""Images in: data sets and their splits, image decoding with one error vocabulary, the one preprocessing path, and
the shifted and out-of-distribution sets the gate is judged on.

Modules, bottom to top:

- ``image_errors``: :class:`ImageError` and its codes (:data:`IMAGE_ERROR_CODES`), shared by the service and
  `snodevit score`.
- ``modes``: every Pillow pixel mode to "L" or "RGB".
- ``decode``: untrusted bytes (or a file) to a loaded image, with byte, pixel and format caps.
- ``preprocessing``: :class:`Preprocessing` and the image -> uint8 -> normalised tensor path.
- ``specs``: ``--data`` strings and the deterministic stratified split.
- ``datasets``: :class:`ImageTensorDataset`, :class:`DatasetBundle`, augmentation and loaders.
- ``builtin`` (mnist5k, digits), ``imagefolder``, ``cifar10``: the readers; ``sets``: :func:`load_dataset`.
- ``shift``: rotated, noisy and out-of-distribution images as uint8 tensors.
"""

from snodevit.data.builtin import DIGIT_CLASSES, MNIST5K_MEAN, MNIST5K_STD
from snodevit.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from snodevit.data.datasets import (
    AUGMENT_KINDS,
    AugmentKind,
    DatasetBundle,
    ImageTensorDataset,
    make_loader,
    train_transform,
)
from snodevit.data.decode import (
    DEFAULT_ALLOWED_FORMATS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    decode_image,
    load_image_file,
)
from snodevit.data.image_errors import IMAGE_ERROR_CODES, ImageError, ImageErrorCode, undecodable
from snodevit.data.imagefolder import IMAGE_EXTENSIONS, IMAGEFOLDER_DEFAULT_SIZE
from snodevit.data.modes import standardize_mode
from snodevit.data.preprocessing import (
    RESIZE_MODES,
    Preprocessing,
    ResizeMode,
    normalize,
    preprocess,
    resize_tensor,
    to_uint8_tensor,
)
from snodevit.data.sets import load_dataset
from snodevit.data.shift import (
    CROP_SIDES,
    PIXEL_NOISE_STD,
    ROTATION_ANGLES,
    constant_images,
    inverted_images,
    letter_images,
    photo_crops,
    pixel_noise_images,
    rotate_images,
    uniform_noise_images,
)
from snodevit.data.specs import (
    DATA_KINDS,
    SPLITS,
    VALID_FORMS,
    DataError,
    DataKind,
    DataSpec,
    Split,
    parse_data_spec,
    stratified_split,
)

__all__ = [
    "AUGMENT_KINDS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CROP_SIDES",
    "DATA_KINDS",
    "DEFAULT_ALLOWED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DIGIT_CLASSES",
    "IMAGEFOLDER_DEFAULT_SIZE",
    "IMAGE_ERROR_CODES",
    "IMAGE_EXTENSIONS",
    "MNIST5K_MEAN",
    "MNIST5K_STD",
    "PIXEL_NOISE_STD",
    "RESIZE_MODES",
    "ROTATION_ANGLES",
    "SPLITS",
    "VALID_FORMS",
    "AugmentKind",
    "DataError",
    "DataKind",
    "DataSpec",
    "DatasetBundle",
    "ImageError",
    "ImageErrorCode",
    "ImageTensorDataset",
    "Preprocessing",
    "ResizeMode",
    "Split",
    "constant_images",
    "decode_image",
    "inverted_images",
    "letter_images",
    "load_dataset",
    "load_image_file",
    "make_loader",
    "normalize",
    "parse_data_spec",
    "photo_crops",
    "pixel_noise_images",
    "preprocess",
    "resize_tensor",
    "rotate_images",
    "standardize_mode",
    "stratified_split",
    "to_uint8_tensor",
    "train_transform",
    "undecodable",
    "uniform_noise_images",
]
