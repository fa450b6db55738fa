"""Numerical precision of the model's forward passes: fp32, or bf16 autocast.

One rule, used by training, ``predict``, the service (``SNODEVIT_PRECISION``), the CLI (``--precision``) and the
benchmarks: ``auto`` means bf16 where the hardware multiplies bf16 natively (a CUDA GPU that supports it, or a CPU
with AVX512-BF16 or AMX, which oneDNN uses) and fp32 everywhere else. Under bf16 only the matrix products run in
bf16 (``torch.autocast``); the logits and features are cast back to fp32 before any probability, entropy, mutual
information or density is computed, so the uncertainty figures are always summed in fp32 or wider.

Explicit ``bf16`` also runs on a CPU without native bf16 (oneDNN emulates it): the answers are those of a bf16
machine, but slower than fp32 there. ONNX Runtime runs the exported fp32 graph, so the ``onnx`` backend is fp32.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", *get_args(Precision))


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX) that oneDNN uses."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 natively (what ``auto`` picks bf16 for)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_bf16()


def resolve_precision(precision: str, device: torch.device | str, backend: str = "torch") -> Precision:
    """``auto`` / ``fp32`` / ``bf16`` -> the precision the passes run in on ``device`` with ``backend``.

    Raises:
        ValueError: an unknown precision, or bf16 asked of the ONNX Runtime backend.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if backend == "onnx":
        if precision == "bf16":
            raise ValueError("precision 'bf16' applies to the torch backend: ONNX Runtime runs the exported fp32 "
                             "graph; use precision 'fp32' or 'auto' with it, or the torch backend")
        return "fp32"
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision  # type: ignore[return-value]


def autocast(precision: Precision, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context the forward passes run in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
