"""`snodevit score` throughput and peak memory on a folder of generated digit PNGs.

The MNIST-preset tiny model (``create_model("tiny", **MNIST_OVERRIDES)``, random weights: speed does not depend
on them) is saved to a temporary folder, N real mnist5k digits (cycled) are written as PNG files in class
folders (so the labelled-metrics path runs too), and the real command line is run in a child process for each
setting:

* throughput: images/s of the scoring loop (from ``--json``; model loading and listing excluded) and of the
  whole command (wall clock), at each ``--num-samples``;
* memory: the child's peak RSS from ``os.wait4`` (``ru_maxrss``: the largest single process among the scorer
  and its decoding workers) and the peak of the summed PSS of the scorer and its workers, sampled every 0.2 s
  from ``/proc/PID/smaps_rollup`` (PSS splits shared pages between processes, so the sum is not inflated by
  the copy-on-write pages the forked workers share). Two sizes are run so that flat memory shows as equal peaks.

Usage::

    python benchmarks/score_throughput.py                 # 1000 images at S=8 and S=32; memory at 2000 / 20000
    python benchmarks/score_throughput.py --quick         # 200 images; memory at 200 / 1000
    python benchmarks/score_throughput.py --memory-model micro --memory-samples 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from snodevit.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]

#: ``--memory-model micro``: the test suite's small model, for memory runs of many images on a slow machine.
MICRO = dict(dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)


def _make_model(folder: Path, micro: bool = False) -> Path:
    import snodevit
    from snodevit.data.sets import load_dataset

    torch.manual_seed(0)
    model = snodevit.create_model("tiny", **snodevit.MNIST_OVERRIDES, **(MICRO if micro else {}))
    torch.nn.init.normal_(model.head.weight)
    snodevit.save_model(model, folder, meta={"class_names": [str(i) for i in range(10)],
                                             "preprocessing": load_dataset("mnist5k").preprocessing.to_dict()})
    return folder


def _write_pngs(folder: Path, n: int) -> Path:
    """n PNG files of real digits (cycled through mnist5k), in class sub-folders."""
    from snodevit.data.sets import load_dataset

    images, labels = load_dataset("mnist5k").raw("all")
    for c in range(10):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        j = i % len(labels)
        Image.fromarray(images[j, 0].numpy()).save(folder / str(int(labels[j])) / f"{i:07d}.png", compress_level=1)
    return folder


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _run_score(args: list[str], threads: int | None) -> dict[str, Any]:
    """Run `snodevit score ... --json` in a child; its figures plus wall time and memory peaks."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "snodevit.cli", "score", *args, "--json", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss
        while not done.wait(0.2):
            total = _pss_kib(proc.pid) + sum(_pss_kib(c) for c in _children(proc.pid))
            peak_pss = max(peak_pss, total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{b''.join(err_chunks).decode()}")
    figures = json.loads(b"".join(out_chunks))
    figures.update(wall_s=wall, ru_maxrss_mib=usage.ru_maxrss / 1024, peak_pss_mib=peak_pss / 1024)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--images", type=int, help="images of the throughput runs (default 1000, quick 200)")
    p.add_argument("--num-samples", type=int, nargs="+", default=[8, 32])
    p.add_argument("--memory-images", type=int, nargs="+", help="sizes of the memory runs (default 2000 20000, "
                   "quick 200 1000)")
    p.add_argument("--memory-samples", type=int, default=8, help="--num-samples of the memory runs (default 8)")
    p.add_argument("--memory-model", choices=["tiny", "micro"], default="tiny",
                   help="model of the memory runs: the MNIST-preset tiny model, or the tests' micro model (dim 24, "
                   "depth 2) when the tiny one is too slow here; the engine's memory does not grow with N either way")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the scorer (default: inherited)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    n_images = args.images or (200 if args.quick else 1000)
    memory_sizes = args.memory_images or ([200, 1000] if args.quick else [2000, 20000])

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        root = Path(tmp)
        models = {"tiny": _make_model(root / "model")}
        if args.memory_model == "micro":
            models["micro"] = _make_model(root / "micro", micro=True)
        folders = {n: _write_pngs(root / f"png{n}", n) for n in sorted({n_images, *memory_sizes})}
        common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        runs = [("throughput", "tiny", n_images, s) for s in args.num_samples]
        runs += [("memory", args.memory_model, n, args.memory_samples) for n in memory_sizes]
        for kind, model, n, s in runs:
            out = root / f"out-{kind}-{n}-{s}.parquet"
            fig = _run_score([str(folders[n]), "--model", str(models[model]), "--out", str(out), "--num-samples",
                              str(s), *common], args.threads)
            results.append({"kind": kind, "model": model, "images": n, "num_samples": s,
                            "loop_images_per_s": fig["images_per_s"], "wall_images_per_s": n / fig["wall_s"],
                            "wall_s": fig["wall_s"], "ru_maxrss_mib": fig["ru_maxrss_mib"],
                            "peak_pss_mib": fig["peak_pss_mib"]})
            print(f"done: {json.dumps(results[-1])}", file=sys.stderr)  # kept if a later run is stopped

    env = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "threads": args.threads or os.environ.get("OMP_NUM_THREADS", "default"), "workers": args.workers,
           "batch_size": args.batch_size}
    if args.json:
        print(json.dumps({"environment": env, "results": results}, indent=2))
        return 0
    print(f"`snodevit score` (tiny: MNIST-preset tiny model; micro: dim 24, depth 2), {env['cpu']} "
          f"({env['cpus']} CPUs), torch {env['torch']}, threads {env['threads']}, {args.workers} decoding workers, "
          f"batch {args.batch_size}\n")
    print("| run | model | images | S | images/s (loop) | images/s (wall) | wall s | peak RSS MiB (largest process) "
          "| peak PSS MiB (all processes) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['kind']} | {r['model']} | {r['images']} | {r['num_samples']} | "
              f"{r['loop_images_per_s']:.1f} | "
              f"{r['wall_images_per_s']:.1f} | {r['wall_s']:.1f} | {r['ru_maxrss_mib']:.0f} | "
              f"{r['peak_pss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
