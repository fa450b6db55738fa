"""Prometheus metrics of the service, shown by BentoML's ``/metrics`` next to its own.

``prometheus_client`` is imported on first use, inside the serving worker: BentoML sets
``PROMETHEUS_MULTIPROC_DIR`` after importing the service module, and a client imported earlier would count
in single-process mode, invisible to ``/metrics``. The metrics are created once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServiceMetrics:
    images: Any  # Counter{endpoint}: images answered
    samples: Any  # Counter: Monte Carlo samples run (images * num_samples)
    decisions: Any  # Counter{decision, reason}: accept / review answers by reason code
    ood_ratio: Any  # Histogram: out-of-distribution gate score / threshold (> 1: sent to review as OOD)
    batch_size: Any  # Histogram: images per forward pass
    samples_per_image: Any  # Histogram: Monte Carlo samples each answered image used (adaptive answers: fewer)
    errors: Any  # Counter{error, status}: refused requests by error code

    def record_error(self, error: str, status: int) -> None:
        self.errors.labels(error=error, status=str(status)).inc()


#: Buckets of ``snodevit_ood_score_ratio``: fine below the threshold (1), where in-distribution traffic lives and
#: drift first shows, coarse far above it.
OOD_RATIO_BUCKETS: tuple[float, ...] = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0, 16.0, 64.0)


#: Buckets of ``snodevit_samples_per_image``: the fitted sample counts and the adaptive rounds (8, 16, 24, 32).
SAMPLE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 24, 32, 64, 128, 256)


@functools.cache
def service_metrics() -> ServiceMetrics:
    """The process's metrics (created on first call)."""
    import prometheus_client as prom

    return ServiceMetrics(
        images=prom.Counter("snodevit_images", "Images answered", ["endpoint"]),
        samples=prom.Counter("snodevit_mc_samples", "Monte Carlo samples run (images x num_samples)"),
        decisions=prom.Counter("snodevit_decisions", "Answers by accept/review decision and reason code "
                               "(accepted, low_confidence, out_of_distribution)", ["decision", "reason"]),
        ood_ratio=prom.Histogram("snodevit_ood_score_ratio", "Out-of-distribution gate score divided by its "
                                 "threshold, per answered image (above 1: sent to review as out of distribution); "
                                 "a shift of this histogram is input drift", buckets=OOD_RATIO_BUCKETS),
        batch_size=prom.Histogram("snodevit_batch_size", "Images per forward pass",
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
        errors=prom.Counter("snodevit_errors", "Refused requests by error code", ["error", "status"]),
        samples_per_image=prom.Histogram("snodevit_samples_per_image", "Monte Carlo samples each answered image "
                                         "used (fewer than asked when num_samples=auto settled early); its _sum / "
                                         "_count is the mean", buckets=SAMPLE_BUCKETS),
    )
