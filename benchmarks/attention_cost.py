"""Cost of every attention backend against token count: parameters, counted FLOPs, median CPU latency.

Models are built per size with random weights (timing does not depend on them); latency is taken on the CPU with
a fixed thread count, the backends timed in alternation so drifting background load hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from attention_plan import BACKENDS, Plan, model_config


def count_flops(model: Any, images: torch.Tensor, noise: torch.Tensor) -> int:
    """Forward FLOPs of ``sample_logits`` as FlopCounterMode counts them (2 per multiply-add of matmuls/convs).

    FlopCounterMode does not count the CPU kernel behind fused ``scaled_dot_product_attention``, so a fused
    softmax model is counted on its explicit twin (same weights, same arithmetic).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from snodevit import SNodeViT

    if model.cfg.fused_attn and model.cfg.attention == "softmax":
        twin = SNodeViT(model.cfg.replace(fused_attn=False)).eval()
        twin.load_state_dict(model.state_dict())
        model = twin
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.sample_logits(images, noise=noise)
    return int(counter.get_total_flops())


def _time_alternating(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, the functions called in turn so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def measure_cost(plan: Plan, progress: bool) -> list[dict[str, Any]]:
    """Params, FLOPs and median CPU latency of every backend at every size, B=1 and S folded samples."""
    from tqdm.auto import tqdm

    from snodevit import SNodeViT, count_parameters

    torch.set_num_threads(plan.threads)
    rows = []
    for size in tqdm(plan.sizes, desc="CPU cost", unit="size", disable=not progress, dynamic_ncols=True):
        models = {}
        for name, overrides in BACKENDS:
            torch.manual_seed(0)
            models[name] = SNodeViT(model_config(name, overrides, plan, image_size=size)).eval()
        first = next(iter(models.values()))
        gen = torch.Generator().manual_seed(size)
        images = torch.randn(1, 1, size, size, generator=gen)
        noise = torch.randn(first.noise_shape(1, plan.num_samples), generator=gen)

        def call(m: Any) -> Callable[[], Any]:
            def fn() -> Any:
                with torch.inference_mode():
                    return m.sample_logits(images, noise=noise)
            return fn

        times = _time_alternating({n: call(m) for n, m in models.items()}, plan.warmup, plan.repeats)
        for name, m in models.items():
            t = sorted(times[name])
            q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
            rows.append({"backend": name, "image_size": size, "patch_tokens": m.cfg.num_patches,
                         "tokens": m.cfg.num_tokens, "params": count_parameters(m),
                         "rank": m.cfg.effective_rank if m.cfg.attention == "ksvd" else None,
                         "flops": count_flops(m, images, noise), "latency_ms": statistics.median(t),
                         "latency_q1_ms": q1, "latency_q3_ms": q3, "runs": len(t)})
    return rows
