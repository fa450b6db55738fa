"""``--data`` spec strings, and the one deterministic split of every data set that does not bring its own.

Specs: ``mnist5k``, ``digits``, ``imagefolder:PATH`` and ``cifar10:PATH`` (:func:`parse_data_spec` checks the
syntax only; :func:`snodevit.data.sets.load_dataset` says what each one loads).

Splits. Unless a data set brings its own (CIFAR-10's test batch, an image folder's ``train/ val/ test/``), every
class is split on its own (stratified) in the order of the SHA-256 of a per-item key (``"mnist5k:<row>"``,
``"digits:<row>"``, an image's path relative to the folder): the first ``round(0.1 n)`` items of a class are
test, the next ``round(0.1 n)`` calibration, the rest train. The hash order is a deterministic shuffle that
depends on no random number generator or library version, so the split is identical everywhere; for a folder it
also means adding files never moves existing files between splits. For mnist5k this gives 4000 / 500 / 500
(400 / 50 / 50 per class). Inside each split items keep their hash order, so even unshuffled iteration is not
sorted by label.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

DataKind = Literal["mnist5k", "digits", "imagefolder", "cifar10"]
DATA_KINDS: tuple[str, ...] = get_args(DataKind)
Split = Literal["train", "calibration", "test"]
SPLITS: tuple[str, ...] = get_args(Split)

VALID_FORMS = "valid --data forms: 'mnist5k', 'digits', 'imagefolder:PATH', 'cifar10:PATH'"

_TEST_FRACTION = 0.1
_CALIBRATION_FRACTION = 0.1


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


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS` (the message also offers ``"all"``)."""
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
