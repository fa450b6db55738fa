"""Service settings, read from ``SNODEVIT_*`` environment variables.

The service reads them when it starts (``SNodeViTService.__init__``, and the request guard when BentoML builds
the app). Only :data:`DECLARED_FIELDS` are read when ``service.service`` is imported: the class declaration needs
them (the decorator's traffic timeout, the model reference at class scope, the bounds and defaults of the API
signatures).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from snodevit.data import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from snodevit.inference.params import DEFAULT_NUM_SAMPLES
from snodevit.inference.precision import PRECISIONS


def _torch_threads(workers: int) -> int:
    """Intra-op threads of each of ``workers`` processes: torch's own count (OMP_NUM_THREADS when set, else the
    physical cores) shared out, at least 1, so that the workers together do not oversubscribe the cores."""
    return max(1, torch.get_num_threads() // workers)


BackendName = Literal["torch", "onnx"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
ENV_PREFIX = "SNODEVIT_"
#: What ``service.service`` reads when it is imported (by ``bentoml serve``'s main process, ``bentoml build`` and
#: each worker): the model tag (the class-scope model reference a Bento packs), the request timeout (BentoML's
#: traffic timeout is a backstop behind it), what the API signatures declare (the bounds of num_samples, the
#: defaults of num_samples and top_k), and the worker processes the decorator starts. Every other field is read
#: when the service starts.
DECLARED_FIELDS: tuple[str, ...] = ("model", "timeout_s", "num_samples", "max_num_samples", "auto_max_samples",
                                    "top_k", "workers")


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and defaults of the HTTP service. Each field ``x`` is read from ``SNODEVIT_<X>``."""

    model: str = "snodevit-mnist:latest"  # BentoML model store tag of the model to serve
    backend: BackendName = "torch"  # "torch" (PyTorch) or "onnx" (ONNX Runtime on the stored model.onnx)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda[:i]"
    precision: str = "auto"  # "fp32", "bf16" (autocast) or "auto" (one rule for every path: resolve_precision)
    num_samples: int = DEFAULT_NUM_SAMPLES  # Monte Carlo samples per image when a request does not say
    max_num_samples: int = 256  # the most samples one request may ask for
    auto_max_samples: int = 32  # the most samples num_samples="auto" draws for one image (adaptive sampling)
    top_k: int = 3  # classes listed in ``top_k`` when a request does not say
    max_bytes: int = DEFAULT_MAX_BYTES  # largest accepted image file, bytes
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest accepted image, width * height (checked on the header)
    max_images: int = 64  # the most images in one /classify_batch request
    max_request_bytes: int = 32 * 2**20  # largest /classify_batch body (single-image routes: max_bytes + 64 KiB)
    max_batch_size: int = 32  # the most images in one forward pass; 1 turns adaptive micro-batching off
    max_batch_rows: int = 4096  # the most images * samples in one forward pass (bounds activation memory)
    batch_wait_ms: float = 5.0  # in a burst or under load: how long an idle server waits for images to share a pass
    max_concurrency: int = 64  # requests in progress before new ones are refused with 429
    max_buffered_bytes: int = 256 * 2**20  # request bodies held in memory at once, all requests together (429 beyond)
    timeout_s: float = 60.0  # a request still waiting for its answer after this long gets 504
    max_queue_wait_s: float = 1.0  # admission: requests admitted at once = measured images/s * this (429 beyond)
    drain_s: float = 25.0  # on SIGTERM: how long admitted requests get to finish (503 after); < Kubernetes' 30 s
    workers: int = 1  # server processes (BentoML ``workers``), each with its own model and batcher, on one port
    threads: int = 0  # torch intra-op threads of each worker's model; 0: the cores shared out, cores // workers

    def __post_init__(self) -> None:
        if self.threads == 0 and isinstance(self.workers, int) and self.workers > 0:
            object.__setattr__(self, "threads", _torch_threads(self.workers))
        if not self.model.strip():
            raise ValueError(f"{ENV_PREFIX}MODEL must name a model in the BentoML store, e.g. snodevit-mnist:latest")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{ENV_PREFIX}PRECISION must be one of {list(PRECISIONS)}, got {self.precision!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and not value > 0:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be > 0, got {value!r}")
        if self.auto_max_samples > self.max_num_samples:
            raise ValueError(f"{ENV_PREFIX}AUTO_MAX_SAMPLES ({self.auto_max_samples}) must be <= "
                             f"{ENV_PREFIX}MAX_NUM_SAMPLES ({self.max_num_samples})")
        if self.num_samples > self.max_num_samples:
            raise ValueError(f"{ENV_PREFIX}NUM_SAMPLES ({self.num_samples}) must be <= {ENV_PREFIX}MAX_NUM_SAMPLES "
                             f"({self.max_num_samples})")

    @property
    def max_single_request_bytes(self) -> int:
        """Body cap of single-image routes: the image plus room for the multipart envelope and parameters."""
        return self.max_bytes + 64 * 2**10

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 only: Collection[str] | None = None) -> ServiceSettings:
        """Read ``SNODEVIT_<FIELD>`` variables; unset ones keep their defaults.

        Args:
            environ: the variables; None reads ``os.environ``.
            only: read just these fields (e.g. :data:`DECLARED_FIELDS`); the others keep their defaults, whatever
                the variables say. None reads every field.

        Raises:
            ValueError: a value that does not parse or is out of range, naming the variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key not in environ or (only is not None and f.name not in only):
                continue
            raw = environ[key].strip()
            try:
                values[f.name] = int(raw) if f.type == "int" else float(raw) if f.type == "float" else raw
            except ValueError:
                kind = "an integer" if f.type == "int" else "a number"
                raise ValueError(f"{key} must be {kind}, got {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]
