"""Open a trained model for inference on either backend, with everything a consumer needs next to it.

The service, the batch-scoring CLI, evaluation and the benchmarks all go through ``open_model`` so they apply
the same preprocessing and the same calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import CheckpointError, load_model
from .config import SNodeViTConfig
from .images import Preprocessing
from .inference import Calibration, Prediction, SamplingBackend, predict

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

    @property
    def version(self) -> str:
        return self.weights_sha256[:12]

    def predict(self, images: torch.Tensor, **kwargs: Any) -> Prediction:
        """``snodevit.predict`` with this model's calibration and pooling."""
        kwargs.setdefault("calibration", self.calibration)
        kwargs.setdefault("pool", self.cfg.pool)
        return predict(self.backend, images.to(self.device), **kwargs)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return device


def open_model(path: str | Path, backend: BackendName = "torch", device: str = "auto") -> LoadedModel:
    """Open a model directory (torch) or an exported .onnx file / a directory holding ``model.onnx`` (onnx).

    Raises:
        CheckpointError: the path holds no usable model for that backend.
    """
    path = Path(path)
    dev = _resolve_device(device)
    if backend == "torch":
        if path.suffix == ".onnx":
            raise CheckpointError(f"{path} is an ONNX file; use backend 'onnx' for it")
        model, meta = load_model(path, map_location=dev)
        if "preprocessing" not in meta or "class_names" not in meta:
            raise CheckpointError(f"{path}/meta.json lacks class_names/preprocessing; was it written by snodevit train?")
        return LoadedModel(model, "torch", dev, model.cfg, list(meta["class_names"]),
                           Preprocessing.from_dict(meta["preprocessing"]), Calibration.from_dict(meta.get("calibration")),
                           str(meta.get("weights_sha256", "")), str(path), meta)
    if backend == "onnx":
        from export.runtime import OnnxPredictor

        onnx_path = path / "model.onnx" if path.is_dir() else path
        if not onnx_path.is_file():
            raise CheckpointError(f"no ONNX graph at {onnx_path}; create one with `snodevit export`")
        pred = OnnxPredictor(onnx_path, device=device)  # its "auto" also checks ORT's CUDA provider
        dev = str(pred.device)
        return LoadedModel(pred, "onnx", dev, pred.cfg, list(pred.class_names), pred.preprocessing,
                           pred.calibration, pred.weights_sha256, str(onnx_path), {})
    raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
