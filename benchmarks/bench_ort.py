"""Section 2c of ``benchmarks/bench.py``: ONNX Runtime's graph optimisation levels and its dynamic int8
quantisation, timed against each other."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench_common import Variant, time_alternating
from bench_model_path import export_for_timing

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
