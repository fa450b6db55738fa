"""What the accept/review decision of a model does under shift and on inputs it was not made for, through the real
`snodevit score` command, as a new user would run it.

Every image set is written as PNG files to a temporary folder (labelled sets with a ``--labels`` CSV), scored with
``snodevit score FOLDER --model MODEL --num-samples S --seed SEED`` (in this process, through ``snodevit.cli.main``),
and the rows are counted: the share accepted automatically, the error rate among accepted images, and the shares sent
to review as out of distribution or for low confidence.

The sets (``snodevit.data.shift``; none of them is used to train or to fit the gate):

* ``test``: the mnist5k test split (in distribution);
* ``rotated A``: the test split rotated by A degrees, 15..180;
* ``sklearn digits``: scikit-learn's 8x8 digits upsampled (another handwriting set);
* ``pixel noise``: the test split under Gaussian pixel noise of 100 grey levels;
* ``uniform_noise``, ``photo_crops``, ``constant``, ``inverted_digits`` (dark ink on white), ``letters``: far out of
  distribution; nothing there should be accepted;
* ``tiny images``: 1x1, 2x2 and 3x3 PNGs of random grey levels (what a broken upload looks like).

With ``--backends torch onnx`` the model is also exported (``snodevit export``) and scored by ONNX Runtime, and the
agreement of the two backends' decisions is reported per set.

Usage::

    python benchmarks/decisions.py --model models/snodevit-mnist --out docs/decisions --compare-samples 1
    python benchmarks/decisions.py --model runs/demo --out runs/decisions --quick       # 40 images per set
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from snodevit.evaluation import (FAR_OOD_SETS, GOAL_ACCEPTED, GOAL_FAR_OOD_REVIEW, GOAL_FAR_OOD_SETS,
    GOAL_ID_ERROR, GOAL_SHIFT_ERROR, decision_figures)
from snodevit.cli.main import main as cli_main
from snodevit.data.sets import load_dataset
from snodevit.machine import cpu_name  # noqa: E402
from snodevit.data.shift import (ROTATION_ANGLES, constant_images, inverted_images, letter_images, photo_crops,
    pixel_noise_images, rotate_images, uniform_noise_images)

#: Sets of digits the model should still label (shifted, labelled): judged by the error among accepted images.
SHIFTED = ("sklearn digits", "pixel noise")


def image_sets(prep: Any, n: int | None, angles: list[float], seed: int) -> dict[str, tuple[torch.Tensor,
                                                                                          torch.Tensor | None]]:
    """Set name -> (uint8 images (N, C, H, W), int64 labels or None); ``n`` caps every set (None: all)."""
    test, labels = load_dataset("mnist5k").raw("test")
    digits, digit_labels = load_dataset("digits").raw("all")
    cap = (lambda t: t) if n is None else (lambda t: t[:n])
    test, labels, digits, digit_labels = cap(test), cap(labels), cap(digits), cap(digit_labels)
    k = len(test)
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3]
    tiny = [torch.randint(0, 256, (prep.channels, s, s), generator=gen, dtype=torch.uint8)
            for s in sizes for _ in range(max(1, k // (3 * len(sizes))))]
    sets: dict[str, tuple[Any, torch.Tensor | None]] = {"test": (test, labels)}
    sets |= {f"rotated {a:g}": (rotate_images(test, a), labels) for a in angles if a % 360}
    sets["sklearn digits"] = (digits, digit_labels)
    sets["pixel noise"] = (pixel_noise_images(test, seed=seed), labels)
    sets["uniform_noise"] = (uniform_noise_images(k, prep, seed), None)
    sets["photo_crops"] = (photo_crops(k, prep, seed), None)
    sets["constant"] = (constant_images(k, prep), None)
    sets["inverted_digits"] = (inverted_images(test), labels)
    sets["letters"] = (letter_images(k, prep, seed), None)
    sets["tiny images"] = (tiny, None)
    return sets


def _write_pngs(folder: Path, images: Any, labels: torch.Tensor | None, class_names: list[str]) -> Path | None:
    """PNG files 00000.png... in ``folder``; with labels, also ``labels.csv`` (path,label) for --labels."""
    folder.mkdir(parents=True)
    rows = []
    for i, img in enumerate(images):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:05d}.png")
        if labels is not None:
            rows.append((f"{i:05d}.png", class_names[int(labels[i])]))
    if labels is None:
        return None
    path = folder / "labels.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return path


def _score(folder: Path, labels: Path | None, model: str, backend: str, out: Path, num_samples: int,
           seed: int) -> list[dict[str, Any]]:
    argv = ["score", str(folder), "--model", model, "--backend", backend, "--out", str(out), "--num-samples",
            str(num_samples), "--seed", str(seed), "--no-progress", "--workers", "0", "--json"]
    if labels is not None:
        argv += ["--labels", str(labels)]
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"snodevit score exited with {code} on {folder}")
    return [json.loads(line) for line in out.read_text().splitlines()]


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Accepted share, error among accepted, accuracy and review shares by reason of one set's score rows."""
    n = len(rows)
    accepted = [r for r in rows if r["decision"] == "accept"]
    labelled = rows[0]["true_label"] is not None if rows else False
    out: dict[str, float | None] = {
        "images": float(n), "accepted": len(accepted) / n,
        "review_out_of_distribution": sum(r["reason_code"] == "out_of_distribution" for r in rows) / n,
        "review_low_confidence": sum(r["reason_code"] == "low_confidence" for r in rows) / n,
        "accuracy": None, "error_among_accepted": None}
    if labelled:
        out["accuracy"] = sum(r["label"] == r["true_label"] for r in rows) / n
        if accepted:
            out["error_among_accepted"] = sum(r["label"] != r["true_label"] for r in accepted) / len(accepted)
    return out


def goals(rows: dict[str, dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    """The gate issue's goals, judged on the rows (the same targets as `snodevit calibrate`'s goals)."""
    out: dict[str, dict[str, Any]] = {}
    t = rows["test"]
    out["test: accepted"] = {"goal": f">= {GOAL_ACCEPTED:.0%}", "measured": t["accepted"],
                             "met": t["accepted"] >= GOAL_ACCEPTED}
    err = t["error_among_accepted"]
    out["test: error among accepted"] = {"goal": f"<= {GOAL_ID_ERROR:.0%}", "measured": err,
                                         "met": err is not None and err <= GOAL_ID_ERROR}
    for name in GOAL_FAR_OOD_SETS:
        review = 1.0 - rows[name]["accepted"]  # type: ignore[operator]
        out[f"{name}: sent to review"] = {"goal": f">= {GOAL_FAR_OOD_REVIEW:.0%}", "measured": review,
                                          "met": review >= GOAL_FAR_OOD_REVIEW}
    for name, row in rows.items():
        if name.startswith("rotated") or name in SHIFTED:
            e = row["error_among_accepted"]
            out[f"{name}: error among accepted"] = {"goal": f"<= {GOAL_SHIFT_ERROR:.0%}", "measured": e,
                                                    "met": e is None or e <= GOAL_SHIFT_ERROR}
    return out


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f} %"


def render(result: dict[str, Any]) -> str:
    """The markdown page of a run."""
    s = result["setup"]
    backends = s["backends"]
    lines = [
        "# Decisions under shift: what `snodevit score` answers on inputs the model was not trained on", "",
        f"Model `{s['model']}` (weights `{s['weights_sha256'][:12]}`), `snodevit score --num-samples "
        f"{s['num_samples']} --seed {s['seed']}`, {s['cpu']}, {s['date']}, {s['seconds']:.0f} s. Command:", "",
        f"    {s['command']}", "",
        "Far-out-of-distribution sets should be sent to review whole; shifted digits may be accepted, but then "
        "mostly right. No set here was used to train the model or to fit its gate.", "",
        "| set | images | accuracy | accepted | error among accepted | review: out of distribution | review: low "
        "confidence |" + (" torch = ONNX decisions |" if len(backends) > 1 else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if len(backends) > 1 else "")]
    for name, row in result["rows"].items():
        agree = result.get("agreement", {}).get(name)
        lines.append(f"| {name} | {row['images']:.0f} | {_pct(row['accuracy'])} | {_pct(row['accepted'])} | "
                     f"{_pct(row['error_among_accepted'])} | {_pct(row['review_out_of_distribution'])} | "
                     f"{_pct(row['review_low_confidence'])} |" + (f" {_pct(agree)} |" if agree is not None else ""))
    if "compared" in result:
        lines += render_comparison(result)
    lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---|---:|---|"]
    for name, g in result["goals"].items():
        lines.append(f"| {name} | {g['goal']} | {_pct(g['measured'], 2)} | {'yes' if g['met'] else '**no**'} |")
    lines += ["", "![decisions under rotation](decisions_under_shift_rotation.png)", "",
              "![decisions per set](decisions_under_shift_sets.png)", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from snodevit.inference.backends import open_model

    loaded = open_model(args.model, device="cpu")
    if loaded.calibration.ood_gate is None:
        print(f"warning: {args.model} has no out-of-distribution gate (run `snodevit calibrate`)", file=sys.stderr)
    angles = [float(a) for a in (args.angles if args.angles else ROTATION_ANGLES)]
    n = args.images or (40 if args.quick else None)
    sets = image_sets(loaded.preprocessing, n, angles, args.seed)
    started = time.perf_counter()
    rows: dict[str, dict[str, float | None]] = {}
    agreement: dict[str, float] = {}
    compared: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="snodevit-decisions-") as tmp:
        root = Path(tmp)
        model_for = {"torch": str(args.model)}
        if "onnx" in args.backends:
            onnx = root / "model.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                if cli_main(["export", "--model", str(args.model), "--out", str(onnx)]) != 0:
                    raise RuntimeError("snodevit export failed")
            model_for["onnx"] = str(onnx)
        for i, (name, (images, labels)) in enumerate(sets.items()):
            folder = root / f"set{i:02d}"
            label_csv = _write_pngs(folder, images, labels, loaded.class_names)
            scored = {b: _score(folder, label_csv, model_for[b], b, root / f"set{i:02d}-{b}.jsonl", args.num_samples,
                                args.seed) for b in args.backends}
            first = scored[args.backends[0]]
            rows[name] = summarize_rows(first)
            if len(args.backends) > 1:
                other = {r["path"]: r["decision"] for r in scored[args.backends[1]]}
                agreement[name] = sum(other[r["path"]] == r["decision"] for r in first) / len(first)
            if args.compare_samples:
                compared[name] = summarize_rows(_score(folder, label_csv, model_for["torch"], "torch",
                                                       root / f"set{i:02d}-cmp.jsonl", args.compare_samples, args.seed))
            print(f"{name:<18} accepted {_pct(rows[name]['accepted']):>8}  error among accepted "
                  f"{_pct(rows[name]['error_among_accepted']):>8}  OOD {_pct(rows[name]['review_out_of_distribution'])}",
                  file=sys.stderr)
    result = {"rows": rows, "goals": goals(rows), "setup": {
        "model": str(args.model), "weights_sha256": loaded.weights_sha256, "num_samples": args.num_samples,
        "seed": args.seed, "images_per_set": n, "angles": angles, "backends": list(args.backends),
        "far_ood_sets": list(FAR_OOD_SETS), "cpu": cpu_name(), "python": platform.python_version(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.perf_counter() - started, "command": "python " + " ".join(sys.argv)}}
    if agreement:
        result["agreement"] = agreement
    if compared:
        result["compared"] = {"num_samples": args.compare_samples, "rows": compared}
    return result


def wrong_accepted(row: dict[str, float | None]) -> int | None:
    """How many wrong answers a set's row accepted (None for a set without labels or with nothing accepted)."""
    if row["error_among_accepted"] is None or row["accepted"] is None:
        return None
    return round(row["images"] * row["accepted"] * row["error_among_accepted"])  # type: ignore[operator]


#: The shifted digit sets whose wrongly accepted answers the comparison of sample counts adds up (not 180 degrees,
#: where a turned 6 is a 9).
COMPARED_SHIFTS = ("rotated 30", "rotated 45", "rotated 90", "rotated 135", "sklearn digits")


def render_comparison(result: dict[str, Any]) -> list[str]:
    """The page's table of the served S against ``--compare-samples``, each under the thresholds fitted for it."""
    cmp = result["compared"]
    s, n = result["setup"]["num_samples"], cmp["num_samples"]
    lines = ["", f"## S = {s} against S = {n}", "",
             f"The same images scored with `--num-samples {n}`, under the thresholds `snodevit calibrate` fitted for "
             f"{n} sample{'s' if n > 1 else ''} (each count has its own; `/metadata` lists them).", "",
             f"| set | S = {s}: accepted | error among accepted | wrong accepted | S = {n}: accepted | error among "
             "accepted | wrong accepted |", "|---|---:|---:|---:|---:|---:|---:|"]
    totals = [0, 0]
    for name, row in result["rows"].items():
        other = cmp["rows"][name]
        w = (wrong_accepted(row), wrong_accepted(other))
        if name in COMPARED_SHIFTS:
            totals = [t + (v or 0) for t, v in zip(totals, w)]
        lines.append(f"| {name} | {_pct(row['accepted'])} | {_pct(row['error_among_accepted'])} | "
                     f"{'–' if w[0] is None else w[0]} | {_pct(other['accepted'])} | "
                     f"{_pct(other['error_among_accepted'])} | {'–' if w[1] is None else w[1]} |")
    fewer = "–" if not totals[1] else f"{100 * (1 - totals[0] / totals[1]):.0f} %"
    lines += ["", f"Wrong answers accepted on {', '.join(COMPARED_SHIFTS)}: **{totals[0]}** at S = {s}, "
              f"**{totals[1]}** at S = {n} ({fewer} fewer with the samples), at in-domain acceptance "
              f"{_pct(result['rows']['test']['accepted'])} and {_pct(cmp['rows']['test']['accepted'])}. The "
              "calibration report's `samples_comparison` makes the same count at exactly equal acceptance of the "
              "calibration split."]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (calibrated, with its gate)")
    p.add_argument("--out", required=True, type=Path, help="folder for decisions.md, decisions.json and the plots")
    p.add_argument("--num-samples", type=int, default=32, help="Monte Carlo samples per image (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=None, help="cap on the images of every set (default: all)")
    p.add_argument("--angles", type=float, nargs="+", help="rotation angles (default: 0 to 180 in steps of 15)")
    p.add_argument("--backends", nargs="+", choices=["torch", "onnx"], default=["torch"],
                   help="scored by each; the first one's figures are reported, the others' agreement with it")
    p.add_argument("--compare-samples", type=int, default=None, metavar="N",
                   help="also score every set with N samples (torch) and compare, e.g. 1")
    p.add_argument("--quick", action="store_true", help="40 images per set")
    args = p.parse_args(argv)
    if (args.num_samples < 1 or args.seed < 0 or (args.images is not None and args.images < 1)
            or (args.compare_samples is not None and args.compare_samples < 1)):
        p.error("--num-samples, --compare-samples and --images must be >= 1, --seed >= 0")
    if not (Path(args.model) / "meta.json").is_file():
        p.error(f"--model {args.model}: no meta.json there (a model directory is needed)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    for name, png in decision_figures(result["rows"]).items():
        (args.out / f"{name}.png").write_bytes(png)
    (args.out / "decisions.md").write_text(render(result))
    print(f"wrote {args.out / 'decisions.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
