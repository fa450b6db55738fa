"""Evaluation of one method and run seed in ``benchmarks/uncertainty.py``: temperature scaling on the calibration
split, then the test split, rotated test digits, scikit-learn's digits and the far-OOD sets, every image through
``snodevit.predict`` seeded by the one rule of evaluation (``snodevit.evaluation.pass_seeds``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from uncertainty_plan import (EVAL_SEED_STRIDE, OOD_SETS, REJECTION_GRID, Budget, Method, member_seeds,
                              num_samples_of)


@dataclass(frozen=True)
class EvalJob:
    """One method and run seed to evaluate, in a worker process."""

    method: Method
    seed: int
    budget: Budget
    runs: str
    device: str
    threads: int


def build_backend(method: Method, seed: int, budget: Budget, runs: Path, device: str) -> Any:
    """The SamplingBackend of a method for one run seed, on ``device``."""
    from snodevit import load_model
    from snodevit.evaluation.baselines import DeepEnsemble, DiffusionOff, MCDropout

    def load(kind: str, s: int) -> Any:
        return load_model(runs / kind / f"seed{s}", map_location=device)[0].eval()

    if method.samples == "members":
        return DeepEnsemble([load("det", s) for s in member_seeds(seed, budget.ensemble_size)])
    model = load(method.kind, seed)
    if method.kind == "dropout":
        return MCDropout(model)
    if method.name == "snodevit-no-noise":
        return DiffusionOff(model)
    return model


def _eval_sets(budget: Budget) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels of every evaluated set (rotations excluded: made from the test split)."""
    from snodevit.data.sets import load_dataset
    from snodevit.data.shift import photo_crops, uniform_noise_images

    bundle = load_dataset("mnist5k")
    cap = budget.eval_images

    def first(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair if cap is None else (pair[0][:cap], pair[1][:cap])

    prep = bundle.preprocessing
    no_label = torch.zeros(budget.num_ood, dtype=torch.int64)
    return {"calibration": first(bundle.raw("calibration")), "test": first(bundle.raw("test")),
            "digits": first(load_dataset("digits").raw("all")),
            "uniform_noise": (uniform_noise_images(budget.num_ood, prep, seed=0), no_label),
            "photo_crops": (photo_crops(budget.num_ood, prep, seed=0), no_label)}


def _logits(backend: Any, images: torch.Tensor, prep: Any, num_samples: int, seed0: int, device: str,
            batch: int) -> torch.Tensor:
    """Raw Monte Carlo logits (S, N, C) of uint8 images through ``predict``; image i seeded with seed0 + i.

    Images are normalised with the model's preprocessing (mnist5k's mean/std), as a served image is.
    """
    from snodevit import predict
    from snodevit.data import normalize
    from snodevit.evaluation import pass_seeds

    out = []
    for start in range(0, images.shape[0], batch):
        x = normalize(images[start:start + batch], prep).to(device)
        seeds = pass_seeds(seed0, start, x.shape[0])
        out.append(predict(backend, x, num_samples=num_samples, seed=seeds).logits.float().cpu())
    return torch.cat(out, dim=1)


def _labelled(summary: Any, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, Brier, ECE, AURC, mean entropy and mean mutual information of a labelled set."""
    import calibration as cal

    s = cal.calibration_summary(summary.probs, labels)
    out = {k: float(s[k]) for k in ("accuracy", "nll", "brier", "ece", "aurc")}
    out["mean_entropy"] = float(summary.total.double().mean())
    out["mean_mutual_information"] = float(summary.epistemic.double().mean())
    return out


def _rejection_curve(summary: Any, labels: torch.Tensor) -> list[float]:
    """Accuracy of the accepted images when the least confident fraction r is rejected, r in REJECTION_GRID."""
    import calibration as cal

    correct = summary.prediction == labels
    coverage, risk = cal.risk_coverage_curve(summary.confidence, correct)
    n = len(labels)
    return [1.0 - float(risk[max(1, round((1.0 - r) * n)) - 1]) for r in REJECTION_GRID]


def _rotation(run: Callable[[torch.Tensor], torch.Tensor], test: Any, images: torch.Tensor, labels: torch.Tensor,
              temperature: float, angles: Sequence[float]) -> dict[str, Any]:
    """``rotation`` (figures per angle; 0 degrees is the test pass itself) and ``rotation_mean`` over the angles."""
    from snodevit.data.shift import rotate_images
    from snodevit.inference.summary import summarize

    rotation: dict[str, dict[str, float]] = {}
    for angle in angles:
        rotated = test if angle % 360.0 == 0.0 else summarize(run(rotate_images(images, angle)), temperature)
        rotation[f"{angle:g}"] = _labelled(rotated, labels)
    mean = {k: float(np.mean([r[k] for r in rotation.values()])) for k in ("accuracy", "ece", "nll", "brier")}
    return {"rotation": rotation, "rotation_mean": mean}


def _far_ood(test: Any, summaries: dict[str, Any]) -> dict[str, Any]:
    """``ood`` (AUROC against the test split by entropy and by MI, mean MI, per set) and ``ood_min`` (the worse set)."""
    import calibration as cal

    ood: dict[str, dict[str, float]] = {}
    for name in OOD_SETS:
        o = summaries[name]
        ood[name] = {"auroc_entropy": cal.ood_detection(test.total, o.total)["auroc"],
                     # with one sample the mutual information is exactly 0 everywhere: the AUROC of a constant is 0.5
                     "auroc_mutual_information": cal.ood_detection(test.epistemic, o.epistemic)["auroc"],
                     "mean_mutual_information": float(o.epistemic.double().mean())}
    return {"ood": ood,
            "ood_min": {k: min(ood[n][k] for n in OOD_SETS) for k in ("auroc_entropy", "auroc_mutual_information")}}


def evaluate_one(job: EvalJob) -> dict[str, Any]:
    """All figures of one method and run seed. Runs in a worker process."""
    import logging

    import calibration as cal
    from snodevit.data.sets import load_dataset
    from snodevit.inference.summary import summarize

    logging.getLogger("calibration").setLevel(logging.ERROR)
    torch.set_num_threads(job.threads)
    budget, method = job.budget, job.method
    start = time.perf_counter()
    backend = build_backend(method, job.seed, budget, Path(job.runs), job.device)
    s = num_samples_of(method, budget)
    sets = _eval_sets(budget)
    seed0 = job.seed * EVAL_SEED_STRIDE
    prep = load_dataset("mnist5k").preprocessing

    def run(images: torch.Tensor) -> torch.Tensor:
        return _logits(backend, images, prep, s, seed0, job.device, budget.eval_batch)

    cal_images, cal_labels = sets["calibration"]
    temperature = cal.fit_temperature(run(cal_images), cal_labels)
    summaries = {name: summarize(run(images), temperature) for name, (images, _) in sets.items()
                 if name != "calibration"}
    test_images, test_labels = sets["test"]
    result: dict[str, Any] = {"method": method.name, "seed": job.seed, "num_samples": s, "temperature": temperature}
    result["test"] = _labelled(summaries["test"], test_labels)
    result |= _rotation(run, summaries["test"], test_images, test_labels, temperature, budget.angles)
    result["digits"] = _labelled(summaries["digits"], sets["digits"][1])
    result |= _far_ood(summaries["test"], summaries)
    result["mi_is_zero"] = s == 1
    result["rejection_accuracy"] = _rejection_curve(summaries["test"], test_labels)
    result["seconds"] = time.perf_counter() - start
    return result
