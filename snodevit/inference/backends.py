"""The backend registry: open a trained model for inference on any registered backend, with everything a consumer
needs next to it.

The service, the batch-scoring CLI, evaluation and the benchmarks all go through ``open_model`` so they apply
the same preprocessing and the same calibration. This package registers the torch backend; ``export`` registers
ONNX Runtime's (``export.runtime.open_onnx``), so nothing here imports ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Callable

import torch

from snodevit.checkpoint import CheckpointError, load_model, read_meta
from snodevit.config import SNodeViTConfig
from snodevit.device import resolve_device
from snodevit.data import Preprocessing
from snodevit.inference.fitted import Calibration
from snodevit.inference.passes import SamplingBackend
from snodevit.inference.predictor import Prediction, predict
from snodevit.inference.precision import Precision, resolve_precision

Opener = Callable[[Path, str, "Precision"], "LoadedModel"]


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
    precision: Precision = "fp32"  # what its forward passes run in (``snodevit.inference.precision``)

    @property
    def version(self) -> str:
        return self.weights_sha256[:12]

    def predict(self, images: torch.Tensor, **kwargs: Any) -> Prediction:
        """``snodevit.predict`` with this model's calibration, pooling and precision."""
        kwargs.setdefault("calibration", self.calibration)
        kwargs.setdefault("precision", self.precision)
        kwargs.setdefault("pool", self.cfg.pool)
        return predict(self.backend, images.to(self.device), **kwargs)


TORCH = "torch"
ENTRY_POINT_GROUP = "snodevit.backends"
#: name -> opener(path, device, precision): every backend ``open_model`` can open. This module registers "torch";
#: ``export`` registers "onnx" (on import, and through the entry-point group for those that never import it).
_BACKENDS: dict[str, Opener] = {}


def register_backend(name: str, opener: Opener) -> None:
    """Make ``open_model(path, backend=name)`` call ``opener(path, device, precision)``."""
    _BACKENDS[name] = opener


def backend_names() -> list[str]:
    """Every backend this installation can open (registered, or offered by an installed package)."""
    return sorted({*_BACKENDS, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def _opener(name: str) -> Opener:
    if name not in _BACKENDS:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            register_backend(name, ep.load())
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return _BACKENDS[name]


def open_model(path: str | Path, backend: str = TORCH, device: str = "auto",
               precision: str = "fp32") -> LoadedModel:
    """Open a model directory (torch) or an exported .onnx file / a directory holding ``model.onnx`` (onnx).

    ``precision`` ("fp32", "bf16" or "auto", see ``snodevit.inference.precision``) is what its ``predict`` runs
    in; the CLI and the service default to "auto".

    Raises:
        CheckpointError: the path holds no usable model for that backend.
        ValueError: an unknown backend, device or precision, or bf16 with the onnx backend.
    """
    opener = _opener(backend)
    # resolved once, before the weights are read: the onnx backend is fp32 on any device, so the device ORT
    # settles on cannot change it
    resolved = resolve_precision(precision, resolve_device(device), backend)
    return opener(Path(path), device, resolved)


def open_torch(path: Path, device: str, precision: Precision) -> LoadedModel:
    """The torch backend: a model directory written by ``save_model``."""
    if path.suffix == ".onnx":
        raise CheckpointError(f"{path} is an ONNX file; use backend 'onnx' for it")
    dev = str(resolve_device(device))
    model, meta = load_model(path, map_location=dev)
    if "preprocessing" not in meta or "class_names" not in meta:
        raise CheckpointError(f"{path}/meta.json lacks class_names/preprocessing; was it written by snodevit train?")
    return LoadedModel(model, TORCH, dev, model.cfg, list(meta["class_names"]),
                       Preprocessing.from_dict(meta["preprocessing"]), Calibration.from_dict(meta.get("calibration")),
                       str(meta.get("weights_sha256", "")), str(path), meta, precision)


register_backend(TORCH, open_torch)


def meta_beside(onnx_path: Path, weights_sha256: str, calibration: Calibration) -> dict[str, Any]:
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
