"""Decoding image files in DataLoader workers: a file that cannot be read becomes an error item, never an exception.

Each file goes through :func:`snodevit.data.load_image_file` + :func:`snodevit.data.preprocess`,
the decoder and preprocessing of the HTTP service, and a failure carries the same error code the service answers
with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from snodevit.data import ImageError, Preprocessing, load_image_file, preprocess, undecodable
from snodevit.scoring.inputs import PathTable

logger = logging.getLogger(__name__)

#: (position in the pending array, preprocessed image or None, error code or None, error detail or None)
Item = tuple[int, torch.Tensor | None, str | None, str | None]


@dataclass
class Batch:
    """A collated batch: the images that decoded, and an (error, detail) pair for those that did not."""

    positions: list[int]  # (B,) positions into the pending index array, in order
    images: torch.Tensor | None  # (G, C, H, W) preprocessed images of the G good items, None when G == 0
    good: list[int]  # (G,) offsets into ``positions`` of the images
    errors: dict[int, tuple[str, str]]  # offset into ``positions`` -> (error code, detail)


class ImageFiles(Dataset[Item]):
    """Decode + preprocess the files ``paths[indices[i]]``; a file that fails is returned as an error.

    Args:
        paths: all paths of the run.
        indices: (M,) int64 indices into ``paths`` still to score.
        prep: the model's preprocessing.
        max_bytes / max_pixels: caps of :func:`snodevit.data.load_image_file`.
    """

    def __init__(self, paths: PathTable, indices: np.ndarray, prep: Preprocessing, max_bytes: int,
                 max_pixels: int) -> None:
        self.paths = paths
        self.indices = indices
        self.prep = prep
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        path = self.paths[int(self.indices[i])]
        try:
            image = load_image_file(path, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            return i, preprocess(image, self.prep), None, None
        except ImageError as err:
            return i, None, err.error, err.detail
        except Exception as err:  # noqa: BLE001 - one hostile file must not end a million-image run
            logger.debug("unexpected failure decoding %s", path, exc_info=True)
            refused = undecodable(err, path)
            return i, None, refused.error, refused.detail


def collate(items: list[Item]) -> Batch:
    """The DataLoader's ``collate_fn``: stack the images that decoded, keep the errors of those that did not."""
    good = [k for k, it in enumerate(items) if it[1] is not None]
    images = torch.stack([items[k][1] for k in good]) if good else None  # type: ignore[misc]  # (G, C, H, W)
    errors = {k: (str(it[2]), str(it[3])) for k, it in enumerate(items) if it[1] is None}
    return Batch([it[0] for it in items], images, good, errors)


def worker_init(_: int) -> None:
    """The DataLoader's ``worker_init_fn``."""
    torch.set_num_threads(1)  # decoding is per-file; leave the cores to the model
