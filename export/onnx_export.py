"""Export a SNodeViT to one self-contained ONNX file with the noise as an input.

The graph is ``model.sample_logits`` with the Monte Carlo samples folded into the batch: inputs ``images``
(B, C, H, W) and ``noise`` (S, B, depth, K, N, m), outputs ``logits`` (S, B, classes), optionally
``attention`` (S, B, depth, N, N), and ``features`` (S, B, F, D), the pooled features the out-of-distribution
gate reads (its fitted density lives in the calibration metadata, so a recalibrated model scores the same graph).
The batch size B and the number of samples S are dynamic; the image size, the token count N and the noise tail
(depth, K, N, m) are fixed by the config. Randomness stays outside the graph,
so ONNX Runtime given the same noise reproduces PyTorch to float32 round-off, and ``snodevit.inference.predict``
draws the same per-image noise for both backends.

The graph is captured with the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``). A
deterministic model (``noise_dim == 0``) keeps the ``noise`` input, with a last dimension of size 0, because S is
read from its first dimension: every graph has the same two inputs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from calibration.files import atomic_write_bytes
from snodevit import __version__ as SNODEVIT_VERSION
from snodevit.checkpoint import weights_hash
from snodevit.model import SNodeViT

from .metadata import ATTENTION, FEATURES, IMAGES, LOGITS, NOISE, check_meta, encode_metadata

logger = logging.getLogger(__name__)

MIN_OPSET = 18  # the torch.export-based exporter emits opset 18+; lower targets are silently not converted


class _SamplingGraph(nn.Module):
    """What gets traced: ``sample_logits`` with explicit noise, one or two outputs."""

    def __init__(self, model: SNodeViT, attention_maps: bool) -> None:
        super().__init__()
        self.model = model
        self.attention_maps = attention_maps

    def forward(self, images: Tensor, noise: Tensor) -> tuple[Tensor, ...]:
        out = self.model.sample_logits(images, noise=noise, return_attention=self.attention_maps,
                                       return_features=True)
        assert isinstance(out, tuple)
        return out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter that is expected here and would read as a problem on the CLI.

    * onnxscript's constant folder skips multi-output ``Split`` nodes (the TimeNet chunks); ONNX Runtime folds
      them at session creation, so nothing is lost.
    * torch warns that the two ``batch`` axes (of ``images`` and ``noise``) share one name, which is the intent.
    """
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used.*")
            yield
    finally:
        folding.setLevel(level)


def _check_sizes(opset: int | None, dynamic: bool, batch_size: int, num_samples: int) -> None:
    """Refuse an opset the exporter cannot emit and example sizes it could specialise (see :func:`export_onnx`)."""
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (the torch.export-based exporter emits opset 18+), got {opset}")
    if dynamic and (batch_size < 2 or num_samples < 2 or batch_size == num_samples):
        raise ValueError("a dynamic export needs example sizes batch_size >= 2 and num_samples >= 2 that differ, "
                         f"got batch_size={batch_size}, num_samples={num_samples}")
    if not dynamic and (batch_size < 1 or num_samples < 1):
        raise ValueError(f"batch_size and num_samples must be >= 1, got {batch_size} and {num_samples}")


def _trace(model: SNodeViT, attention_maps: bool, dynamic: bool, batch_size: int, num_samples: int,
           opset: int | None) -> Any:
    """The exporter's ONNXProgram of ``model`` in eval mode (its training flag is restored afterwards).

    The example images and noise are seeded, so the same model always gives the same graph.
    """
    cfg = model.cfg
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen).to(p.device)
    noise = torch.randn(model.noise_shape(batch_size, num_samples), generator=gen).to(p.device)
    dynamic_shapes = None
    if dynamic:
        batch, samples = torch.export.Dim("batch"), torch.export.Dim("num_samples")
        dynamic_shapes = {"images": {0: batch}, "noise": {0: samples, 1: batch}}
    outputs = [LOGITS, ATTENTION, FEATURES] if attention_maps else [LOGITS, FEATURES]
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporter():
            # onnxscript's graph optimizer miscompiles the static-shape graph of SDEBlock.forward_shared (measured:
            # logits off by 3.4 against torch.export's program, which is exact; the dynamic graph is exact), so
            # such a graph is exported unoptimised (ONNX Runtime still optimises it when the session opens)
            optimize = dynamic or not cfg.samples_share_all_but_last_step
            program = torch.onnx.export(_SamplingGraph(model, attention_maps).eval(), (images, noise), dynamo=True,
                                        dynamic_shapes=dynamic_shapes, input_names=[IMAGES, NOISE],
                                        output_names=outputs, opset_version=opset, verbose=False,
                                        optimize=optimize)
    finally:
        model.train(was_training)
    return program


def export_onnx(model: SNodeViT, path: str | Path, *, meta: Mapping[str, Any], opset: int | None = None,
                attention_maps: bool = False, dynamic: bool = True, batch_size: int = 2,
                num_samples: int = 3) -> Path:
    """Export ``model.sample_logits`` to a self-contained ONNX file, checked and written atomically.

    Args:
        model: the model; exported in eval mode (its training flag is restored afterwards).
        path: destination ``.onnx`` file (replaced atomically: readers never see a partial file).
        meta: checkpoint metadata (``meta.json``): ``class_names``, ``preprocessing``, optional ``calibration``.
        opset: ONNX opset of the default domain, >= 18; None keeps the exporter's default.
        attention_maps: add the ``attention`` output (S, B, depth, N, N): applied attention per block, mean over
            heads and solver evaluations, the input of ``snodevit.inference.attention_maps`` (maps and rollout).
        dynamic: B and S dynamic (default). False fixes them to ``batch_size`` and ``num_samples``.
        batch_size: B of the example inputs (>= 2 when dynamic so the exporter cannot specialise it to 1), or
            the fixed B of a static graph.
        num_samples: S of the example inputs (>= 2 and != batch_size when dynamic), or the fixed S.

    Returns:
        The path written.

    Raises:
        ValueError: unsupported opset or example sizes, or ``meta`` without class names or preprocessing, or
            that does not fit the model (see ``export.metadata.check_meta``).
    """
    import onnx
    from onnxscript import ir
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import expand_before_binary_op_rules

    _check_sizes(opset, dynamic, batch_size, num_samples)
    cfg = model.cfg
    check_meta(cfg, meta)  # fail before the (slow) export, not after
    path = Path(path)
    program = _trace(model, attention_maps, dynamic, batch_size, num_samples, opset)
    ir_model = program.model  # dynamo=True always returns an ONNXProgram
    actual_opset = ir_model.opset_imports.get("", 0)
    if opset is not None and actual_opset != opset:
        raise ValueError(f"the exporter produced opset {actual_opset}, not the requested {opset}")
    # F.normalize lowers to x / Expand(norm, shape(x)); Div broadcasts by itself, and the 24 Expands of a
    # 6-block model cost ~5% of a CPU forward pass.
    rewrite(ir_model, pattern_rewrite_rules=expand_before_binary_op_rules)
    kind = "SDE" if cfg.stochastic else "ODE"
    image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    ir_model.doc_string = (f"snodevit {kind} ViT ({cfg.attention} attention): images {image_shape} + "
                           "noise -> Monte Carlo logits; see metadata_props snodevit.*")
    ir_model.metadata_props.update(encode_metadata(
        cfg, meta, weights_sha256=weights_hash(model), opset=actual_opset, attention_maps=attention_maps,
        static_sizes=None if dynamic else (batch_size, num_samples), version=SNODEVIT_VERSION))
    data = ir.serde.serialize_model(ir_model).SerializeToString()
    atomic_write_bytes(path, data, lambda tmp: onnx.checker.check_model(tmp, full_check=True))
    logger.info("exported %s (%d bytes, opset %d)", path, len(data), actual_opset)
    return path


@torch.no_grad()
def check_parity(model: SNodeViT, predictor: Any, *, batch_size: int = 4, num_samples: int = 4,
                 seed: int = 0) -> float:
    """Max abs difference of logits between ``model`` and an ``OnnxPredictor`` on random images, same noise.

    Args:
        model: the PyTorch model (evaluated in eval mode, on its device).
        predictor: the ONNX Runtime predictor of its export.
        batch_size, num_samples: B and S of the check.
        seed: seeds the images and the noise.

    Returns:
        max |logits_torch - logits_onnx| over the (S, B, classes) logits.
    """
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    noise = torch.randn(model.noise_shape(batch_size, num_samples), generator=gen)
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        ref = model.sample_logits(images.to(p.device), noise=noise.to(p.device)).float().cpu()
    finally:
        model.train(was_training)
    got = predictor.sample_logits(images, noise=noise).float().cpu()
    return float((ref - got).abs().max())
