"""Accuracy at equal budget: one job per (model, seed), trained (or reused) and evaluated on the test split.

A job is plain data, so that it can run in a spawned process (``--jobs`` > 1).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from attention_plan import BACKENDS, DATA, Plan, model_config, resolved, train_config


def _subset(dataset: Any, n: int | None) -> Any:
    from torch.utils.data import Subset

    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


@torch.no_grad()
def evaluate(model: Any, dataset: Any, num_samples: int, seed: int, device: str,
             batch_size: int = 250) -> dict[str, float]:
    """Accuracy, NLL and ECE of the mean of S samples per image; image i's noise is seeded with seed + i."""
    from calibration import calibration_summary
    from snodevit import predict
    from snodevit.evaluation import pass_seeds

    model.eval()
    probs, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    start = 0
    for images, y in loader:
        seeds = pass_seeds(seed, start, len(y))
        start += len(y)
        pred = predict(model, images.to(device), num_samples=num_samples, seed=seeds, pool=model.cfg.pool)
        probs.append(pred.summary.probs.cpu())
        labels.append(y)
    s = calibration_summary(torch.cat(probs).double(), torch.cat(labels))
    return {"accuracy": s["accuracy"], "nll": s["nll"], "ece": s["ece"], "brier": s["brier"],
            "test_images": s["n_samples"]}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (model, seed) unless a matching checkpoint exists, then evaluate it on the test split.

    Runs in a spawned process when ``--jobs`` > 1, so it takes and returns plain data.
    """
    from snodevit import SNodeViT, SNodeViTConfig, load_model
    from snodevit.checkpoint import read_meta
    from snodevit.data.sets import load_dataset
    from snodevit.training.train import TrainConfig, train_model

    torch.set_num_threads(job["threads"])
    out = Path(job["dir"])
    key = job["key"]
    bundle = load_dataset(DATA, augment="light")
    reused = (not job["retrain"] and (out / "model.safetensors").is_file()
              and read_meta(out).get("comparison") == key)
    if reused:
        model, meta = load_model(out, map_location=job["device"])
        seconds = float(meta["training"]["history"][-1]["seconds"])
    else:
        cfg = SNodeViTConfig.from_dict(key["config"])
        tc = TrainConfig(**key["train"])
        torch.manual_seed(tc.seed)
        model = SNodeViT(cfg)
        meta = {"class_names": bundle.class_names, "preprocessing": bundle.preprocessing.to_dict(),
                "data": bundle.spec, "variant": "tiny", "comparison": key}
        result = train_model(model, _subset(bundle.train, key["train_images"]), _subset(bundle.calibration,
                             key["val_images"]), tc, out_dir=out, meta=meta, device=job["device"],
                             progress=job["progress"])
        seconds = result.seconds
    figures = evaluate(model, bundle.test, job["num_samples"], seed=0, device=job["device"])
    return {"model": job["model"], "seed": key["train"]["seed"], "dir": str(out), "reused": reused,
            "train_seconds": seconds, **figures}


def make_jobs(plan: Plan, runs_dir: Path, retrain: bool) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One job per distinct model and seed; ``aliases`` maps a backend row to the model that stands for it."""
    jobs, aliases, seen = [], {}, {}
    # Micro models spin more than they compute on several threads when the CPU is shared.
    job_threads = 1 if plan.quick else max(1, (os.cpu_count() or 1) // plan.jobs)
    for name, overrides in BACKENDS:
        cfg = resolved(model_config(name, overrides, plan))
        ident = cfg.to_json()
        if ident in seen:  # e.g. ksvd-adaptive at 49 tokens picks rank 8, exactly ksvd's fixed rank
            aliases[name] = seen[ident]
            continue
        seen[ident] = aliases[name] = name
        for seed in plan.seeds:
            key = {"config": cfg.to_dict(), "train": asdict(train_config(plan, seed)), "data": DATA,
                   "train_images": plan.train_images, "val_images": plan.val_images}
            jobs.append({"model": name, "dir": str(runs_dir / f"{name}-seed{seed}"), "key": key,
                         "retrain": retrain, "device": plan.device, "num_samples": plan.num_samples,
                         "threads": job_threads, "progress": plan.jobs == 1 and not plan.quick})
    return jobs, aliases


def train_all(jobs: list[dict[str, Any]], n_procs: int, progress: bool) -> list[dict[str, Any]]:
    """Run the jobs, in ``n_procs`` spawned processes when more than one."""
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(jobs), desc="train+evaluate", unit="model", disable=not progress, dynamic_ncols=True)
    if n_procs <= 1:
        for job in jobs:
            results.append(run_job(job))
            bar.update(1)
    else:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(n_procs, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                bar.update(1)
                bar.set_postfix_str(f"{r['model']} seed {r['seed']}: acc {r['accuracy']:.4f}")
    bar.close()
    order = {job["dir"]: i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r["dir"]])
