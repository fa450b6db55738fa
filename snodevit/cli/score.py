"""`snodevit score`: classify many image files offline into one CSV, JSONL or Parquet file, one row per image.

INPUT forms:
  FILE            an image file (any extension)
  FOLDER          every image below it, recursively (.png .jpg .jpeg .gif .bmp .tif .tiff .webp .ppm .pgm
                  .pbm .pnm; hidden files skipped). When all its sub-folders are class names of the model it
                  is an image folder: the class folder of each image is its true label.
  'PATTERN'       a glob (* ? [ ], ** recurses); quote it so the shell leaves it alone
  @LIST, X.txt    a text file with one image path per line, relative to the list file's folder

Each row holds the answer of the HTTP service for that image with the same --seed and --num-samples
(snodevit.inference.records.prediction_records): label, class_index, confidence, top_k, uncertainty_total /
_aleatoric / _epistemic (nats), uncertainty_std, prediction_set, alpha, decision, reason, seed, num_samples
(the samples that image used: with --num-samples auto, as many as the adaptive rule drew),
plus path, true_label and error / error_detail (empty when the image was scored). In CSV, top_k and
prediction_set are JSON text. A file that cannot be read or decoded becomes a row with its error. The numbers
are bit-identical to a lone request at --batch-size 1; images sharing a batch differ from it by float32
rounding only (about 1e-6), since the matrix kernels sum in another order for other batch shapes.

Rows are appended to OUT.partial after every batch; --resume continues a killed run from there, and the
finished file replaces OUT atomically at the end. With true labels (an image folder or --labels) the run also
reports accuracy, NLL, ECE and the other calibration figures.

--engine ray scores on Ray Data (snodevit.scoring.ray_engine): --concurrency model actors, each with
--num-cpus CPUs and --num-gpus GPUs, fed --batch-size images at a time; a local Ray starts unless --address joins
a cluster. Its rows equal the local engine's (same seeds; numbers within float32 rounding), and --resume, the
output formats and the figures are the same.

Exit codes: 0 every image scored; 1 some rows carry an error (the output is complete); 2 unusable arguments
(nothing matched, unknown output extension, output exists without --overwrite/--resume, bad model path, a
resume with other settings); 74 the output could not be written (a full disk, a read-only folder: OUT is absent,
the finished rows stay in OUT.partial; rerun with --resume once there is room); 130 interrupted (Ctrl-C; continue
with --resume).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from snodevit.checkpoint import CheckpointError
from snodevit.cli._common import (add_device_flag, add_json_flag, add_precision_flag, emit, non_negative_int,
                                  positive_int, resolve_device)
from snodevit.cli.errors import EXIT_USAGE, CLIError
from snodevit.data import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from snodevit.inference.backends import LoadedModel, open_model
from snodevit.inference.params import DEFAULT_NUM_SAMPLES, NumSamples, check_alpha, parse_num_samples
from snodevit.scoring import (InputListing, OutputPlan, ScoreError, ScoreSettings, ScoreSummary, expand_inputs,
                              plan_output, read_labels_file, run_header, score_files)
from snodevit.scoring.ray_engine import ModelSpec, RayOptions, score_on_ray


def _num_samples(text: str) -> NumSamples:
    """``--num-samples``: an integer >= 1 or "auto", by the rule the service applies to its ``num_samples``."""
    try:
        return parse_num_samples(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _alpha(text: str) -> float:
    """``--alpha``: a number in (0, 1), by the rule of ``snodevit.inference.params``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in (0, 1), got {text!r}") from None
    try:
        return check_alpha(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="classify image files offline into CSV / JSONL / Parquet",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns or @list.txt")
    p.add_argument("--model", required=True, help="model directory (or .onnx file / folder with --backend onnx)")
    p.add_argument("--out", required=True, help="output file: .csv, .jsonl or .parquet")
    p.add_argument("--labels", metavar="CSV", help="true labels: rows 'path,label' (paths relative to the CSV's "
                   "folder, labels are class names); overrides image-folder labels")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    add_device_flag(p)
    add_precision_flag(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--num-samples", type=_num_samples, default=DEFAULT_NUM_SAMPLES,
                   help="Monte Carlo samples per image, or 'auto': rounds of 8 until the label, decision and "
                        "uncertainty are settled, at most 32; the num_samples column says how many (default "
                        f"{DEFAULT_NUM_SAMPLES}, as the service's)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="noise seed of every image, as the service's `seed` (default 0)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes listed in top_k (default 3)")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="conformal miscoverage of the prediction sets (default: the smallest calibrated one)")
    p.add_argument("--workers", type=non_negative_int, default=min(2, os.cpu_count() or 1),
                   help="decoding processes; 0 decodes in the main process (default min(2, CPUs))")
    p.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                   help=f"larger files become error rows (default {DEFAULT_MAX_BYTES})")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"larger images become error rows (default {DEFAULT_MAX_PIXELS})")
    _add_engine_flags(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the unfinished run in OUT.partial")
    mode.add_argument("--overwrite", action="store_true", help="replace OUT (and any OUT.partial)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=run)


def _resources(text: str) -> float:
    """``--num-cpus`` / ``--num-gpus``: a finite number >= 0 (Ray's resource amounts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "where the images are scored")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray Data actors on a local Ray or a cluster")
    g.add_argument("--address", default=None,
                   help="(ray) the Ray cluster to join: auto (the one on this node) or HEAD:6379; default: start a "
                        "local Ray")
    g.add_argument("--concurrency", type=positive_int, default=2, help="(ray) model actors (default 2)")
    g.add_argument("--num-cpus", type=_resources, default=1.0,
                   help="(ray) CPUs per actor, also its torch and decoding threads (default 1)")
    g.add_argument("--num-gpus", type=_resources, default=0.0,
                   help="(ray) GPUs per actor; fractions share a GPU (default 0)")


def _open(args: argparse.Namespace) -> LoadedModel:
    device = str(resolve_device(args.device))
    try:
        return open_model(args.model, args.backend, device, args.precision)
    except CheckpointError as err:
        raise CLIError(f"--model {args.model}: {err}") from None
    except ImportError as err:
        raise CLIError(f"--backend {args.backend} is unavailable here ({err})") from None
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot open --model {args.model}: {err}") from None


def _human(summary: ScoreSummary, precision: str) -> str:
    s = summary
    lines = [f"scored {s.images} images -> {s.output} ({s.scored} ok, {s.failed} failed)"]
    if s.errors:
        lines.append("  errors: " + ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())))
    if s.decisions:
        lines.append("  decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(s.decisions.items()))
                     + " (by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items())) + ")")
    if s.resumed_rows:
        lines.append(f"  resumed: {s.resumed_rows} rows from the earlier run, {s.new_rows} new")
    lines.append(f"  {s.new_rows} images in {s.elapsed_s:.1f} s ({s.images_per_s:.1f} images/s, "
                 f"{precision} passes)")
    if s.metrics:
        m = s.metrics
        lines.append(f"  {s.labelled} labelled images: accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  "
                     f"ECE {m['ece']:.4f}  Brier {m['brier']:.4f}  AURC {m['aurc']:.4f}")
        if "set_coverage" in m:
            lines.append(f"  prediction sets: coverage {m['set_coverage']:.4f}, mean size {m['mean_set_size']:.2f}")
        acc_acc = "n/a" if m["accepted_accuracy"] is None else f"{m['accepted_accuracy']:.4f}"
        lines.append(f"  accepted {m['accepted']} ({m['accepted_fraction']:.1%}), accuracy among accepted {acc_acc}")
    return "\n".join(lines)


def _score(args: argparse.Namespace, loaded: LoadedModel, listing: InputListing, plan: OutputPlan,
           settings: ScoreSettings) -> ScoreSummary:
    """The run on the chosen engine; both write the same rows into the same partial file and output."""
    header = run_header(loaded, settings, args.inputs, args.labels)
    progress = not (args.json or args.no_progress)
    if args.engine == "local":
        return score_files(loaded, listing, plan, settings, header=header, progress=progress)
    options = RayOptions(address=args.address, concurrency=args.concurrency, num_cpus=args.num_cpus,
                         num_gpus=args.num_gpus)
    model = ModelSpec(path=os.path.abspath(args.model), backend=args.backend, device=args.device,
                      precision=loaded.precision)
    return score_on_ray(model, listing, plan, settings, options, header=header, progress=progress)


def run(args: argparse.Namespace) -> int:
    try:
        settings = ScoreSettings(num_samples=args.num_samples, seed=args.seed, top_k=args.top_k, alpha=args.alpha,
                                 batch_size=args.batch_size, workers=args.workers, max_bytes=args.max_bytes,
                                 max_pixels=args.max_pixels)
        plan = plan_output(args.out, resume=args.resume, overwrite=args.overwrite)
        if args.labels is not None and not os.path.isfile(args.labels):
            raise ScoreError(f"--labels {args.labels}: no such file")
        loaded = _open(args)
        if args.alpha is not None:
            try:
                loaded.calibration.threshold_for(args.alpha)
            except ValueError as err:
                raise ScoreError(f"--alpha {args.alpha}: {err}") from None
        labels = None if args.labels is None else read_labels_file(args.labels, loaded.class_names)
        listing = expand_inputs(args.inputs, loaded.class_names, labels)
        for w in listing.warnings:
            print(f"snodevit score: warning: {w}", file=sys.stderr)
        try:
            summary = _score(args, loaded, listing, plan, settings)
        except KeyboardInterrupt:
            print(f"snodevit score: stopped; the finished rows are in {plan.partial}: rerun the same command with "
                  "--resume to continue", file=sys.stderr)
            raise
    except ScoreError as err:
        raise CLIError(str(err), getattr(err, "code", EXIT_USAGE)) from None
    figures = summary.to_dict()
    # precision as the service's answers give it (model.precision): what "auto" resolved to
    figures.update(model=args.model, engine=args.engine, model_version=loaded.version, precision=loaded.precision,
                   listed=len(listing), labelled_folders=listing.labelled_folders)
    emit(args, figures, _human(summary, loaded.precision))
    return summary.exit_code
