"""Data-parallel training under ``torchrun``: DistributedDataParallel (DDP), gloo on CPUs, NCCL on CUDA.

``torchrun --nproc_per_node N -m snodevit train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address) in their environment; :func:`from_env` reads them,
:func:`start` joins the process group. What changes against one process, and nothing else:

* ``TrainConfig.batch_size`` stays the global batch, images per optimiser step: each rank takes
  ``batch_size / N`` of them (:func:`rank_batch`), drawn by a :class:`DistributedSampler` (reshuffled each epoch
  with ``set_epoch``, the last partial batch dropped so every rank takes as many steps);
* the model's training forward runs inside DDP (:class:`TrainForward`), so the gradients are averaged over the
  ranks in backward, and the update equals one process's on the global batch (up to the stem's batch-norm
  statistics, which DDP on CPUs keeps per rank, and the noise, which each rank draws from its own stream);
* the epoch's figures are summed over the ranks (:func:`all_sum`); rank 0 alone validates, logs and saves.

Without ``torchrun`` (no ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``) none of this runs: :class:`TrainForward`
computes exactly what the model's own methods compute, in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from snodevit.model import SNodeViT

#: The variables torchrun sets for each process; all three or none.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_RANK_SEED_STRIDE = 1_000_003  # noise seeds of ranks r and r+1 are this far apart (rank 0 keeps the seed)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job."""

    rank: int  # 0 .. world_size - 1 over all nodes
    local_rank: int  # index on this node: which GPU it drives
    world_size: int  # processes in the job

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, logs and saves."""
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> Distributed | None:
    """The torchrun job this process belongs to, or None when it was not started by torchrun.

    Raises:
        ValueError: only some of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` are set, or they are not coherent integers.
    """
    environ = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARIABLES if k in environ]
    if not present:
        return None
    if len(present) != len(TORCHRUN_VARIABLES):
        missing = sorted(set(TORCHRUN_VARIABLES) - set(present))
        raise ValueError(f"{', '.join(present)} set but not {', '.join(missing)}: start distributed training with "
                         "torchrun, which sets all three")
    try:
        rank, world, local = (int(environ[k]) for k in TORCHRUN_VARIABLES)
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         f"{[environ[k] for k in TORCHRUN_VARIABLES]}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local <= rank):
        raise ValueError(f"incoherent torchrun variables RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Distributed(rank, local, world)


def start(job: Distributed, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPUs) and return the device this rank trains on.

    On CUDA each rank takes the GPU of its ``LOCAL_RANK``; on a CPU every rank shares the cores (give each
    ``OMP_NUM_THREADS`` = cores / ranks, which torchrun sets to 1 unless told otherwise).

    Raises:
        ValueError: a CUDA job with more ranks on this node than GPUs.
    """
    if device.type == "cuda":
        if job.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {job.local_rank} has no GPU: this node has {torch.cuda.device_count()}")
        device = torch.device("cuda", job.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=job.rank,
                                world_size=job.world_size)
    return device


def stop() -> None:
    """Leave the process group once every rank has reached this point (rank 0's checkpoint is written)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_batch(batch_size: int, job: Distributed | None) -> int:
    """Images per step on this rank: the global ``batch_size`` split evenly over the ranks.

    Raises:
        ValueError: ``batch_size`` is not a multiple of the world size.
    """
    if job is None:
        return batch_size
    if batch_size % job.world_size:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be a multiple of the "
                         f"{job.world_size} processes")
    return batch_size // job.world_size


def rank_seed(seed: int, job: Distributed | None) -> int:
    """The training noise seed of this rank: ``seed`` on rank 0 (and without torchrun), apart on the others."""
    return seed if job is None else seed + job.rank * _RANK_SEED_STRIDE


def train_loader(train_set: Dataset, batch_size: int, generator: torch.Generator, workers: int, cuda: bool,
                 job: Distributed | None) -> DataLoader:
    """The training split's loader: shuffled by ``generator`` in one process; a rank's share under torchrun."""
    common = dict(batch_size=rank_batch(batch_size, job), drop_last=True, num_workers=workers, pin_memory=cuda,
                  persistent_workers=workers > 0)
    if job is None:
        return DataLoader(train_set, shuffle=True, generator=generator, **common)  # type: ignore[arg-type]
    sampler = DistributedSampler(train_set, num_replicas=job.world_size, rank=job.rank, shuffle=True,
                                 seed=int(generator.initial_seed()), drop_last=True)
    return DataLoader(train_set, sampler=sampler, **common)  # type: ignore[arg-type]


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a rank's share for ``epoch`` (every rank the same permutation); no-op for one process."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


class TrainForward(nn.Module):
    """The model's training forward as one module call, so that DDP sees every use of the parameters.

    Returns the logits and weighted regulariser of :meth:`SNodeViT.forward_train`, then SDE-Net's diffusion loss
    on the images and ``perturb(images)`` when ``perturb`` is given (drawn after the forward's noise, as in one
    process).
    """

    def __init__(self, model: SNodeViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, generator: torch.Generator, runner: Callable[..., object] | None,
                perturb: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, Tensor, Tensor | None]:
        logits, reg = self.model.forward_train(images, generator=generator, runner=runner)  # (B, classes), ()
        bce = None if perturb is None else self.model.ood_diffusion_loss(images, perturb(images))
        return logits, reg, bce


def train_forward(model: SNodeViT, job: Distributed | None, device: torch.device) -> nn.Module:
    """:class:`TrainForward` of ``model``: plain in one process, inside DDP under torchrun."""
    step = TrainForward(model)
    if job is None:
        return step
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(sums: Tensor, seen: int, job: Distributed | None) -> tuple[Tensor, int]:
    """An epoch's running sums and image count, summed over the ranks (unchanged in one process)."""
    if job is None:
        return sums, seen
    both = torch.cat((sums, sums.new_tensor([float(seen)])))
    dist.all_reduce(both)
    return both[:-1], int(both[-1].item())
