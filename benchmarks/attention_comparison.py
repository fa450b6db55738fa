"""The attention backends side by side: cost against token count, accuracy at equal budget, attention maps.

One command writes ``<out>/attention-comparison.md`` and ``.json``, ``<out>/attention-scaling.png`` (latency and
FLOPs against token count, log-log) and ``<out>/attention-maps.png`` (attention rollout of one fixed test image
per backend). For every backend (ksvd, ksvd with the adaptive rank, softmax, linformer, performer, nystrom,
hybrid):

* **Cost.** Parameters, forward FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions)
  and the CPU latency of ``model.sample_logits`` for one image with S folded Monte Carlo samples, at
  28/56/84/112 px (49/196/441/784 patch tokens, plus the class token). Models are built per size with random
  weights (timing does not depend on them). Latency is always taken on the CPU, with a fixed thread count, the
  backends timed in alternation so drifting background load hits all of them alike; the median is reported.
* **Accuracy at equal budget.** The shipped architecture, the ``snodevit_mnist_every_block`` preset (``tiny`` +
  ``MNIST_OVERRIDES`` with one Euler-Maruyama step per block, the demo's setting), trained with
  ``snodevit.training.train.train_model`` for the same epochs and seeds on the mnist5k train split, then
  accuracy / NLL / ECE (``calibration.calibration_summary``, no temperature) on the 500-image test split with S
  samples through ``snodevit.predict``, image i seeded with i (``snodevit.evaluation.pass_seeds``). Independent models train in ``--jobs`` parallel processes
  (``torch.multiprocessing`` spawn context); checkpoints are kept under ``runs/attention_comparison/`` and reused
  on a rerun unless ``--retrain``.

Budget: the full run trains 30 epochs (the demo's) with seeds 0 and 1, i.e. 12 models (ksvd-adaptive is ksvd's
model at 49 tokens). On the H100 machine with ``--jobs 7``, a 4-epoch full run took 115 s in all (73 s training
and evaluation, about 7 s per epoch per model with seven models sharing the GPU; 37 s for the CPU cost sweep and
the maps), which extrapolates to about 7-8 minutes at 30 epochs. One 30-epoch training takes about 8 minutes on
2 CPU cores, so run the full mode on a GPU.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/attention_comparison.py --device cuda --jobs 7 --out docs   # full run (GPU)
    PYTHONPATH=. python benchmarks/attention_comparison.py --quick --out /tmp/ac              # smoke run, < 1 min

Layout: attention_plan (backends, plan, configs), attention_jobs (training and evaluating one model), attention_cost
(params, FLOPs, latency), attention_figures (the two PNGs), attention_summary (accuracy rows, seed noise, headline),
attention_markdown (the report page); this script parses the options, runs the steps in order and writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from snodevit.cli._common import positive_int
from snodevit.machine import cpu_name

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:  # loaded by path (the tests): the sibling modules are imported by name
    sys.path.insert(0, str(BENCHMARKS))

from attention_cost import measure_cost  # noqa: E402
from attention_figures import attention_figure, scaling_figure  # noqa: E402
from attention_jobs import make_jobs, run_job, train_all  # noqa: E402
from attention_markdown import markdown, stdout_table  # noqa: E402
from attention_plan import BACKENDS, DEFAULT_EPOCHS, FULL_SIZES, QUICK_SIZES, RUNS_ROOT, Plan  # noqa: E402
from attention_summary import headline, seed_noise, summarize_accuracy  # noqa: E402

# What the tests call on this script; run_job and make_jobs live in attention_jobs.
__all__ = ["main", "make_jobs", "make_plan", "parse_args", "run_job"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder of the .md, .json and .png files")
    p.add_argument("--device", default="auto", help="training/evaluation device: auto, cpu, cuda or cuda:N "
                   "(latency is always measured on the CPU)")
    p.add_argument("--jobs", type=positive_int, default=1, help="models trained in parallel processes")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"training epochs of every backend (default {DEFAULT_EPOCHS}, quick 1)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="training seeds per backend, 0..n-1 (default 2, quick 1); two or more measure seed noise")
    p.add_argument("--num-samples", type=positive_int, default=8, help="Monte Carlo samples S per image")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of the CPU latency measurement (default min(4, CPUs), quick 1)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed calls per backend and size "
                   "(default 15, quick 3)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help=f"where checkpoints are kept (default {RUNS_ROOT}/full or {RUNS_ROOT}/quick)")
    p.add_argument("--retrain", action="store_true", help="train again even when a matching checkpoint exists")
    p.add_argument("--quick", action="store_true", help="micro model, 1 epoch on 320 images, 2 sizes: a smoke run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device name; use auto, cpu, cuda or cuda:N")
        if dev.type not in ("cpu", "cuda"):
            p.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = os.cpu_count() or 1
    return Plan(quick=args.quick, epochs=args.epochs or (1 if args.quick else DEFAULT_EPOCHS),
                seeds=tuple(range(args.seeds or (1 if args.quick else 2))),
                sizes=QUICK_SIZES if args.quick else FULL_SIZES, num_samples=args.num_samples,
                threads=args.threads or (1 if args.quick else min(4, cpus)), repeats=args.repeats or (3 if args.quick else 15),
                warmup=1 if args.quick else 3, train_images=320 if args.quick else None,
                val_images=100 if args.quick else None, device=device, jobs=args.jobs)


def _readable_by_all(tmp_path: str) -> None:
    os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; these are documents


def build_report(argv: list[str] | None, plan: Plan, results: list[dict[str, Any]], aliases: dict[str, str],
                 cost: list[dict[str, Any]], maps: dict[str, Any], cpu: str, train_wall: float) -> dict[str, Any]:
    """The report dict (the JSON file) of one run, headline included; ``seconds.total`` is set by the caller."""
    dev = torch.device(plan.device)
    train_device = (f"GPU {torch.cuda.get_device_name(dev)} ({plan.device})" if dev.type == "cuda"
                    else f"the CPU ({cpu})")
    acc = summarize_accuracy(results, aliases)
    test_images = results[0]["test_images"]
    noise = seed_noise(results, len(plan.seeds), test_images,
                       statistics.fmean(r["accuracy"] for r in acc.values()))
    report = {
        "command": "python " + shlex.join(sys.argv if argv is None else [Path(__file__).as_posix(), *argv]),
        "written": time.strftime("%Y-%m-%d %H:%M %Z"),
        "backends": {name: overrides for name, overrides in BACKENDS},  # row order = BACKENDS (keys get sorted)
        "plan": {**asdict(plan), "seeds": list(plan.seeds), "sizes": list(plan.sizes)},
        "variant": plan.variant_label,
        "train_images": plan.train_images or 4000, "val_images": plan.val_images or 500, "test_images": test_images,
        "environment": {"cpu": cpu, "cpu_count": os.cpu_count(), "processor": platform.processor(),
                        "machine": platform.machine(), "torch": torch.__version__,
                        "python": platform.python_version(), "train_device": train_device},
        "accuracy": acc, "noise": noise, "runs": results, "cost": cost, "maps": maps,
        "seconds": {"train_and_evaluate": train_wall},
    }
    report["headline"] = headline(acc, cost, noise, plan)
    return report


def write_files(out: Path, report: dict[str, Any], scaling_png: bytes, maps_png: bytes) -> None:
    """Render everything before the first file is replaced; each file is replaced atomically."""
    from calibration.files import atomic_write_bytes

    files = {"attention-scaling.png": scaling_png, "attention-maps.png": maps_png,
             "attention-comparison.json": (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(),
             "attention-comparison.md": markdown(report).encode()}
    for name, data in files.items():
        atomic_write_bytes(out / name, data, check=_readable_by_all)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    progress = not args.no_progress
    runs_dir = args.runs_dir or RUNS_ROOT / ("quick" if plan.quick else "full")
    start = time.perf_counter()

    jobs, aliases = make_jobs(plan, runs_dir, args.retrain)
    if not plan.quick and plan.device == "cpu":
        print(f"note: training {len(jobs)} models of {plan.epochs} epochs on the CPU; one 30-epoch training takes "
              "about 8 minutes on 2 cores (checkpoints are reused on a rerun). --device cuda is much faster.",
              file=sys.stderr)
    t0 = time.perf_counter()
    results = train_all(jobs, plan.jobs, progress)
    train_wall = time.perf_counter() - t0
    # Cost after training: the parallel trainings would otherwise share the CPU with the timing.
    cost = measure_cost(plan, progress)
    torch.set_num_threads(plan.threads)
    maps_png, maps = attention_figure(plan, results, aliases)

    cpu = cpu_name()
    report = build_report(argv, plan, results, aliases, cost, maps, cpu, train_wall)
    scaling_png = scaling_figure(cost, plan, cpu)
    report["seconds"]["total"] = time.perf_counter() - start
    write_files(args.out, report, scaling_png, maps_png)
    print(stdout_table(report))
    print(f"wrote {args.out}/attention-comparison.md (+ .json, attention-scaling.png, attention-maps.png) "
          f"in {report['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
