"""A self-contained HTML report of metric results, with ``metrics.json`` and the figures beside it.

The report reads results; it never recomputes a metric. ``report.html`` embeds every PNG as a base64 data URI,
so the one file opens offline and can be mailed around. Every file is written atomically (temporary file in the
same folder, then ``os.replace``), so a reader never sees a half-written report.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .files import atomic_write_bytes

__all__ = ["SECTION_NOTES", "to_jsonable", "write_report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FIGURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_MAX_LIST_CELL = 12  # longer lists are shortened in table cells (metrics.json keeps them whole)

# Plain-language notes for a sceptical reader, keyed by the top-level keys of the metrics dict.
SECTION_NOTES: dict[str, str] = {
    "calibration": (
        "A model is calibrated when its confidence can be taken at face value: of all the answers given with 80% "
        "confidence, about 80% should be right. ECE (expected calibration error) is the average gap between "
        "confidence and accuracy over confidence bins, weighted by how many answers fall in each bin; MCE is the "
        "worst bin, ACE uses bins of equal size, and class-wise ECE checks every class's probability, not only the "
        "top one. Lower is better, 0 is perfect. NLL and the Brier score are proper scores: they reward being "
        "right and being honest about it, so they cannot be gamed by always saying 50%. Binned errors are noisy "
        "on small test sets: differences in the third decimal are usually not meaningful."),
    "temperature": (
        "Temperature scaling divides every logit by one number T, fitted on the calibration split (never on the "
        "test split). T > 1 means the raw model was overconfident and its probabilities are softened; T < 1 "
        "means it was underconfident. It cannot change which class is predicted, so accuracy is unchanged; the "
        "fit is kept only if it does not worsen the calibration NLL, otherwise T = 1."),
    "conformal": (
        "A conformal prediction set lists every class the model cannot rule out. On data like the calibration "
        "split it contains the true class at least 1 - alpha of the time, whatever the model: a weaker model "
        "pays with larger sets, not with lost coverage. The guarantee is an average over images (not for each "
        "image), it assumes test images are exchangeable with the calibration images, and it does not survive "
        "a distribution shift. Two kinds of set are measured. The bare sets (bare_coverage, bare_mean_set_size, "
        "empty_fraction) are exactly what the guarantee is about: their coverage should lie between 1 - alpha and "
        "1 - alpha + 1/(n + 1) for n calibration images, give or take its standard error. A bare set can be empty: "
        "even the most likely class scores worse than the threshold, so no class is needed on that image to reach "
        "the promised coverage (the image is among the least typical by the score). The served sets (coverage, "
        "mean_set_size, singleton_fraction) are what the service answers: the top class is added to every set, so "
        "none is empty, and their coverage can never fall below the top-1 accuracy; for an accurate model it sits "
        "above 1 - alpha whatever alpha is. Judge the calibration of the sets on the bare coverage, and what a user "
        "gets on the served one; look at the set sizes too."),
    "selective": (
        "Selective prediction answers automatically only when the score clears a threshold and sends the rest "
        "to review. The threshold was chosen on the calibration split as the one accepting the most images while "
        "keeping the error rate among accepted images at the target; the test figures show whether that held "
        "on unseen data. It is an estimate, not a guarantee: on new data the error rate among accepted images "
        "scatters around the target, by roughly the square root of target x (1 - target) / (number accepted)."),
    "misclassification": (
        "Can the uncertainty score tell right answers from wrong ones? AUROC is the probability that a random "
        "wrong answer gets a higher uncertainty than a random right one (0.5 = chance, 1 = perfect). AUPR "
        "focuses on the errors and depends on how many there are. FPR at 95% TPR is the share of right answers "
        "that would be flagged if we insist on catching 95% of the wrong ones (lower is better)."),
    "ood": (
        "Can the uncertainty score tell images from another distribution (out-of-distribution, OOD) from the "
        "kind the model was trained on? Same figures as for misclassification, with OOD images as the class to "
        "detect: AUROC 0.5 is chance, 1 is perfect; FPR at 95% TPR is the share of normal images flagged when "
        "95% of OOD images are."),
    "ood_gate": (
        "Candidate scores for the out-of-distribution gate, side by side. Each is thresholded at the conformal "
        "novelty threshold of the calibration split (Bates et al. 2023), so it sends about the stated share of "
        "in-distribution images to review (the 'review test' row shows that share on the test split), and the "
        "rows show what share of each shifted or out-of-distribution set it sends to review at that price, and "
        "its AUROC against the test split (1 = perfect separation). feature_density is the sum over layers of "
        "the class-conditional Mahalanobis distance of the layer's patch tokens pooled by quadrant, each layer "
        "divided by its training mean; feature_density_last uses the last block's features only; energy is -T logsumexp(z/T); a '|' row flags an image "
        "when either score flags it, each at half the rate. No set here was used to fit any gate."),
    "decisions_under_shift": (
        "What the served decision does on each set: the share accepted automatically, the error rate among "
        "those, and the shares sent to review because the gate found the image out of distribution or because "
        "confidence was low. The first row is the in-distribution test split. On shifted digits (rotations, "
        "another handwriting set, heavy pixel noise) a good decision either accepts few or accepts mostly right "
        "answers; on far-OOD sets (noise, photographs, blank images, inverted digits, letters) it should accept "
        "almost nothing."),
    "decisions_under_shift_one_sample": (
        "The same decisions from one Monte Carlo sample per image (the first of each image's samples above), under "
        "the thresholds fitted for one sample on the calibration split: what the samples add is the difference "
        "between this table and the one above."),
    "samples_comparison": (
        "Do the Monte Carlo samples earn their cost? Wrong answers accepted on shifted digits (rotated 30, 45, 90 "
        "and 135 degrees, scikit-learn's digits) by the served number of samples and by one sample, each with the "
        "gate threshold fitted for its count and a confidence threshold that accepts the same share of the "
        "calibration split as the served rule (equal in-domain acceptance); 'reduction' is how many fewer the "
        "samples let through."),
    "shift": (
        "The test images are rotated by increasing angles, which moves them away from the training data. "
        "Accuracy is expected to fall; a trustworthy model becomes less confident at the same pace, so its ECE "
        "stays low. A rising ECE means the model is confidently wrong on shifted inputs, which is the failure "
        "this section is looking for."),
}

#: Headings of sections whose key reads badly as one (the others are headed by their key).
SECTION_TITLES: dict[str, str] = {
    "ood_gate": "Out-of-distribution gate: the candidates side by side",
    "decisions_under_shift": "Decisions under shift",
    "decisions_under_shift_one_sample": "Decisions under shift from one sample",
    "samples_comparison": "Samples against one sample at equal in-domain acceptance",
}

# Captions for figures, matched by substrings of the figure name (first match wins).
_UNCERTAINTY_NOTE = ("Uncertainty of right (blue) and wrong (red) answers. The less the two overlap, the better the "
                     "score flags errors.")
_FIGURE_NOTES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("reliability",), "Bars: accuracy of the answers in each confidence bin; dashed line: perfect calibration; red "
                       "hatching: the gap between confidence and accuracy (above the bar: overconfident); numbers: "
                       "answers per bin. Bins with few answers are noisy."),
    (("risk_coverage",), "Error rate among the accepted answers when only the most confident fraction (coverage) is "
                         "accepted. Lower and flatter is better; a score that ranks errors well keeps the risk low "
                         "until high coverage."),
    (("confidence",), "How confident the model is across the test set. A calibrated model's mean confidence is close "
                      "to its accuracy."),
    (("uncertainty", "misclassification", "entropy", "epistemic", "mutual_information"), _UNCERTAINTY_NOTE),
    (("decisions_under_shift_rotation",), "What the served decision does as the test digits are rotated: the "
                                          "share accepted automatically, the error rate among those (dotted red "
                                          "line: the 5% goal), the share the out-of-distribution gate sends to "
                                          "review, and the accuracy over all images for comparison."),
    (("decisions_under_shift_sets",), "The share of each shifted or out-of-distribution set sent to review, by "
                                      "reason (the gate or low confidence); 'err' is the error rate among the "
                                      "images still accepted. Dotted line: the 99% goal for far-OOD sets."),
    (("shift", "rotation"), "Accuracy and calibration error as the rotation angle grows."),
)


def to_jsonable(value: Any, where: str = "metrics", finite_only: bool = True) -> Any:
    """Turn metric results into plain JSON values.

    Dicts (string keys), lists/tuples, str, bool, None, ints and floats pass through; dataclasses become dicts,
    tensors and numpy values become numbers or lists. With ``finite_only``, non-finite floats (NaN, +-inf)
    become ``None`` so the file is strict JSON that any parser reads.

    Args:
        value: the metric results.
        where: the path of ``value`` inside the results, used in error messages.
        finite_only: replace NaN and infinities by ``None``.

    Returns:
        A structure of dict / list / str / int / float / bool / None.

    Raises:
        ValueError: on a non-string dict key or a value of another type.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Tensor | np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"`{where}` keys must be strings, got {k!r} ({type(k).__name__})")
            out[k] = to_jsonable(v, f"{where}.{k}", finite_only)
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{where}[{i}]", finite_only) for i, v in enumerate(value)]
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        f = float(value)
        return f if math.isfinite(f) or not finite_only else None
    raise ValueError(f"`{where}` must hold numbers, strings, lists or dicts, got {type(value).__name__}")


def _fmt(value: Any) -> str:
    """HTML-escaped text of one table cell."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN (undefined)" if math.isnan(value) else ("&infin;" if value > 0 else "&minus;&infin;")
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, list):
        shown = ", ".join(_fmt(v) for v in value[:_MAX_LIST_CELL])
        more = f", ... ({len(value)} values)" if len(value) > _MAX_LIST_CELL else ""
        return f"[{shown}{more}]"
    if isinstance(value, dict):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | bool | int | float)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in value.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return rows
    return [(prefix or "value", value)]


def _table(value: Any) -> str:
    """An HTML table of one section's results (already JSON-able)."""
    if isinstance(value, dict) and value:
        subs = list(value.values())
        # {"before": {...}, "after": {...}}: one column per variant, one row per metric
        if all(isinstance(s, dict) and s and all(_is_scalar(x) for x in s.values()) for s in subs) and len(subs) > 1:
            cols = list(value)
            rows = list(dict.fromkeys(k for s in subs for k in s))
            if len(cols) > len(rows):  # many entries of few figures (e.g. one per image set): one row per entry
                head = "".join(f"<th>{html.escape(r)}</th>" for r in rows)
                body = "".join(f"<tr><th>{html.escape(c)}</th>" + "".join(f"<td>{_fmt(value[c].get(r))}</td>"
                                                                         for r in rows) + "</tr>" for c in cols)
                return f"<table><tr><th></th>{head}</tr>{body}</table>"
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join(
                f"<tr><th>{html.escape(r)}</th>" + "".join(f"<td>{_fmt(value[c].get(r))}</td>" for c in cols) + "</tr>"
                for r in rows)
            return f"<table><tr><th></th>{head}</tr>{body}</table>"
        # {"angle": [...], "accuracy": [...], ...}: one row per position
        lengths = {len(s) for s in subs if isinstance(s, list)}
        if all(isinstance(s, list) and all(_is_scalar(x) for x in s) for s in subs) and len(lengths) == 1:
            cols = list(value)
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{_fmt(value[c][i])}</td>" for c in cols) + "</tr>"
                           for i in range(lengths.pop()))
            return f"<table><tr>{head}</tr>{body}</table>"
    rows = _flatten(value)
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _figure_note(name: str) -> str:
    for keys, note in _FIGURE_NOTES:
        if any(k in name for k in keys):
            return note
    return ""


def _figure_html(name: str, png: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    note = _figure_note(name)
    caption = f"<b>{html.escape(name)}</b>" + (f": {html.escape(note)}" if note else "")
    return (f'<figure><img src="{uri}" alt="{html.escape(name, quote=True)}">'
            f"<figcaption>{caption}</figcaption></figure>")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
p.note { color: #444; background: #f6f8fa; border-left: 3px solid #4c72b0; padding: .5em .8em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: right; }
th { background: #fafafa; text-align: left; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; }
"""


def _render(title: str, metrics: dict[str, Any], figures: Mapping[str, bytes], intro: str | None) -> str:
    placed: set[str] = set()
    sections = []
    for key, value in metrics.items():
        note = SECTION_NOTES.get(key)
        heading = SECTION_TITLES.get(key, key)
        parts = [f'<section id="{html.escape(key, quote=True)}"><h2>{html.escape(heading)}</h2>']
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append(_table(value))
        for name, png in figures.items():
            if name not in placed and (name == key or name.startswith(key + "_")):
                parts.append(_figure_html(name, png))
                placed.add(name)
        parts.append("</section>")
        sections.append("".join(parts))
    rest = [n for n in figures if n not in placed]
    if rest:
        sections.append('<section id="figures"><h2>figures</h2>'
                        + "".join(_figure_html(n, figures[n]) for n in rest) + "</section>")
    intro_html = f"<p>{html.escape(intro)}</p>" if intro else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro_html}"
            "<p>Every number below was computed on held-out data by the <code>calibration</code> package and is "
            "also in <code>metrics.json</code> next to this file, where infinite and undefined (NaN) values are "
            "written as <code>null</code>; n/a marks a value that was not given. Each section starts with a "
            "short note on what its numbers mean and how to doubt them.</p>"
            + "".join(sections) + "</body></html>\n")


def write_report(out_dir: str | os.PathLike[str], metrics: Mapping[str, Any], figures: Mapping[str, bytes],
                 title: str = "snodevit calibration report", *, intro: str | None = None) -> Path:
    """Write ``report.html``, ``metrics.json`` and ``<name>.png`` for every figure into ``out_dir``.

    ``metrics`` is read, never recomputed: each top-level key becomes a section with a plain-language note
    (:data:`SECTION_NOTES` for the known keys ``calibration``, ``temperature``, ``conformal``, ``selective``,
    ``misclassification``, ``ood``, ``shift``) and a table. A dict of dicts (e.g. ``{"before": {...},
    "after": {...}}``) is shown with one column per entry; a dict of equal-length lists (e.g. the shift
    sweep) with one row per position. A figure named ``<section>`` or ``<section>_...`` is placed in that
    section, the others at the end. All text is HTML-escaped; PNGs are embedded as base64 data URIs.

    Args:
        out_dir: the output folder (created if missing).
        metrics: section name -> results (dicts, lists, numbers, strings, dataclasses, tensors).
        figures: figure name -> PNG bytes (names: letters, digits, ``_``, ``-``, ``.``; no path separators).
        title: the page title.
        intro: an optional first paragraph (e.g. which model and data set).

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: on a bad title, metric value, figure name or non-PNG figure data.
    """
    if not isinstance(title, str) or not title:
        raise ValueError(f"`title` must be a non-empty string, got {title!r}")
    if intro is not None and not isinstance(intro, str):
        raise ValueError(f"`intro` must be a string or None, got {type(intro).__name__}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"`metrics` must be a mapping of section name -> results, got {type(metrics).__name__}")
    if not isinstance(figures, Mapping):
        raise ValueError(f"`figures` must be a mapping of name -> PNG bytes, got {type(figures).__name__}")
    for name, png in figures.items():
        if not isinstance(name, str) or not _FIGURE_NAME.match(name) or ".." in name:
            raise ValueError(f"`figures` names must match {_FIGURE_NAME.pattern} (no path separators), got {name!r}")
        if not isinstance(png, bytes | bytearray) or not bytes(png[:8]) == PNG_SIGNATURE:
            raise ValueError(f"`figures[{name!r}]` must be PNG bytes (starting with the PNG signature)")
    clean = to_jsonable(metrics)
    shown = to_jsonable(metrics, finite_only=False)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        atomic_write_bytes(out / f"{name}.png", bytes(png))
    atomic_write_bytes(out / "metrics.json", (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    page = _render(title, shown, {k: bytes(v) for k, v in figures.items()}, intro)
    return atomic_write_bytes(out / "report.html", page.encode("utf-8"))
