"""Peak training memory and time per step of one model under each backprop mode (``benchmarks/memory.py``).

Peak memory is what one training step (forward + backward) allocates above what was allocated before it, with the
weights and their gradient buffers already allocated (a warm-up step first, gradients zeroed in place): the
activations autograd keeps, plus the transient buffers of the backward. On the CPU it is read from the profiler's
own allocation records (``torch.profiler`` with ``profile_memory=True``: every allocation and free of the CPU
allocator with its size, summed in time order); on CUDA from ``torch.cuda.max_memory_allocated``. Never RSS.

Time per step is a whole optimiser step (forward, backward, AdamW), the median over repeats, with the modes run in
alternation so that drifting background load hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from snodevit.config import get_config
from snodevit.model import SNodeViT
from snodevit.training.backprop import BACKPROP_MODES, make_runner

MIB = 2.0**20


def build_model(size: int, depth: int, seed: int = 0) -> SNodeViT:
    """The model measured at ``size`` px: 28 -> the shipped preset (``snodevit_mnist_every_block``: conv stem to 4x4
    patches, 50 tokens, one Euler-Maruyama step per block); 224 -> ``tiny`` on RGB with 16x16 patches (a
    ViT's patch embedding, 197 tokens), also one step per block. Only the depth changes."""
    torch.manual_seed(seed)
    if size == 28:
        cfg = get_config("snodevit_mnist_every_block", depth=depth)
    else:
        cfg = get_config("tiny", image_size=size, in_channels=3, patch_size=16, stem="patch", num_steps=1,
                         depth=depth)
    return SNodeViT(cfg)


@dataclass
class _Case:
    """One model on one device with its batch, optimiser and a runner per mode."""

    model: SNodeViT
    images: Tensor
    labels: Tensor
    opt: torch.optim.Optimizer
    runners: dict[str, Any]
    device: torch.device


def _case(size: int, depth: int, batch: int, device: torch.device) -> _Case:
    model = build_model(size, depth).to(device).train()
    gen = torch.Generator().manual_seed(1)
    cfg = model.cfg
    images = torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    runners = {m: make_runner(model, m, torch.Generator(device=device).manual_seed(2)) for m in BACKPROP_MODES}
    return _Case(model, images, labels, opt, runners, device)


def _forward_backward(case: _Case, mode: str) -> None:
    gen = torch.Generator(device=case.device).manual_seed(3)
    logits, reg = case.model.forward_train(case.images, gen, runner=case.runners[mode])
    (F.cross_entropy(logits, case.labels) + reg).backward()


def _cpu_peak(case: _Case, mode: str) -> float:
    """Bytes above the starting allocation at the step's high point, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward_backward(case, mode)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak)


def _cuda_peak(case: _Case, mode: str) -> float:
    torch.cuda.synchronize(case.device)
    torch.cuda.reset_peak_memory_stats(case.device)
    before = torch.cuda.memory_allocated(case.device)
    _forward_backward(case, mode)
    torch.cuda.synchronize(case.device)
    return float(torch.cuda.max_memory_allocated(case.device) - before)


def peak_memory(case: _Case, mode: str) -> float:
    """Peak bytes of one forward + backward in ``mode`` above the weights and their (allocated) gradients."""
    case.model.zero_grad(set_to_none=False)
    _forward_backward(case, mode)  # warm-up: allocates the gradient buffers and any lazy state
    case.model.zero_grad(set_to_none=False)
    return _cuda_peak(case, mode) if case.device.type == "cuda" else _cpu_peak(case, mode)


def _timed_step(case: _Case, mode: str) -> float:
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
    start = time.perf_counter()
    case.opt.zero_grad(set_to_none=False)
    _forward_backward(case, mode)
    case.opt.step()
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
    return time.perf_counter() - start


def measure(size: int, depth: int, batch: int, device: torch.device, repeats: int,
            modes: tuple[str, ...] = BACKPROP_MODES) -> list[dict[str, Any]]:
    """One row per mode: peak MiB above the weights and gradients, and the median seconds of a training step."""
    case = _case(size, depth, batch, device)
    weights = sum(p.numel() * p.element_size() for p in case.model.parameters())
    peaks = {m: peak_memory(case, m) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:
        _timed_step(case, m)  # warm-up (the optimiser state is allocated by the first step)
    for _ in range(repeats):
        for m in modes:  # in alternation
            times[m].append(_timed_step(case, m))
    cfg = case.model.cfg
    return [{"size": size, "depth": depth, "batch": batch, "tokens": cfg.num_tokens, "dim": cfg.dim,
             "mode": m, "device": device.type, "peak_mib": peaks[m] / MIB, "weights_mib": weights / MIB,
             "step_s": statistics.median(times[m]), "step_s_all": times[m]} for m in modes]
