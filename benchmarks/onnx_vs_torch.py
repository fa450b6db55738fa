"""ONNX Runtime vs PyTorch eager: Monte Carlo forward pass of the MNIST-preset tiny model on this CPU.

A focused view of the model-path section of ``benchmarks/bench.py`` (whose helpers it uses): both backends get
the same images and the same noise tensor and run in one process with the same number of threads, in passes as
``predict`` runs them; each size is warmed up, then the two are timed alternately (so drifting background load
hits both alike) and the median is reported. The ONNX side is ``OnnxPredictor.sample_logits``, i.e. including
the torch <-> numpy hand-over a server pays.

Usage::

    python benchmarks/onnx_vs_torch.py                  # B=1,S=8 and B=32,S=8, threads = physical cores
    python benchmarks/onnx_vs_torch.py --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import FULL_VARIANTS, time_alternating  # noqa: E402
from bench_model_path import export_for_timing  # noqa: E402
from snodevit.machine import cpu_name  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    try:
        b, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxS such as 32x8, got {text!r}") from None
    if b < 1 or s < 1:
        raise argparse.ArgumentTypeError(f"B and S must be >= 1, got {text!r}")
    return b, s


def run(sizes: list[tuple[int, int]], threads: int, repeats: int, max_seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    from export import OnnxPredictor
    from snodevit.inference.passes import sample_in_passes

    torch.set_num_threads(threads)
    tiny = FULL_VARIANTS[0]
    model = tiny.build()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_for_timing(model, Path(tmp))
        export_s = time.perf_counter() - t0
        predictor = OnnxPredictor(path, device="cpu", intra_op_threads=threads)
        for b, s in sizes:
            gen = torch.Generator().manual_seed(b * 1000 + s)
            images = torch.randn(b, 1, 28, 28, generator=gen)
            noise = torch.randn(model.noise_shape(b, s), generator=gen)

            def torch_eager() -> torch.Tensor:
                with torch.inference_mode():
                    return sample_in_passes(model, images, noise)

            def onnx_runtime() -> torch.Tensor:
                return sample_in_passes(predictor, images, noise)

            times, outs = time_alternating({"torch": torch_eager, "onnx": onnx_runtime}, budget_s=max_seconds,
                                           min_runs=5, max_runs=repeats)
            diff = float((outs["torch"] - outs["onnx"]).abs().max())
            t_ms, o_ms = statistics.median(times["torch"]), statistics.median(times["onnx"])
            rows.append({"batch_size": b, "num_samples": s, "torch_ms": round(t_ms, 3), "onnx_ms": round(o_ms, 3),
                         "speedup": round(t_ms / o_ms, 3), "runs": len(times["torch"]), "max_abs_diff": diff})
    return {"model": f"{tiny.name} + MNIST_OVERRIDES", "cpu": cpu_name(), "threads": threads,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "export_seconds": round(export_s, 2),
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['cpu']}, {result['threads']} thread(s); torch {result['torch']}, "
             f"onnxruntime {result['onnxruntime']}; median of {result['rows'][0]['runs']}+ alternating runs", "",
             "| B | S | torch eager (ms) | ONNX Runtime (ms) | ORT speed-up | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch_size']} | {r['num_samples']} | {r['torch_ms']:.2f} | {r['onnx_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from export.runtime import physical_cores

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=_size, default=[(1, 8), (32, 8)], metavar="BxS",
                   help="batch size x Monte Carlo samples (default: 1x8 32x8)")
    p.add_argument("--threads", type=int, default=None, help="threads for both backends (default: physical cores)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per backend and size (at most)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time budget per size (at least 5 runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    threads = args.threads or physical_cores()
    result = run(args.sizes, threads, args.repeats, args.max_seconds)
    if args.json:
        json.dump(result, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
