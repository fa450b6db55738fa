"""`snodevit export --model DIR --out model.onnx`: one self-contained ONNX file, checked against PyTorch.

The graph takes ``images`` and ``noise`` and returns Monte Carlo ``logits`` (and ``attention`` with
--attention-maps); the config, class names, preprocessing and calibration travel in its metadata, so the file
alone is enough to serve. After writing, ONNX Runtime is compared with PyTorch on random images with the same
fixed noise; a mismatch fails the command (exit 1) and leaves the file in place for inspection.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from snodevit.checkpoint import load_model
from snodevit.cli._common import add_json_flag, emit, positive_int
from snodevit.cli.errors import EXIT_PARTIAL, CLIError

from .onnx_export import check_parity, export_onnx
from .runtime import OnnxPredictor

PARITY_IMAGES = 4
PARITY_SAMPLES = 4
PARITY_TOLERANCE = 1e-3  # float32 round-off through ~100 ops of a trained model's logits; 1e-4 on the test models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained model to ONNX (noise as an input)", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="model directory written by `snodevit train`")
    p.add_argument("--out", required=True, type=Path, help="destination .onnx file (replaced atomically)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (>= 18; default: the exporter's)")
    p.add_argument("--attention-maps", action="store_true",
                   help="add the attention output (S, B, depth, N, N) used for attention maps and rollout")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix != ".onnx":
        raise CLIError(f"--out must name a .onnx file, got {str(args.out)!r}")
    if args.out.is_dir():
        raise CLIError(f"--out {str(args.out)!r} is a directory; name the .onnx file to write")
    model, meta = load_model(args.model, map_location="cpu")
    if not args.json:
        print(f"exporting {args.model} -> {args.out} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    path = export_onnx(model, args.out, meta=meta, opset=args.opset, attention_maps=args.attention_maps)
    seconds = time.perf_counter() - t0
    predictor = OnnxPredictor(path, device="cpu")
    diff = check_parity(model, predictor, batch_size=PARITY_IMAGES, num_samples=PARITY_SAMPLES)
    figures = {"path": str(path), "size_bytes": path.stat().st_size, "opset": predictor.metadata["opset"],
               "attention_maps": predictor.has_attention, "parity_max_abs_diff": diff,
               "parity_images": PARITY_IMAGES, "parity_samples": PARITY_SAMPLES, "parity_tolerance": PARITY_TOLERANCE,
               "export_seconds": round(seconds, 2), "weights_sha256": predictor.weights_sha256}
    human = (f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, opset {figures['opset']}, "
             f"{'with' if predictor.has_attention else 'without'} attention maps) in {seconds:.1f} s\n"
             f"parity vs PyTorch on {PARITY_IMAGES} images x {PARITY_SAMPLES} samples, same noise: "
             f"max abs diff of logits {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    emit(args, figures, human)
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        raise CLIError(f"ONNX Runtime disagrees with PyTorch: max abs diff {diff:.3e} > {PARITY_TOLERANCE:.0e}; "
                       f"{path} was written but should not be served", code=EXIT_PARTIAL)
    return 0
