"""``make bench``: the serving path measured against this machine's own ceilings -> ``<out>/results.md`` + ``.json``.

Every figure is taken in one run, so ratios compare like with like on a shared, noisy machine:

1. **Ceiling**: fp32 matrix-multiply GFLOP/s (``torch.matmul`` on large square matrices, median).
2. **Model path** (``tiny`` and ``small`` with the MNIST preset ``MNIST_OVERRIDES``; ``--quick``: a 2-block,
   24-wide micro model): images/s and model FLOP/s (``torch.utils.flop_counter.FlopCounterMode``) as a fraction
   of the ceiling for (a) the seed's way, a Python loop of S single forward passes, (b) the samples folded into
   the batch with the prefix computed once (``model.sample_logits``), (c) ONNX Runtime (``export.OnnxPredictor``),
   at S in {1, 8, 32} and B in {1, 32}. The backends get the same images and noise and are timed in alternation.
3. **Service path**: a closed-loop httpx/asyncio load (``benchmarks/http_load.py``) against real ``bentoml serve``
   processes on loopback (an untrained ``tiny`` in a temporary BentoML home: the weights' values do not change
   the cost), at concurrency 1, 8 and 32, with adaptive micro-batching on and off (``SNODEVIT_MAX_BATCH_SIZE=1``),
   compared with the same loop calling the service engine in-process, and the server's resident memory under
   load and over a long run of requests.
   **3b. Monte Carlo speed**: the shipped model (noise in every block) against its twin with noise in the last
   block only, each in fp32 and bf16 (``SNODEVIT_PRECISION``), at S=32 and S=8, concurrency 1 and 32; every
   server runs alone.
4. **Adaptive sampling**: samples used by ``num_samples="auto"`` and the decisions that differ from fixed S=32 on
   the mnist5k test split, with a trained model (``--model``, default the demo model in the BentoML store).
   **4b. bf16 against fp32**: decisions, labels, gate flags and probabilities of the shipped model (or
   ``--model``) on the mnist5k test split.
5. **Goals**: the issue's targets against the measured ratios.

``--device cuda`` adds the model path on the GPU (eager fp32, bf16 autocast, ONNX Runtime's CUDA provider with
IOBinding when present) against the GPU's own fp32 and bf16 matmul ceilings; CPU timings stay on the CPU.
``--no-http`` skips the service section (skipped anyway when bentoml is not importable).

This file holds the command line and the order of the run; each section lives in its own module beside it:
``bench_common`` (inputs, model variants, the alternating timer), ``bench_model_path`` (1, 2, 2b),
``bench_ort`` (2c), ``bench_service`` (3), ``bench_mc`` (3b), ``bench_decisions`` (int8, 4, 4b),
``bench_goals`` (5) and ``bench_report`` (``results.md``).

Usage::

    python benchmarks/bench.py --out benchmarks                       # make bench (about 30 minutes on 2 cores)
    python benchmarks/bench.py --quick --out runs/bench-quick         # seconds; what tests/test_bench.py runs
    PYTHONPATH=. python benchmarks/bench.py --device cuda --no-http --out runs/bench-gpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # `python benchmarks/bench.py` from a checkout that is not pip-installed
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from bench_common import DEMO_NAME, FULL_VARIANTS, QUICK_VARIANTS, Variant  # noqa: E402
from bench_decisions import adaptive_section, int8_decisions, precision_section  # noqa: E402
from bench_goals import goals  # noqa: E402
from bench_mc import mc_speed_http  # noqa: E402
from bench_model_path import matmul_ceiling, model_path_cpu, model_path_cuda, threads_comparison  # noqa: E402
from bench_ort import ort_options  # noqa: E402
from bench_report import markdown, summary_lines  # noqa: E402
from bench_service import service_path  # noqa: E402
from calibration.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from snodevit.machine import cpu_name  # noqa: E402


def _json_ready(obj: Any) -> Any:
    """Plain JSON: NaN/inf become null (strict parsers refuse them), tuples lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Writes <out>/results.md and <out>/results.json.")
    p.add_argument("--out", type=Path, required=True, help="folder for results.md and results.json")
    p.add_argument("--quick", action="store_true", help="micro model, micro sizes, few requests (for the tests)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda adds the model path on the GPU; CPU timings are always taken on the CPU")
    p.add_argument("--no-http", action="store_true", help="skip the service section")
    p.add_argument("--model", help="trained model directory for the adaptive-sampling section (default: the "
                   f"demo model {DEMO_NAME} in the BentoML store)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime, in this "
                   "process and in the servers (default: the physical cores; 1 with --quick)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    args.argv = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model {args.model}: no such model directory")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    from export.runtime import physical_cores

    # --quick (the tests) defaults to one thread: on a loaded machine two threads turn milliseconds into seconds.
    threads = args.threads or (1 if args.quick else physical_cores())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, threads)
    finally:
        torch.set_num_threads(before)  # the tests run this in their own process


def _machine(threads: int) -> dict[str, Any]:
    """The CPU, the threads and the library versions the run's figures were taken with."""
    import onnxruntime as ort

    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version(),
            "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _cuda_sections(result: dict[str, Any], variants: tuple[Variant, ...], cells: list[tuple[int, int]], quick: bool,
                   work: Path, progress: bool) -> None:
    """The GPU's fp32 and bf16 ceilings and the model path on it, into ``result`` (TF32 off: fp32 means fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result["machine"]["gpu"] = torch.cuda.get_device_name()
    n = 1024 if quick else 8192
    result["ceiling"]["cuda_fp32"] = matmul_ceiling(n, "cuda", torch.float32, budget_s=1.0)
    result["ceiling"]["cuda_bf16"] = matmul_ceiling(n, "cuda", torch.bfloat16, budget_s=1.0)
    cuda_cells = cells if quick else cells + [(256, 32)]
    ceilings = {"fp32": result["ceiling"]["cuda_fp32"]["gflops"], "bf16": result["ceiling"]["cuda_bf16"]["gflops"]}
    rows, note = model_path_cuda(variants, cuda_cells, ceilings, 0.3 if quick else 2.0, work, progress)
    result["model_path"]["cuda"] = rows
    result["model_path"]["cuda_note"] = note


def _run(args: argparse.Namespace, threads: int) -> int:
    from snodevit.inference.passes import CPU_ROWS_PER_PASS

    progress = not args.no_progress
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "machine": _machine(threads), "rows_per_pass": CPU_ROWS_PER_PASS,
    }
    variants = QUICK_VARIANTS if args.quick else FULL_VARIANTS
    cells = [(b, s) for b in ((1, 4) if args.quick else (1, 32)) for s in ((1, 8) if args.quick else (1, 8, 32))]
    budget = 0.2 if args.quick else 3.0
    with tempfile.TemporaryDirectory(prefix="snodevit-bench-") as tmp:
        work = Path(tmp)
        result["ceiling"] = {"cpu": matmul_ceiling(512 if args.quick else 2048, budget_s=0.5 if args.quick else 4.0)}
        result["model_path"] = {"cpu": model_path_cpu(variants, cells, threads, result["ceiling"]["cpu"]["gflops"],
                                                      budget, work, progress)}
        thread_cells = [(1, 8), (4, 8)] if args.quick else [(1, 8), (32, 8)]
        result["threads"] = threads_comparison(variants[0], thread_cells, threads, budget)
        ort_cells = [(1, 8), (4, 8)] if args.quick else [(1, 8), (32, 8), (32, 32)]
        result["ort_options"] = {"timing": ort_options(variants[0], ort_cells, threads, budget, work, progress),
                                 "int8_decisions": int8_decisions(args.quick, work, progress)}
        if args.device == "cuda":
            _cuda_sections(result, variants, cells, args.quick, work, progress)
        if args.no_http:
            result["service"] = result["mc_speed"] = {"skipped": "--no-http"}
        else:
            result["service"] = service_path(args.quick, threads, progress, work)
            result["mc_speed"] = mc_speed_http(args.quick, threads, progress, work)
        result["adaptive"] = adaptive_section(args.model, args.quick, args.device, progress, work)
        result["precision"] = precision_section(args.model, args.quick, progress)
    result["goals"] = goals(result)
    result["seconds"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", _json_ready(result))
    atomic_write_bytes(args.out / "results.md", markdown(result).encode())
    print("\n".join(summary_lines(result)))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
