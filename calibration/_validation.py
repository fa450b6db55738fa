"""Argument and tensor checks shared by the calibration package.

Every public function checks its plain arguments first (``check_*_arg``), then its tensors (``check_*``), and only
then computes, the split torchmetrics uses (``_arg_validation`` / ``_tensor_validation``). Each check raises a
``ValueError`` that names the argument, says what was given and what is allowed, so a caller can act on it.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

PROB_SUM_ATOL = 1e-4  # how far a row of ``probs`` may sum from 1


def check_choice(value: Any, name: str, allowed: Collection[str]) -> None:
    """Raise unless ``value`` is one of the ``allowed`` strings."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}")


def check_bool_arg(value: Any, name: str) -> None:
    """Raise unless ``value`` is a real ``bool`` (not 0/1, which hide a swapped argument)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")


def check_int_arg(value: Any, name: str, minimum: int) -> None:
    """Raise unless ``value`` is an int (not a bool) no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_open_unit_arg(value: Any, name: str) -> None:
    """Raise unless ``value`` is a real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be a number in the open interval (0, 1), got {value!r}")


def check_closed_unit_arg(value: Any, name: str) -> None:
    """Raise unless ``value`` is a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")


def check_positive_finite_arg(value: Any, name: str) -> None:
    """Raise unless ``value`` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")


def check_real_arg(value: Any, name: str) -> None:
    """Raise unless ``value`` is a real number that is not NaN (infinities allowed)."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ValueError(f"`{name}` must be a real number (not NaN), got {value!r}")


def _check_tensor(x: Any, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")


def check_float_tensor(x: Any, name: str, ndim: int, shape_doc: str) -> None:
    """Raise unless ``x`` is a non-empty, finite floating tensor with ``ndim`` dimensions.

    Args:
        x: the candidate tensor.
        name: the argument name used in the message.
        ndim: the required number of dimensions.
        shape_doc: the expected shape in words, e.g. ``"(N, C)"``.
    """
    _check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"`{name}` must have shape {shape_doc} ({ndim} dims), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"`{name}` must be finite, found {bad} NaN/inf value(s)")


def check_probs(probs: Any, name: str = "probs") -> None:
    """Raise unless ``probs`` is an (N, C) tensor of probability rows, N >= 1, C >= 2.

    Entries must lie in [0, 1] and each row must sum to 1 within ``PROB_SUM_ATOL``.
    """
    check_float_tensor(probs, name, 2, "(N, C)")
    if probs.shape[1] < 2:
        raise ValueError(f"`{name}` must have at least 2 classes (columns), got shape {tuple(probs.shape)}")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"`{name}` must hold probabilities in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    err = (probs.double().sum(dim=1) - 1.0).abs()
    worst = float(err.max())
    if worst > PROB_SUM_ATOL:
        row = int(err.argmax())
        raise ValueError(f"rows of `{name}` must sum to 1 (within {PROB_SUM_ATOL:g}); row {row} sums to "
                         f"{float(probs[row].double().sum()):.6g}")


def check_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> None:
    """Raise unless ``labels`` is an (N,) integer tensor with values in [0, num_classes)."""
    _check_tensor(labels, name)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"`{name}` must be an integer tensor (int64 class indices), got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"`{name}` must have shape (N,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"`{name}` must have N={n} entries to match the predictions, got {labels.shape[0]}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"`{name}` must lie in [0, {num_classes - 1}] (C={num_classes} classes), "
                         f"got values in [{lo}, {hi}]")


def check_scores(scores: Any, name: str = "scores") -> None:
    """Raise unless ``scores`` is a non-empty, finite, floating (N,) tensor."""
    check_float_tensor(scores, name, 1, "(N,)")


def check_probabilities_like(p: Any, scores: Any, name: str) -> None:
    """Raise unless ``p`` is a finite floating tensor of ``scores``' shape with every value in [0, 1]."""
    check_scores(p, name)
    if p.shape != scores.shape:
        raise ValueError(f"`{name}` must have the shape of `scores` {tuple(scores.shape)}, got {tuple(p.shape)}")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"`{name}` must lie in [0, 1]")


def check_correct(correct: Any, n: int, name: str = "correct") -> None:
    """Raise unless ``correct`` is an (N,) bool tensor, or an integer tensor of 0/1 values."""
    _check_tensor(correct, name)
    if correct.dim() != 1:
        raise ValueError(f"`{name}` must have shape (N,), got shape {tuple(correct.shape)}")
    if correct.shape[0] != n:
        raise ValueError(f"`{name}` must have N={n} entries to match the scores, got {correct.shape[0]}")
    if correct.dtype != torch.bool:
        if correct.is_floating_point() or correct.is_complex():
            raise ValueError(f"`{name}` must be a bool tensor (or 0/1 integers), got dtype {correct.dtype}")
        if bool(((correct != 0) & (correct != 1)).any()):
            raise ValueError(f"`{name}` must hold only 0/1 (or True/False), got values {correct.unique().tolist()}")


def check_probs_labels(probs: Any, labels: Any) -> None:
    """Raise unless ``probs`` is (N, C) probability rows and ``labels`` (N,) class indices in [0, C).

    The pair every probability metric takes, checked in one place (``probs`` first, so a bad ``probs`` is named
    before the ``labels`` that would not match it).
    """
    check_probs(probs)
    check_labels(labels, probs.shape[0], probs.shape[1])


def check_scores_correct(scores: Any, correct: Any, scores_name: str = "scores") -> None:
    """Raise unless ``scores`` is a finite floating (N,) tensor and ``correct`` an (N,) bool (or 0/1) tensor."""
    check_scores(scores, scores_name)
    check_correct(correct, scores.shape[0])
