"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: real DDP on gloo, on loopback.

Each rank computes the DDP gradient of its half of one global batch, and also the single-process gradient of the
whole batch on an unwrapped copy of the same model (the reference); it checks the DistributedSampler split too.
Rank 0 prints one JSON line with the figures the test asserts on.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import snodevit
from snodevit.training import distributed
from snodevit.training.backprop import make_runner

# a deterministic forward (no diffusion, no dropout, a patch stem without batch norm): the gradients can agree
CONFIG = dict(image_size=28, in_channels=1, patch_size=4, num_classes=10, stem="patch", dim=24, depth=2,
              num_heads=2, rank=4, time_hidden_dim=16, noise_dim=0)


def gradients(step: torch.nn.Module, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              runner: object = None, weight: float = 1.0) -> dict[str, torch.Tensor]:
    logits, reg, _ = step(images, torch.Generator().manual_seed(0), runner, None)
    (weight * (F.cross_entropy(logits, labels) + reg)).backward()  # accumulates into .grad
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _runner(model: snodevit.SNodeViT, mode: str, rank: int) -> object:
    """The backprop mode's runner; the reversible gamma signs of rank r come from seed 10 + r."""
    return make_runner(model, mode, torch.Generator().manual_seed(10 + rank))


def backprop_mode_diffs(base: torch.nn.Module, job: distributed.Distributed, device: torch.device,
                        images: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per mode, [largest |DDP - reference|, largest |reference|] of the parameter gradients.

    The reference is one process without DDP: the mean of the two halves' losses, each half with the signs its
    rank draws, so only the all-reduce is compared (a reversible step draws gamma per sample: the halves must
    match their ranks).
    """
    figures = {}
    for mode in ("checkpoint", "reversible"):
        model, reference = copy.deepcopy(base), copy.deepcopy(base)
        share = slice(job.rank * 4, job.rank * 4 + 4)
        ddp = gradients(distributed.train_forward(model, job, device), model, images[share], labels[share],
                        _runner(model, mode, job.rank))
        step = distributed.TrainForward(reference)
        for rank in range(job.world_size):
            half = slice(rank * 4, rank * 4 + 4)
            single = gradients(step, reference, images[half], labels[half], _runner(reference, mode, rank), 0.5)
        figures[mode] = [max((ddp[n] - single[n]).abs().max().item() for n in single),
                         max(g.abs().max().item() for g in single.values())]
    return figures


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of 8 (float64 images, labels), the same on every rank."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen)


def main() -> None:
    job = distributed.from_env()
    assert job is not None, "run me with torchrun"
    device = distributed.start(job, torch.device("cpu"))
    torch.manual_seed(0)
    model = snodevit.create_model("tiny", **CONFIG).double()
    modes = backprop_mode_diffs(model, job, device, *_batch())
    reference = copy.deepcopy(model)
    images, labels = _batch()
    share = slice(job.rank * 4, job.rank * 4 + 4)
    ddp = gradients(distributed.train_forward(model, job, device), model, images[share], labels[share])
    single = gradients(distributed.TrainForward(reference), reference, images, labels)
    diff = max((ddp[n] - single[n]).abs().max().item() for n in single)
    scale = max(g.abs().max().item() for g in single.values())

    loader = distributed.train_loader(TensorDataset(torch.arange(20)), 8, torch.Generator().manual_seed(5), 0,
                                      False, job)
    seen = []
    for epoch in (1, 2):
        distributed.set_epoch(loader, epoch)
        mine = [int(i) for (batch,) in loader for i in batch]
        everyone: list[list[int]] = [[] for _ in range(job.world_size)]
        dist.all_gather_object(everyone, mine)
        seen.append(everyone)
    sums, count = distributed.all_sum(torch.tensor([1.0 + job.rank], dtype=torch.float64), 3, job)
    if job.is_main:
        print(json.dumps({"world_size": job.world_size, "grad_max_abs_diff": diff, "grad_max_abs": scale,
                          "params_with_grad": len(ddp), "params": len(list(model.parameters())),
                          "backprop_modes": modes,
                          "epochs": seen, "sum": sums.tolist(), "count": count, "rank_batch": loader.batch_size}))
    distributed.stop()


if __name__ == "__main__":
    main()
