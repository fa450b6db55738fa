"""ONNX Runtime predictor: an exported graph behind the same sampling interface as the PyTorch model.

``OnnxPredictor`` implements ``snodevit.inference.SamplingBackend`` (``noise_shape`` and ``sample_logits``), so
``snodevit.inference.predict`` runs unchanged on it: the noise is drawn per image from its seed by ``predict``
and fed to the graph's ``noise`` input. Everything else a server needs (config, class names, preprocessing,
calibration, weights hash) comes from the file's metadata.

On a CUDA machine (ONNX Runtime's CUDA provider present and ``torch.cuda.is_available()``) inputs and outputs
are bound to torch CUDA tensors with IOBinding, so they never make a host round trip; otherwise only the CPU
provider is requested, so no CUDA error is logged on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from snodevit.checkpoint import CheckpointError
from snodevit.config import SNodeViTConfig
from snodevit.data import Preprocessing
from snodevit.device import resolve_device
from snodevit.inference.backends import LoadedModel, meta_beside, register_backend
from snodevit.inference.fitted import Calibration
from snodevit.inference.precision import Precision

from .metadata import ATTENTION, FEATURES, IMAGES, LOGITS, NOISE, OnnxModelError, check_file, decode_metadata

logger = logging.getLogger(__name__)

ONNX = "onnx"  # the backend name: ``open_model(path, backend=ONNX)``, ``SNODEVIT_BACKEND=onnx``


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's FMA units, so they do not help)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical))


def cuda_available() -> bool:
    """True when both ONNX Runtime's CUDA provider and a CUDA device for torch are present."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _resolve_device(device: str) -> torch.device:
    return resolve_device(device, cuda_ok=cuda_available(),
                          cuda_needs="ONNX Runtime's CUDAExecutionProvider with a CUDA device for torch")


def _session_options(intra_op_threads: int | None, graph_optimization: str) -> Any:
    """ONNX Runtime's session options: the optimisation level, the threads, no spinning.

    Raises:
        ValueError: fewer than one thread, or an unknown optimisation level.
    """
    import onnxruntime as ort

    if intra_op_threads is not None and intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if graph_optimization not in levels:
        raise ValueError(f"graph_optimization must be one of {list(levels)}, got {graph_optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[graph_optimization]
    opts.intra_op_num_threads = intra_op_threads or physical_cores()
    opts.inter_op_num_threads = 1  # the graph is a chain of blocks: nothing to run in parallel
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin by default; on a CPU shared with other workers that burns the cycles they
    # need (2 threads on a busy 2-core box: 46 ms spinning vs 39 ms not, B=1 S=8) for ~nothing when idle.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _providers(device: torch.device) -> list[Any]:
    """The execution providers for ``device``: CUDA (CPU as fallback) on a GPU, else only the CPU's."""
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _open_session(path: Path, opts: Any, providers: list[Any]) -> Any:
    """An ONNX Runtime session of the graph at ``path``.

    Raises:
        OnnxModelError: a file ONNX Runtime cannot read or load, naming it and the problem.
    """
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    errors = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.NoModel,
              ort_errors.NotImplemented, ort_errors.RuntimeException)
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except ort_errors.InvalidProtobuf as e:
        raise OnnxModelError(f"{path} is not a readable ONNX model (truncated or corrupt?): {e}") from e
    except errors as e:
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load this model: {e}") from e


class OnnxPredictor:
    """Monte Carlo logits from an exported graph; a drop-in ``SamplingBackend`` for ``predict``.

    Attributes:
        cfg: the model's ``SNodeViTConfig``, rebuilt from the metadata.
        class_names, preprocessing, calibration, weights_sha256: from the metadata.
        metadata: every decoded metadata value (see ``export.metadata``).
        device: where inputs are bound and outputs returned (cpu or cuda:N).
        has_attention: whether the graph has the ``attention`` output.
    """

    def __init__(self, path: str | Path, *, device: str = "auto", intra_op_threads: int | None = None,
                 graph_optimization: str = "all") -> None:
        """Open ``path`` with ONNX Runtime.

        Args:
            path: an ``.onnx`` file written by ``export_onnx``.
            device: "auto" (CUDA when usable, else CPU), "cpu", "cuda" or "cuda:N".
            intra_op_threads: CPU threads of one inference; None uses the physical cores.
            graph_optimization: ONNX Runtime's graph optimisation level: "disable", "basic", "extended" or
                "all" (the default; ``make bench`` compares them).

        Raises:
            FileNotFoundError: no such file.
            OnnxModelError: an empty, truncated, corrupt or foreign file (the message names it and the problem).
            ValueError: an unknown device or optimisation level, or CUDA asked for where it is not available.
        """
        self.path = Path(path)
        check_file(self.path)
        self.device = _resolve_device(device)
        self._session = _open_session(self.path, _session_options(intra_op_threads, graph_optimization),
                                      _providers(self.device))
        meta = decode_metadata(self._session.get_modelmeta().custom_metadata_map, self.path)
        self.metadata: dict[str, Any] = meta
        self.cfg: SNodeViTConfig = meta["config"]
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing: Preprocessing = meta["preprocessing"]
        self.calibration: Calibration = meta["calibration"]
        self.weights_sha256: str = meta["weights_sha256"]
        self._static = meta["static_sizes"]  # {"batch_size", "num_samples"} or None
        self._output_names = [o.name for o in self._session.get_outputs()]
        self._check_graph()
        self.has_attention = ATTENTION in self._output_names
        self.has_features = FEATURES in self._output_names
        if self.calibration.needs_features and not self.has_features:
            raise OnnxModelError(f"{self.path}: its calibration has a feature-density out-of-distribution gate, but "
                                 "the graph has no 'features' output (exported by an older snodevit); re-export it "
                                 "with `snodevit export`")
        logger.info("loaded %s on %s (providers %s)", self.path, self.device, self._session.get_providers())

    def _check_graph(self) -> None:
        """The graph's inputs and outputs must be the ones the metadata describes."""
        c = self.cfg
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        want_images = [c.in_channels, c.image_size, c.image_size]
        want_tail = list(c.noise_shape(1, 1)[2:])
        ok = (set(inputs) == {IMAGES, NOISE} and len(inputs[IMAGES]) == 4 and list(inputs[IMAGES][1:]) == want_images
              and len(inputs[NOISE]) == 6 and list(inputs[NOISE][2:]) == want_tail
              and self._output_names[:1] == [LOGITS] and set(self._output_names) <= {LOGITS, ATTENTION, FEATURES})
        if not ok:
            got = {"inputs": inputs, "outputs": self._output_names}
            raise OnnxModelError(f"{self.path}: the graph's inputs/outputs {got} do not match its metadata "
                                 f"(images (B, {', '.join(map(str, want_images))}), noise (S, B, "
                                 f"{', '.join(map(str, want_tail))}) -> logits [, attention] [, features])")

    @property
    def providers(self) -> list[str]:
        """Execution providers the session runs on, in priority order."""
        return self._session.get_providers()

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]:
        """Shape of the noise input: (S, B, depth, K, N, m)."""
        return self.cfg.noise_shape(batch_size, num_samples)

    def _check_images(self, images: Tensor) -> None:
        self.cfg.check_images(images)

    def _check_noise(self, noise: Tensor, batch_size: int, num_samples: int | None) -> None:
        if not isinstance(noise, Tensor) or noise.dim() == 0:
            raise ValueError(f"noise must be a (S, B, depth, K, N, m) tensor, got {type(noise).__name__}")
        want = self.noise_shape(batch_size, num_samples if num_samples is not None else noise.shape[0])
        if tuple(noise.shape) != want:
            raise ValueError(f"noise must have shape (S, B, depth, K, N, m) = {want} for this input, "
                             f"got {tuple(noise.shape)}")
        if self._static and (batch_size, want[0]) != (self._static["batch_size"], self._static["num_samples"]):
            raise ValueError(f"{self.path} was exported with static shapes: it takes exactly "
                             f"B={self._static['batch_size']} images and S={self._static['num_samples']} samples, "
                             f"got B={batch_size}, S={want[0]}")

    @torch.no_grad()
    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      generator: torch.Generator | None = None, return_attention: bool = False,
                      return_features: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Monte Carlo logits, the ONNX twin of ``SNodeViT.sample_logits``.

        Args:
            images: (B, C, H, W) normalised images (any float dtype, any device).
            num_samples: S; taken from ``noise`` when it is given.
            noise: (S, B, depth, K, N, m) standard normals, or None to draw them (from ``generator``).
            generator: seeds the noise drawn when ``noise`` is None.
            return_attention: also return the applied attention (S, B, depth, N, N); the graph must have been
                exported with attention maps.
            return_features: also return the pooled gate features (S, B, F, D).

        Returns:
            float32 logits (S, B, classes) [, attention] [, features], on ``images``' device.

        Raises:
            ValueError: images or noise of the wrong shape, neither num_samples nor noise given, attention asked
                of a graph without it, or sizes other than those of a static graph.
        """
        if return_attention and not self.has_attention:
            raise ValueError(f"{self.path} was exported without attention maps; re-export it with "
                             "`snodevit export --attention-maps`")
        if return_features and not self.has_features:
            raise ValueError(f"{self.path} has no 'features' output (exported by an older snodevit); re-export it "
                             "with `snodevit export`")
        self._check_images(images)
        b = images.shape[0]
        if noise is None:
            if num_samples is None or num_samples < 1:
                raise ValueError(f"num_samples must be >= 1 when no noise is given, got {num_samples!r}")
            noise = torch.randn(self.noise_shape(b, num_samples), generator=generator)
        self._check_noise(noise, b, num_samples)
        names = [LOGITS] + ([ATTENTION] if return_attention else []) + ([FEATURES] if return_features else [])
        if self.device.type == "cuda":
            outs = self._run_cuda(images, noise, names)
        else:
            feeds = {IMAGES: _to_numpy(images), NOISE: _to_numpy(noise)}
            outs = [torch.from_numpy(o) for o in self._session.run(names, feeds)]
        outs = [o.to(images.device) for o in outs]
        return tuple(outs) if len(outs) > 1 else outs[0]

    def _run_cuda(self, images: Tensor, noise: Tensor, names: list[str]) -> list[Tensor]:
        """Run with IOBinding on torch CUDA tensors: no host round trip for inputs or outputs."""
        dev = self.device
        x = images.detach().to(dev, torch.float32).contiguous()
        n = noise.detach().to(dev, torch.float32).contiguous()
        s, b = n.shape[:2]
        c = self.cfg
        shapes = {LOGITS: (s, b, c.num_classes), ATTENTION: (s, b, c.depth, c.num_tokens, c.num_tokens),
                  FEATURES: (s, b, c.num_gate_features, c.gate_feature_dim)}
        outs = [torch.empty(shapes[name], device=dev, dtype=torch.float32) for name in names]
        binding = self._session.io_binding()
        for name, t in ((IMAGES, x), (NOISE, n)):
            if t.numel() == 0:  # a deterministic model's (S, B, depth, K, N, 0) noise has no device buffer to bind
                binding.bind_cpu_input(name, t.cpu().numpy())
            else:
                binding.bind_input(name, "cuda", dev.index, np.float32, tuple(t.shape), t.data_ptr())
        for name, t in zip(names, outs):
            binding.bind_output(name, "cuda", dev.index, np.float32, tuple(t.shape), t.data_ptr())
        # ONNX Runtime runs on its own stream: the copies above, queued on torch's stream, must be done first.
        torch.cuda.current_stream(dev).synchronize()
        self._session.run_with_iobinding(binding)  # synchronises its stream before returning
        return outs

    def __repr__(self) -> str:
        c = self.cfg
        return (f"OnnxPredictor({str(self.path)!r}, device={str(self.device)!r}, {c.attention}/{c.solver}, "
                f"{c.num_classes} classes, attention_output={self.has_attention})")


def _to_numpy(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def open_onnx(path: Path, device: str, precision: Precision) -> LoadedModel:
    """The "onnx" backend of ``snodevit.inference.backends.open_model``: an exported graph, or a folder holding
    ``model.onnx`` (with its meta.json beside it when that describes the same weights and calibration)."""
    onnx_path = path / "model.onnx" if path.is_dir() else path
    if not onnx_path.is_file():
        raise CheckpointError(f"no ONNX graph at {onnx_path}; create one with `snodevit export`")
    pred = OnnxPredictor(onnx_path, device=device)  # its "auto" also checks ORT's CUDA provider
    return LoadedModel(pred, ONNX, str(pred.device), pred.cfg, list(pred.class_names), pred.preprocessing,
                       pred.calibration, pred.weights_sha256, str(onnx_path),
                       meta_beside(onnx_path, pred.weights_sha256, pred.calibration), precision)


register_backend(ONNX, open_onnx)
