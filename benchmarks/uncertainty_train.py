"""Training of ``benchmarks/uncertainty.py``: one job per checkpoint, reused on a rerun when its config, training
settings and benchmark settings match."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from uncertainty_plan import (MEMBER_SEED_STRIDE, PRESET, Budget, kind_train_overrides, methods_for,
                              model_config)


@dataclass(frozen=True)
class TrainJob:
    """One checkpoint to train (or reuse), in a worker process."""

    kind: str
    seed: int
    config: dict[str, Any]
    train_config: dict[str, Any]
    train_images: int | None
    val_images: int | None
    path: str
    device: str
    threads: int
    retrain: bool


def _checkpoint_matches(job: TrainJob) -> bool:
    """Whether ``job.path`` holds a checkpoint trained with exactly the job's settings."""
    from snodevit.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_meta

    path = Path(job.path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        return False
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        meta = read_meta(path)
    except (OSError, ValueError):
        return False
    return (config == job.config and _train_config_filled(meta.get("training", {}).get("config")) == job.train_config
            and meta.get("benchmark", {}) == _bench_meta(job))


def _train_config_filled(stored: Any) -> dict[str, Any] | None:
    """A stored TrainConfig with the fields added since it was written at their defaults (which keep the old
    behaviour), so a new option does not invalidate every checkpoint; None when it is not a valid TrainConfig."""
    from snodevit.training.train import TrainConfig

    try:
        return asdict(TrainConfig(**stored))
    except (TypeError, ValueError):
        return None


def _bench_meta(job: TrainJob) -> dict[str, Any]:
    """What else decides a checkpoint: the training subset and the SDE-Net perturbation (code, not config)."""
    from snodevit.training.perturb import OOD_NOISE_SCALES

    return {"name": "uncertainty", "kind": job.kind, "train_images": job.train_images,
            "ood_noise_scales": list(OOD_NOISE_SCALES)}


def train_one(job: TrainJob) -> dict[str, Any]:
    """Train (or reuse) one checkpoint. Runs in a worker process."""
    import logging

    logging.getLogger("calibration").setLevel(logging.ERROR)
    torch.set_num_threads(job.threads)
    if not job.retrain and _checkpoint_matches(job):
        return {"kind": job.kind, "seed": job.seed, "reused": True, "seconds": 0.0}
    from torch.utils.data import Subset

    from snodevit import SNodeViT, SNodeViTConfig
    from snodevit.data.sets import load_dataset
    from snodevit.training.train import TrainConfig, train_model

    bundle = load_dataset("mnist5k", augment="light")
    train_set = bundle.train if job.train_images is None else Subset(bundle.train, range(job.train_images))
    val_set = bundle.calibration if job.val_images is None else Subset(bundle.calibration, range(job.val_images))
    torch.manual_seed(job.seed)
    model = SNodeViT(SNodeViTConfig.from_dict(job.config))
    tc = TrainConfig(**job.train_config)
    meta = {"class_names": bundle.class_names, "preprocessing": bundle.preprocessing.to_dict(), "data": bundle.spec,
            "variant": PRESET, "benchmark": _bench_meta(job)}
    result = train_model(model, train_set, val_set, tc, out_dir=job.path, meta=meta, device=job.device,
                         progress=False)
    return {"kind": job.kind, "seed": job.seed, "reused": False, "seconds": result.seconds,
            "final_val_accuracy": result.history[-1]["val_accuracy"]}


def train_jobs(budget: Budget, runs: Path, device: str, threads: int, retrain: bool) -> list[TrainJob]:
    """Every checkpoint the methods need, each once: det/dropout/sde/sde-ood per seed, then extra members."""
    from snodevit.training.train import TrainConfig

    wanted: list[tuple[str, int]] = []
    for kind in dict.fromkeys(m.kind for m in methods_for(budget)):
        wanted += [(kind, s) for s in budget.seeds]
    for k in range(1, budget.ensemble_size):
        wanted += [("det", s + MEMBER_SEED_STRIDE * k) for s in budget.seeds]
    jobs = []
    for kind, seed in wanted:
        tc = TrainConfig(epochs=budget.epochs, seed=seed, num_workers=budget.num_workers, **kind_train_overrides(kind))
        jobs.append(TrainJob(kind, seed, model_config(kind, budget), asdict(tc), budget.train_images,
                             budget.val_images, str(runs / kind / f"seed{seed}"), device, threads, retrain))
    return jobs
