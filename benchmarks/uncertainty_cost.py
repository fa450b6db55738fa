"""Cost of each method in ``benchmarks/uncertainty.py``: forward FLOPs per image over all samples and CPU
milliseconds per image of ``snodevit.predict``."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from uncertainty_eval import build_backend
from uncertainty_plan import Budget, Method, num_samples_of


def measure_cost(method: Method, budget: Budget, runs: Path) -> dict[str, Any]:
    """Forward FLOPs per image (all samples) and CPU ms per image of predict() at batch ``timing_batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    from snodevit import count_parameters, predict
    from snodevit.evaluation import pass_seeds

    backend = build_backend(method, budget.seeds[0], budget, runs, "cpu")
    s = num_samples_of(method, budget)
    b = budget.timing_batch
    x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(backend.noise_shape(b, s), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backend.sample_logits(x, s, noise)
    flops = counter.get_total_flops() / b
    models = backend.members if hasattr(backend, "members") else [getattr(backend, "model", backend)]
    params = sum(count_parameters(m) for m in models)
    threads = torch.get_num_threads()
    torch.set_num_threads(budget.cpu_threads)
    try:
        seeds = pass_seeds(0, 0, b)
        for _ in range(2):
            predict(backend, x, num_samples=s, seed=seeds)
        times = []
        for _ in range(budget.timing_repeats):
            t = time.perf_counter()
            predict(backend, x, num_samples=s, seed=seeds)
            times.append((time.perf_counter() - t) * 1e3 / b)
    finally:
        torch.set_num_threads(threads)
    return {"num_samples": s, "flops_per_image": flops, "cpu_ms_per_image": statistics.median(times),
            "cpu_ms_per_image_min": min(times), "parameters": params}
