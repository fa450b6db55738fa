"""Does the SDE model earn its samples? SNodeViT against deterministic+TS, MC dropout and a deep ensemble (issue #7).

Every method is trained on mnist5k under the same budget (the shipped architecture, preset ``snodevit_mnist_every_block``:
variant ``tiny`` with ``MNIST_OVERRIDES`` and one solver step per block, as ``snodevit train --variant
snodevit_mnist_every_block`` trains the demo model; the same ``TrainConfig``, the same light augmentation, the same seeds) and
scored by the same code:

* ``det``: the deterministic ViT of the same size (the same config with ``noise_dim=0``, the ODE ViT), S = 1;
* ``mc-dropout``: the same with ``dropout=0.1``, evaluated with dropout active for S samples
  (:class:`snodevit.evaluation.baselines.MCDropout`);
* ``ensemble-M``: M ``det`` models (member k of run seed s is trained with seed s + 100 k, so member 0 is that
  run's ``det`` model), the samples are the members (:class:`snodevit.evaluation.baselines.DeepEnsemble`);
* ``snodevit``: the SDE model (config defaults) with S samples;
* ``snodevit-no-noise``: the same trained SDE weights with the diffusion switched off (zero noise, S = 1,
  :class:`snodevit.evaluation.baselines.DiffusionOff`): what the continuous blocks give without the noise;
* ``snodevit-last`` / ``snodevit-ood-last``: ``snodevit`` / ``snodevit-ood`` with the diffusion in the last block
  only (``SNodeViTConfig.noise_blocks``): the ODE blocks before it run once per image, shared by the samples;
* ``snodevit-ood``: the SDE model with SDE-Net-style training of a data-dependent diffusion (``TrainConfig.
  ood_diffusion_weight``, ``SNodeViTConfig.ood_diffusion_scale``), S samples.

Every method goes through :func:`snodevit.inference.predict` (image i of a pass is seeded with a per-run base
+ i, :func:`snodevit.evaluation.pass_seeds`) and gets temperature scaling fitted on the calibration split with
:func:`calibration.fit_temperature`. Evaluation: the test split; the test split rotated 0-180 degrees in 15 degree
steps; scikit-learn's digits as a shifted domain; uniform noise and photo crops as far-OOD sets, scored by
predictive entropy and by mutual information. Cost: forward FLOPs per image over all samples
(``torch.utils.flop_counter.FlopCounterMode``: matrix products and convolutions) and CPU milliseconds per image
of ``predict`` at batch 32 (median of repeats, fixed thread count, always on the CPU).

Checkpoints go under ``runs/uncertainty/<kind>/seed<N>/`` and are reused on a rerun (unless ``--retrain``)
when their config and training settings match, so an interrupted run resumes. Models train in ``--jobs``
parallel processes (spawn); evaluation runs in the same pool.

The parts live beside this script: ``uncertainty_plan`` (goals, budget, methods, configs), ``uncertainty_train``
(training jobs and checkpoint reuse), ``uncertainty_eval`` (evaluation of one method and seed),
``uncertainty_cost`` (FLOPs and CPU time), ``uncertainty_summary`` (means over seeds, goal check),
``uncertainty_figures``, ``uncertainty_markdown`` (one function per section) and ``uncertainty_tried`` (the
"What was tried" prose).

Usage::

    PYTHONPATH=. python benchmarks/uncertainty.py --device cuda --jobs 16 --out docs   # full run, ~6.5 min on the H100
    python benchmarks/uncertainty.py --quick --out /tmp/ub                              # seconds, for the test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # `python benchmarks/uncertainty.py` from a checkout that is not pip-installed
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from snodevit.cli._common import int_at_least, non_negative_int  # noqa: E402
from snodevit.machine import cpu_name  # noqa: E402
from uncertainty_cost import measure_cost  # noqa: E402
from uncertainty_eval import EvalJob, evaluate_one  # noqa: E402
from uncertainty_figures import figures  # noqa: E402
from uncertainty_markdown import render_markdown  # noqa: E402
from uncertainty_plan import (FULL_EPOCHS, MEMBER_SEED_STRIDE, OOD_SETS, QUICK_MODEL, REJECTION_GRID,  # noqa: E402
                              Budget, Method, methods_for, num_samples_of)
from uncertainty_summary import aggregate, goal_check  # noqa: E402
from uncertainty_train import TrainJob, _checkpoint_matches, _train_config_filled, train_jobs, train_one  # noqa: E402

#: What the tests and other scripts use from this script (the parts live in the uncertainty_* modules).
__all__ = ["Budget", "Method", "OOD_SETS", "REJECTION_GRID", "TrainJob", "_checkpoint_matches", "_train_config_filled",
           "budget_from_args", "build_parser", "main", "methods_for", "render_markdown", "run_benchmark", "train_jobs",
           "train_one"]


# ----------------------------------------------------------------------------------------------- orchestration
def run_pool(fn: Callable[[Any], dict[str, Any]], jobs: Sequence[Any], workers: int, desc: str) -> list[dict[str, Any]]:
    """``fn`` over ``jobs`` in ``workers`` spawned processes (in this process when workers == 1)."""
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="job", dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(job))
                bar.update(1)
        else:  # not multiprocessing.Pool: its daemonic workers may not start DataLoader workers
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                for future in as_completed([pool.submit(fn, job) for job in jobs]):
                    results.append(future.result())
                    bar.update(1)
    finally:
        bar.close()
    return results


def _atomic_write(path: Path, data: bytes) -> None:
    from calibration.files import atomic_write_bytes

    atomic_write_bytes(path, data)


def _environment(device: str, jobs: int, cores: int) -> dict[str, Any]:
    """Where the run happened (the doc's Machine line)."""
    return {"device": device, "device_name": (torch.cuda.get_device_name(0) if device.startswith("cuda")
                                              else f"the CPU ({cpu_name()})"),
            "cpu": cpu_name(), "cpu_count": cores, "jobs": jobs, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def _write(out: Path, report: dict[str, Any]) -> None:
    """The figures, the JSON report and the doc under ``out``."""
    pngs = figures(report["summary"], report["cost"], report["budget"]["angles"], report["budget"]["timing_batch"])
    out.mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        _atomic_write(out / name, png)
    _atomic_write(out / "uncertainty-benchmark.json",
                  (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    _atomic_write(out / "uncertainty-benchmark.md", render_markdown(report).encode())


def run_benchmark(budget: Budget, *, device: str, jobs: int, runs: Path, out: Path, retrain: bool, quick: bool,
                  command: str) -> dict[str, Any]:
    """Train, evaluate, time, and write the doc, JSON and figures. Returns the report."""
    started = time.perf_counter()
    methods = methods_for(budget)
    cores = os.cpu_count() or 1
    # torch threads per process; micro models only lose from more (thread start-up and spinning on a loaded machine)
    threads = 1 if quick else max(1, cores // max(1, jobs))

    tjobs = train_jobs(budget, runs, device, threads, retrain)
    print(f"{len(tjobs)} models x {budget.epochs} epochs on {device} in {jobs} process(es) (checkpoints under {runs}, "
          "reused when they match); the full run takes ~6.5 min on the H100 machine with --jobs 16 and hours on a "
          "2-core CPU", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    trained = run_pool(train_one, tjobs, jobs, "train")
    train_seconds = time.perf_counter() - t0

    ejobs = [EvalJob(m, s, budget, str(runs), device, threads) for m in methods for s in budget.seeds]
    t0 = time.perf_counter()
    evaluated = run_pool(evaluate_one, ejobs, jobs, "evaluate")
    eval_seconds = time.perf_counter() - t0
    per_run: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    for r in sorted(evaluated, key=lambda r: r["seed"]):
        per_run[r["method"]].append(r)

    t0 = time.perf_counter()
    cost = {m.name: measure_cost(m, budget, runs) for m in tqdm(methods, desc="cost", unit="method")}
    cost_seconds = time.perf_counter() - t0

    summary = aggregate(per_run)
    ensemble = next(m.name for m in methods if m.samples == "members")
    sde_names = [m.name for m in methods if m.kind.startswith("sde") and m.samples == "S"]
    report = {
        "benchmark": "uncertainty", "issue": 7, "quick": quick, "command": command,
        "environment": _environment(device, jobs, cores),
        "budget": asdict(budget), "train_config": next(j.train_config for j in tjobs if j.kind == "det"),
        "methods": {m.name: {"kind": m.kind, "num_samples": num_samples_of(m, budget), "description": m.description}
                    for m in methods},
        "summary": summary, "cost": cost, "goals": goal_check(summary, cost, sde_names, ensemble),
        "runs": per_run,
        "trained": sum(not t["reused"] for t in trained), "reused": sum(t["reused"] for t in trained),
        "training": sorted(trained, key=lambda t: (t["kind"], t["seed"])),
        "seconds": {"train": train_seconds, "evaluate": eval_seconds, "cost": cost_seconds,
                    "total": time.perf_counter() - started},
    }
    _write(out, report)
    return report


def print_table(report: dict[str, Any]) -> None:
    s, c = report["summary"], report["cost"]
    print(f"{'method':<18} {'S':>2} {'test acc':>9} {'test NLL':>9} {'rot ECE':>8} {'OOD MI AUROC':>13} "
          f"{'MFLOPs':>8} {'CPU ms':>7}")
    for n in s:
        print(f"{n:<18} {c[n]['num_samples']:>2} {s[n]['test.accuracy']['mean'] * 100:>8.2f}% "
              f"{s[n]['test.nll']['mean']:>9.4f} {s[n]['rotation_mean.ece']['mean'] * 100:>7.2f}% "
              f"{s[n]['ood_min.auroc_mutual_information']['mean']:>13.3f} {c[n]['flops_per_image'] / 1e6:>8.1f} "
              f"{c[n]['cpu_ms_per_image']:>7.2f}")
    for name, g in report["goals"].items():
        print(f"goals {name}: " + ", ".join(f"{k} {'yes' if v['met'] else 'NO'}" for k, v in g["checks"].items()))


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from snodevit.training.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="training/evaluation device: cpu, cuda, cuda:N or auto")
    p.add_argument("--jobs", type=int_at_least(1), default=1, help="parallel training/evaluation processes (spawn)")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, help="run seeds (default 0 1 2; quick: 0)")
    p.add_argument("--epochs", type=int_at_least(1), default=None,
                   help=f"epochs of every model (default {FULL_EPOCHS}, half of TrainConfig's {TrainConfig.epochs}, "
                        "to fit ~8 min on the H100 machine; quick: 1)")
    p.add_argument("--num-samples", type=int_at_least(2), default=None,
                   help="S of MC dropout and the SDE models (default 8; quick: 4)")
    p.add_argument("--ensemble-size", type=int_at_least(2), default=None, help="ensemble members (default 5; quick: 2)")
    p.add_argument("--cpu-threads", type=int_at_least(1), default=1, help="torch threads of the CPU timing")
    p.add_argument("--quick", action="store_true", help="micro budget for tests: figures are meaningless")
    p.add_argument("--retrain", action="store_true", help="train again even where a matching checkpoint exists")
    p.add_argument("--runs", type=Path, default=None,
                   help="checkpoint root (default runs/uncertainty; quick: runs/uncertainty-quick)")
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder of the doc, JSON and figures")
    return p


def budget_from_args(args: argparse.Namespace) -> Budget:
    if args.quick:
        base = Budget(epochs=1, seeds=(0,), num_samples=4, ensemble_size=2, model_overrides=dict(QUICK_MODEL),
                      train_images=128, eval_images=32, val_images=32, num_ood=32, angles=(0.0, 90.0, 180.0),
                      num_workers=0, eval_batch=64, timing_batch=8, timing_repeats=2)
    else:
        base = Budget(epochs=FULL_EPOCHS, seeds=(0, 1, 2), num_samples=8, ensemble_size=5)
    overrides: dict[str, Any] = {"cpu_threads": args.cpu_threads}
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds must be distinct, got {args.seeds}")
        overrides["seeds"] = tuple(args.seeds)
    for name in ("epochs", "num_samples", "ensemble_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    budget = replace(base, **overrides)
    clash = {s + MEMBER_SEED_STRIDE * k for s in budget.seeds for k in range(1, budget.ensemble_size)} & set(budget.seeds)
    if clash:
        raise ValueError(f"--seeds {sorted(clash)} collide with ensemble member seeds (s + {MEMBER_SEED_STRIDE} k); "
                         f"use seeds below {MEMBER_SEED_STRIDE}")
    return budget


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        budget = budget_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    runs = args.runs or Path("runs/uncertainty-quick" if args.quick else "runs/uncertainty")
    command = "PYTHONPATH=. python benchmarks/uncertainty.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = run_benchmark(budget, device=str(dev), jobs=args.jobs, runs=runs, out=args.out, retrain=args.retrain,
                           quick=args.quick, command=command.strip())
    print_table(report)
    print(f"wrote {args.out / 'uncertainty-benchmark.md'} and .json, {report['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
