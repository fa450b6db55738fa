"""Sections 1 and 2 of ``benchmarks/bench.py``: the matmul ceilings and the model path (loop, folded, bf16,
ONNX Runtime) on the CPU and on a CUDA device, with intra-op threads compared."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from bench_common import CLASS_NAMES, PREPROCESSING, Variant, time_alternating


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


def _cuda_cell(variant: str, model: torch.nn.Module, predictor: Any, b: int, s: int, ceilings: dict[str, float],
               budget_s: float) -> list[dict[str, Any]]:
    """The rows of one (B, S) cell on the GPU: loop, folded, folded bf16, and ONNX Runtime when ``predictor``."""
    from snodevit.inference.passes import sample_in_passes

    dev = torch.device("cuda")
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
    f_fold, f_loop = count_flops(model, b, s, loop=False), count_flops(model, b, s, loop=True)
    fp32, bf16 = ceilings["fp32"], ceilings["bf16"]
    ref_max_abs = float(outs["folded"].abs().max())  # the scale the differences are judged against
    rows = [_row(variant, "cuda", "loop", b, s, times["loop"], f_loop, fp32),
            _row(variant, "cuda", "folded", b, s, times["folded"], f_fold, fp32),
            _row(variant, "cuda", "folded_bf16", b, s, times["folded_bf16"], f_fold, bf16,
                 max_abs_diff=float((outs["folded_bf16"] - outs["folded"]).abs().max()), ref_max_abs=ref_max_abs)]
    if "onnx_cuda" in times:
        rows.append(_row(variant, "cuda", "onnx_cuda", b, s, times["onnx_cuda"], f_fold, fp32,
                         max_abs_diff=float((outs["onnx_cuda"] - outs["folded"]).abs().max()),
                         ref_max_abs=ref_max_abs))
    return rows


def model_path_cuda(variants: tuple[Variant, ...], cells: list[tuple[int, int]], ceilings: dict[str, float],
                    budget_s: float, workdir: Path, progress: bool) -> tuple[list[dict[str, Any]], str]:
    """Loop, folded fp32, folded bf16 autocast and ORT CUDA (IOBinding) on the GPU.

    Returns:
        rows and a line on ONNX Runtime's CUDA provider (used, or why not).
    """
    import onnxruntime as ort

    from export import OnnxPredictor

    has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    ort_note = (f"ONNX Runtime {ort.__version__}: CUDAExecutionProvider with IOBinding" if has_ort_cuda else
                f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider here (providers: "
                f"{ort.get_available_providers()}): the ORT CUDA rows were not measured")
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(variants) * len(cells), desc="model path (cuda)", disable=not progress, dynamic_ncols=True)
    for v in variants:
        model = v.build()
        predictor = None
        if has_ort_cuda:  # exported from the CPU copy, before the weights move
            predictor = OnnxPredictor(export_for_timing(model, workdir / f"{v.name}-cuda"), device="cuda")
        model = model.to(torch.device("cuda"))
        for b, s in cells:
            rows += _cuda_cell(v.name, model, predictor, b, s, ceilings, budget_s)
            bar.update()
        # the timed closures died with _cuda_cell's frame: with these two names gone the variant's GPU memory is free
        del model, predictor
        torch.cuda.empty_cache()
    bar.close()
    return rows, ort_note
