"""Open a trained model for inference on either backend, with everything a consumer needs next to it.

The service, the batch-scoring CLI, evaluation and the benchmarks all go through ``open_model`` so they apply
the same preprocessing and the same calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import CheckpointError, load_model, read_meta
from .config import SNodeViTConfig
from .images import Preprocessing
from .inference import Calibration, Prediction, SamplingBackend, predict
from .precision import Precision, resolve_precision

BackendName = Literal["torch", "onnx"]


@dataclass
class LoadedModel:
    """A backend plus its metadata."""

    backend: SamplingBackend  # SNodeViT or export.runtime.OnnxPredictor
    backend_name: str  # "torch" or "onnx"
    device: str
    cfg: SNodeViTConfig
    class_names: list[str]
    preprocessing: Preprocessing
    calibration: Calibration
    weights_sha256: str
    source: str  # path it was loaded from
    meta: dict[str, Any]
    precision: Precision = "fp32"  # what its forward passes run in (``snodevit.precision``)

    @property
    def version(self) -> str:
        return self.weights_sha256[:12]

    def predict(self, images: torch.Tensor, **kwargs: Any) -> Prediction:
        """``snodevit.predict`` with this model's calibration, pooling and precision."""
        kwargs.setdefault("calibration", self.calibration)
        kwargs.setdefault("precision", self.precision)
        kwargs.setdefault("pool", self.cfg.pool)
        return predict(self.backend, images.to(self.device), **kwargs)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return device


def open_model(path: str | Path, backend: BackendName = "torch", device: str = "auto",
               precision: str = "fp32") -> LoadedModel:
    """Open a model directory (torch) or an exported .onnx file / a directory holding ``model.onnx`` (onnx).

    ``precision`` ("fp32", "bf16" or "auto", see ``snodevit.precision``) is what its ``predict`` runs in; the
    CLI and the service default to "auto".

    Raises:
        CheckpointError: the path holds no usable model for that backend.
        ValueError: an unknown backend, device or precision, or bf16 with the onnx backend.
    """
    if backend not in ("torch", "onnx"):
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    path = Path(path)
    dev = _resolve_device(device)
    # resolved once, before the weights are read: the onnx backend is fp32 on any device, so the device ORT
    # settles on below cannot change it
    resolved = resolve_precision(precision, dev, backend)
    if backend == "torch":
        if path.suffix == ".onnx":
            raise CheckpointError(f"{path} is an ONNX file; use backend 'onnx' for it")
        model, meta = load_model(path, map_location=dev)
        if "preprocessing" not in meta or "class_names" not in meta:
            raise CheckpointError(f"{path}/meta.json lacks class_names/preprocessing; was it written by snodevit train?")
        return LoadedModel(model, "torch", dev, model.cfg, list(meta["class_names"]),
                           Preprocessing.from_dict(meta["preprocessing"]), Calibration.from_dict(meta.get("calibration")),
                           str(meta.get("weights_sha256", "")), str(path), meta, resolved)
    from export.runtime import OnnxPredictor

    onnx_path = path / "model.onnx" if path.is_dir() else path
    if not onnx_path.is_file():
        raise CheckpointError(f"no ONNX graph at {onnx_path}; create one with `snodevit export`")
    pred = OnnxPredictor(onnx_path, device=device)  # its "auto" also checks ORT's CUDA provider
    return LoadedModel(pred, "onnx", str(pred.device), pred.cfg, list(pred.class_names), pred.preprocessing,
                       pred.calibration, pred.weights_sha256, str(onnx_path),
                       _meta_beside(onnx_path, pred.weights_sha256, pred.calibration), resolved)


def _meta_beside(onnx_path: Path, weights_sha256: str, calibration: Calibration) -> dict[str, Any]:
    """The meta.json next to a graph (a store entry keeps both) if it has the graph's weights and calibration, else {}.

    The graph is served from its own metadata alone; meta.json only adds what people read, such as the
    ``calibration_figures`` that /metadata shows.
    """
    try:
        meta = read_meta(onnx_path.parent)
        same = (meta.get("weights_sha256") == weights_sha256
                and Calibration.from_dict(meta.get("calibration")) == calibration)
    except (CheckpointError, ValueError, TypeError, AttributeError):
        return {}
    return meta if same else {}
