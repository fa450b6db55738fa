"""ONNX export with the noise as a graph input, and the ONNX Runtime predictor.

Public API::

    export_onnx(model, "model.onnx", meta=meta)            # images + noise -> logits, metadata inside
    read_onnx_metadata("model.onnx")                       # config, class names, calibration, ...
    predictor = OnnxPredictor("model.onnx")                # a SamplingBackend: snodevit.predict(predictor, ...)
"""

from .metadata import OnnxModelError, read_onnx_metadata
from .onnx_export import check_parity, export_onnx
from .runtime import OnnxPredictor

__all__ = ["OnnxModelError", "OnnxPredictor", "check_parity", "export_onnx", "read_onnx_metadata"]
