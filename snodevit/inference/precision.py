"""Numerical precision of the model's forward passes: fp32, or bf16 autocast.

One rule, :func:`resolve_precision`, used by training (``use_bf16``), ``predict``, ``open_model``, the service
(``SNODEVIT_PRECISION``), the CLI (``--precision``, default ``auto``) and the benchmarks. ``auto`` means this
machine's precision: the one ``$SNODEVIT_PRECISION`` names when it names ``fp32`` or ``bf16``, else bf16 where the
hardware multiplies bf16 natively (a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX, which oneDNN uses)
and fp32 everywhere else. ``auto`` is resolved there and nowhere else, so every path of one machine gives it the
same answer, and each reports that answer (``LoadedModel.precision``, the service's ``model.precision``, the CLI's
``precision`` figure). Under bf16 only the matrix products run in bf16 (``torch.autocast``); the logits and
features are cast back to fp32 before any probability, entropy, mutual information or density is computed, so the
uncertainty figures are always summed in fp32 or wider.

Explicit ``bf16`` also runs on a CPU without native bf16 (oneDNN emulates it): the answers are those of a bf16
machine, but slower than fp32 there (training refuses it for that reason). ONNX Runtime runs the exported fp32
graph, so the ``onnx`` backend is fp32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", *get_args(Precision))
#: The variable that pins ``auto`` on a machine (the service's setting of the same name, and the CLI's default).
ENV_VAR = "SNODEVIT_PRECISION"


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX) that oneDNN uses."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 natively (what ``auto`` picks bf16 for)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_bf16()


def pinned_precision(environ: Mapping[str, str] | None = None) -> Precision | None:
    """The precision ``$SNODEVIT_PRECISION`` pins ``auto`` to, or None when it is unset, empty or ``auto``.

    Raises:
        ValueError: a value that is not a precision, naming the variable.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if value in ("", "auto"):
        return None
    if value not in PRECISIONS:
        raise ValueError(f"{ENV_VAR} must be one of {list(PRECISIONS)}, got {value!r}")
    return value  # type: ignore[return-value]


def resolve_precision(precision: str, device: torch.device | str, backend: str = "torch") -> Precision:
    """``auto`` / ``fp32`` / ``bf16`` -> the precision the passes run in on ``device`` with ``backend``.

    ``auto`` is ``$SNODEVIT_PRECISION`` when that names a precision, else bf16 where ``device`` multiplies bf16
    natively (:func:`native_bf16`) and fp32 elsewhere; the onnx backend is always fp32.

    Raises:
        ValueError: an unknown precision (or ``$SNODEVIT_PRECISION``), or bf16 asked of the ONNX Runtime backend.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    source = ""
    if precision == "auto":
        pinned = pinned_precision()
        if pinned is None:
            return "bf16" if backend != "onnx" and native_bf16(device) else "fp32"
        precision, source = pinned, f" ('auto' with {ENV_VAR}={pinned})"
    if backend == "onnx":
        if precision == "bf16":
            raise ValueError(f"precision 'bf16'{source} applies to the torch backend: ONNX Runtime runs the exported "
                             "fp32 graph; use precision 'fp32' or 'auto' with it, or the torch backend")
        return "fp32"
    return precision  # type: ignore[return-value]


def autocast(precision: Precision, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context the forward passes run in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
