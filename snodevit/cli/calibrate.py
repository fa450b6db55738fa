"""`snodevit calibrate`: fit temperature, conformal and accept/review thresholds, store them with the model, and
write a report that checks them on the test split, under rotation and on out-of-distribution inputs.

The fitted calibration goes into the model's meta.json (``calibration``, plus the headline figures as
``calibration_figures``), so the service, `snodevit score` and `snodevit export` all apply the same one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from calibration import write_report

from snodevit.checkpoint import update_meta
from snodevit.cli._common import add_device_flag, add_json_flag, add_precision_flag, emit, positive_int
from snodevit.cli.errors import CLIError
from snodevit.data.sets import load_dataset
from snodevit.evaluation import (CONFORMAL_SCORES, DECISION_SCORES, CalibrateConfig, calibrate_model, quick_config,
    report_intro)
from snodevit.inference.backends import open_model
from snodevit.inference.fitted import GATE_SCORES

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``snodevit calibrate``; its defaults are those of :class:`CalibrateConfig`."""
    d = CalibrateConfig()
    p = sub.add_parser("calibrate", help="fit and store the calibration of a model; write a calibration report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model directory (meta.json is updated in place)")
    p.add_argument("--data", default="mnist5k", help="data set whose calibration/test splits are used (default: "
                   "%(default)s)")
    p.add_argument("--out", required=True, type=Path, help="report folder: report.html, metrics.json, PNGs")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help=f"Monte Carlo samples per image (default {d.num_samples}; 4 with --quick)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(d.alphas), metavar="ALPHA",
                   help="miscoverage of the conformal sets, each in (0, 1) (default: %(default)s)")
    p.add_argument("--target-risk", type=float, default=d.target_risk,
                   help="error rate among accepted images the decision threshold aims at (default: %(default)s)")
    p.add_argument("--decision-score", choices=DECISION_SCORES, default=d.decision_score,
                   help="what the accept/review rule thresholds (default: %(default)s)")
    p.add_argument("--conformal-score", choices=CONFORMAL_SCORES, default=d.conformal_score,
                   help="non-conformity score of the prediction sets (default: %(default)s)")
    p.add_argument("--gate-score", choices=[*GATE_SCORES, "none"], default=d.gate_score,
                   help="score of the out-of-distribution gate; 'none' fits no gate (default: %(default)s)")
    p.add_argument("--gate-review-rate", type=float, default=d.gate_review_rate,
                   help="share of in-distribution images the gate may send to review, in (0, 1) (default: "
                   "%(default)s)")
    p.add_argument("--empirical-risk-only", action="store_true",
                   help="fit the decision threshold on the calibration split's error count alone, without also "
                        "bounding the mean of 1 - confidence among the accepted (fragile on a few hundred images)")
    p.add_argument("--seed", type=int, default=d.seed, help="image i of every pass is seeded with SEED + i")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--quick", action="store_true",
                   help="a small run for tests: 4 samples, at most 200 images per set, 3 angles, 64 OOD images, "
                   "600 training images for the gate")
    add_device_flag(p)
    add_precision_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags with the flag's name, before the model is opened."""
    bad = [a for a in args.alphas if not 0.0 < a < 1.0]
    if bad:
        raise CLIError(f"--alphas must each be in (0, 1), got {' '.join(f'{a:g}' for a in bad)} "
                       "(e.g. --alphas 0.05 0.1 for 95% and 90% coverage)")
    if not 0.0 <= args.target_risk <= 1.0:
        raise CLIError(f"--target-risk must be in [0, 1] (an error rate), got {args.target_risk:g}")
    if not 0.0 < args.gate_review_rate < 1.0:
        raise CLIError(f"--gate-review-rate must be in (0, 1) (a share of images), got {args.gate_review_rate:g}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder")


def _human(h: dict[str, Any], model: Path, out: Path, quick: bool) -> str:
    """The printout for people: the headline figures ``h`` (read, never recomputed), one line per fact."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [f"calibrated {model} on {h['data']} ({h['calibration_images']} calibration / {h['test_images']} test "
             f"images, S={h['num_samples']}) in {h['seconds']:.0f}s" + ("  [--quick: for tests only]" if quick else ""),
             f"  temperature T = {h['temperature']:.4f}   accuracy {pct(h['accuracy'])}",
             f"  test ECE {pct(h['ece_before'])} -> {pct(h['ece_after'])}   NLL {h['nll_before']:.4f} -> "
             f"{h['nll_after']:.4f}"]
    for a, cov in h["coverage"].items():
        # the bare sets are the ones the guarantee covers; the served ones add the top class, so they cover at
        # least as often as the model is right, whatever alpha asks for
        lines.append(f"  conformal ({h['conformal_score']}) alpha {a}, target coverage {pct(1 - float(a))}:")
        lines.append(f"    bare sets {{y : score <= q}}: coverage {pct(h['bare_coverage'][a])}, mean size "
                     f"{h['bare_mean_set_size'][a]:.3f}, {pct(h['empty_fraction'][a])} empty")
        lines.append(f"    served sets (top class added, never empty): coverage {pct(cov)}, mean size "
                     f"{h['mean_set_size'][a]:.3f}")
    thr = h["decision_threshold"]
    if thr is None:  # no threshold reached the target risk on the calibration split
        lines.append(f"  accept rule: no {h['decision_score']} threshold reaches {pct(h['target_risk'])} risk on the "
                     "calibration split; every image goes to review")
    else:
        op = ">=" if h["decision_score"] == "confidence" else "<="
        lines.append(f"  accept when {h['decision_score']} {op} {thr:.4f} (target risk {pct(h['target_risk'])}): "
                     f"test coverage {pct(h['selective_coverage'])}, risk {pct(h['selective_risk'])}")
    gate = h.get("ood_gate")
    if gate is None:
        lines.append("  out-of-distribution gate: none")
    else:
        lines.append(f"  out-of-distribution gate ({gate['score']}): review when score > "
                     f"{float(gate['threshold']):.4g} (fitted to review {pct(gate['review_rate'])} of "
                     "in-distribution images)")
    lines.append("  decisions (accepted / error among accepted / sent to review as out of distribution):")
    for name, row in h["decisions"].items():
        lines.append(f"    {name:<18} {pct(row['accepted']):>8} / {pct(row['error_among_accepted']):>8} / "
                     f"{pct(row['review_out_of_distribution']):>8}")
    lines.append("  OOD AUROC (mutual information): " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in h["ood_auroc_mutual_information"].items()))
    lines.append(f"  calibration stored in {model / 'meta.json'}; report: {out / 'report.html'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Fit the calibration of ``--model``, write the report to ``--out``, then store the calibration in meta.json
    (last, so a run that fails leaves the model as it was).

    Returns:
        0; a bad argument raises ``CLIError`` and a model or data set that does not fit raises ``ValueError``
        (both exit 2 through the CLI's error handling).
    """
    _check_args(args)
    # CheckpointError (exit 2) when it is not a model
    loaded = open_model(args.model, "torch", args.device, args.precision)
    bundle = load_dataset(args.data, image_size=loaded.preprocessing.image_size)
    options: dict[str, Any] = dict(alphas=tuple(args.alphas), target_risk=args.target_risk,
                                   decision_score=args.decision_score, conformal_score=args.conformal_score,
                                   seed=args.seed, batch_size=args.batch_size, gate_score=args.gate_score,
                                   gate_review_rate=args.gate_review_rate,
                                   calibrated_risk=not args.empirical_risk_only)
    if args.num_samples is not None:
        options["num_samples"] = args.num_samples
    cfg = quick_config(**options) if args.quick else CalibrateConfig(**options)
    result = calibrate_model(loaded, bundle, cfg, progress=not args.json)

    write_report(args.out, result.metrics, result.figures, title=f"snodevit calibration report: {args.model.name}",
                 intro=report_intro(result, f"the model in {args.model}"))
    headline = {"model": str(args.model), "out": str(args.out), "report": str(args.out / "report.html"),
                "quick": bool(args.quick), **result.headline}
    update_meta(args.model, calibration=result.calibration.to_dict(), calibration_figures=headline)
    emit(args, headline, _human(headline, args.model, args.out, args.quick))
    return 0
