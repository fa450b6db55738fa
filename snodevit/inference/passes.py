"""Monte Carlo passes: the noise drawn per image from its seed, and the samples folded into the batch in passes that
fit the cache."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from snodevit.inference.fitted import Calibration
from snodevit.inference.precision import Precision, autocast


class SamplingBackend(Protocol):
    """What ``predict`` needs from a model: the noise shape and folded Monte Carlo logits."""

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]: ...

    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      return_attention: bool = False,
                      return_features: bool = False) -> Tensor | tuple[Tensor, ...]: ...


def draw_noise(backend: SamplingBackend, seeds: Sequence[int], num_samples: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Noise (S, B, ...) where column b is drawn from a CPU generator seeded with ``seeds[b]``, sample by sample.

    Drawing on the CPU makes the noise, and so the answer, identical on every device and backend; it costs a
    few thousand normals per sample, far below the forward pass. One draw per sample (not one for all S) makes
    the first n samples of any longer draw exactly the draw of n, which adaptive sampling relies on.
    """
    tail = backend.noise_shape(1, 1)[2:]  # (L, K, N, m)
    noise = torch.empty((num_samples, len(seeds), *tail), dtype=dtype)
    for b, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(s)
        for i in range(num_samples):
            torch.randn(tail, generator=gen, dtype=dtype, out=noise[i, b])
    return noise.to(device)


# Images x samples per forward pass on a CPU. A pass's activations should stay in cache: per sample, tiny and small
# (MNIST preset, 50 tokens) ran 10-30 % slower in passes of 256-512 rows than of 32-128 on this project's 2-core
# machine (single-thread CPU time, so background load did not decide it). GPUs take the whole fold in one pass.
CPU_ROWS_PER_PASS = 64


def sample_in_passes(backend: SamplingBackend, images: Tensor, noise: Tensor, *, attention: bool = False,
                     features: bool = False, max_rows: int | None = None,
                     precision: Precision = "fp32") -> Tensor | tuple[Tensor, ...]:
    """``backend.sample_logits(images, noise=noise)`` in passes of at most ``max_rows`` images x samples.

    Each pass folds its samples into the batch with the prefix computed once per image; images are split first,
    and a lone image's samples only when S alone exceeds ``max_rows``.

    Args:
        backend: the model or an ONNX Runtime predictor.
        images: (B, C, H, W).
        noise: (S, B, ...) standard normals.
        attention: also return the applied attention (S, B, depth, N, N).
        features: also return the pooled features of the OOD gate (S, B, G, D).
        max_rows: the most rows per pass; None: ``CPU_ROWS_PER_PASS`` on a CPU (that many images, whatever S, for a
            model whose samples share all but the last Euler step), everything at once elsewhere.
        precision: "fp32", or "bf16" to run the passes under bf16 autocast (``snodevit.inference.precision``; already
            resolved, so never "auto").

    Returns:
        Logits (S, B, classes) [, attention] [, features], as one ``sample_logits`` call would give them (up to
        float32 rounding when the passes differ in shape); in fp32 after bf16 passes.
    """
    with autocast(precision, images.device):
        out = _sample_in_passes(backend, images, noise, attention, features, max_rows)
    if precision == "fp32":  # the backend's own dtype (float64 models stay float64)
        return out
    return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _sample_in_passes(backend: SamplingBackend, images: Tensor, noise: Tensor, attention: bool, features: bool,
                      max_rows: int | None) -> Tensor | tuple[Tensor, ...]:
    s, b = noise.shape[:2]
    if max_rows is None:
        cfg = getattr(backend, "cfg", None)
        cheap = cfg is not None and cfg.samples_share_all_but_last_step  # a sample is no block: count images
        max_rows = (CPU_ROWS_PER_PASS * (s if cheap else 1)) if images.device.type == "cpu" else s * b
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    flags = {"return_attention": attention, "return_features": features} if features else \
        {"return_attention": attention}  # a baseline without features never sees the keyword
    if s * b <= max_rows:
        return backend.sample_logits(images, s, noise, **flags)
    per_pass_images = max(1, max_rows // s)
    per_pass_samples = s if per_pass_images > 1 else min(s, max_rows)
    rows = []  # one list of passes per image group, each pass a tuple of outputs
    for i in range(0, b, per_pass_images):
        cols = []
        for j in range(0, s, per_pass_samples):
            part = noise[j:j + per_pass_samples, i:i + per_pass_images]
            out = backend.sample_logits(images[i:i + per_pass_images], part.shape[0], part, **flags)
            cols.append(out if isinstance(out, tuple) else (out,))
        rows.append(cols)
    joined = tuple(torch.cat([torch.cat([c[k] for c in cols], dim=0) for cols in rows], dim=1)
                   for k in range(len(rows[0][0])))
    return joined if len(joined) > 1 else joined[0]


def run_passes(backend: SamplingBackend, images: Tensor, noise: Tensor, cal: Calibration,
                attention: bool, precision: Precision) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logits (S, B, C), attention or None, and the gate features (S, B, G, D) or None, of one set of passes;
    all fp32 whatever the passes ran in, so every figure computed from them is summed in fp32 or wider."""
    out = sample_in_passes(backend, images, noise, attention=attention, features=cal.needs_features,
                           precision=precision)
    outs = out if isinstance(out, tuple) else (out,)
    return outs[0], (outs[1] if attention else None), (outs[-1] if cal.needs_features else None)
