"""The one rule for choosing a device: "auto" takes CUDA when it is there, and a CUDA device asked for on a machine
without one is refused with a message that says what to use instead. Training, the CLI, ``open_model`` and the
ONNX Runtime backend all call :func:`resolve_device`."""

from __future__ import annotations

import torch

DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(name: str | torch.device = "auto", *, cuda_ok: bool | None = None,
                   cuda_needs: str = "CUDA") -> torch.device:
    """The device ``name`` stands for.

    Args:
        name: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
        cuda_ok: whether CUDA is usable here; None asks torch. A backend that needs more than torch's CUDA (ONNX
            Runtime's CUDA provider) passes its own answer.
        cuda_needs: what the refusal says is missing.

    Returns:
        The device; "cuda" without an index is the current CUDA device.

    Raises:
        ValueError: an unknown device, or CUDA where it is not available.
    """
    ok = torch.cuda.is_available() if cuda_ok is None else cuda_ok
    if str(name) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if ok else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be {DEVICE_FORMS}, got {name!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be {DEVICE_FORMS}, got {name!r}")
    if not ok:
        raise ValueError(f"device {str(name)!r}: {cuda_needs} is not available on this machine; use 'cpu' or 'auto'")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
