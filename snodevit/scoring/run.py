"""A scoring run: its settings, the header that binds a partial file to them, and :func:`score_files`, the loop.

Each batch of decoded images goes through ``LoadedModel.predict`` (the shared inference function: the Monte Carlo
samples are folded into one forward pass) and becomes rows through
:func:`snodevit.inference.records.prediction_records`, the function the service answers with; the rows are
appended to ``OUT.partial`` and flushed after every batch, and :func:`snodevit.scoring.output.finalise` turns the
partial file into the output at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from snodevit.data import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Preprocessing
from snodevit.inference.backends import LoadedModel
from snodevit.inference.params import DEFAULT_NUM_SAMPLES, NumSamples, check_alpha, check_num_samples, check_seed
from snodevit.inference.records import prediction_records
from snodevit.scoring.errors import ScoreError
from snodevit.scoring.files import Batch, ImageFiles, collate, worker_init
from snodevit.scoring.inputs import InputListing
from snodevit.scoring.output import ScoreSummary, finalise
from snodevit.scoring.partial import OutputPlan, PartialFile
from snodevit.scoring.rows import PROBS_KEY, error_row, record_row


@dataclass(frozen=True)
class ScoreSettings:
    """How a run scores; everything but ``batch_size`` and ``workers`` changes the numbers.

    The request parameters (``num_samples``, ``seed``, ``alpha``) are checked by
    :mod:`snodevit.inference.params`, the rules the service applies too.
    """

    num_samples: NumSamples = DEFAULT_NUM_SAMPLES  # S per image (the service's default), or "auto" (adaptive)
    seed: int = 0  # noise seed of every image: same image + seed -> same answer (as the service's ``seed``)
    top_k: int = 3  # classes listed in ``top_k``
    alpha: float | None = None  # conformal miscoverage; None: the smallest fitted alpha (``default_alpha``)
    batch_size: int = 64  # images per forward pass (times S samples, folded)
    workers: int = 2  # DataLoader decoding processes; 0 decodes in the main process
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files become ``too_large`` rows
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images become ``too_many_pixels`` rows

    def __post_init__(self) -> None:
        try:
            check_num_samples(self.num_samples)
            check_seed(self.seed)
            if self.alpha is not None:
                check_alpha(self.alpha)
        except ValueError as err:
            raise ScoreError(str(err)) from None
        for name in ("top_k", "batch_size", "max_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ScoreError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ScoreError(f"workers must be an integer >= 0, got {self.workers!r}")


def run_header(loaded: LoadedModel, settings: ScoreSettings, inputs: Sequence[str],
               labels_file: str | None) -> dict[str, Any]:
    """The settings a partial file is bound to; a resume must present the same ones."""
    return {"model_sha256": loaded.weights_sha256, "backend": loaded.backend_name, "precision": loaded.precision,
            "class_names": list(loaded.class_names), "num_samples": settings.num_samples, "seed": settings.seed,
            "top_k": settings.top_k, "alpha": settings.alpha, "max_bytes": settings.max_bytes,
            "max_pixels": settings.max_pixels, "inputs": list(inputs),
            "labels_file": None if labels_file is None else os.path.abspath(labels_file)}


def pending_indices(listing: InputListing, done: set[str]) -> np.ndarray:
    """(M,) int64 indices of the listing's images not yet in the partial file, in listing order (both engines)."""
    if not done:
        return np.arange(len(listing), dtype=np.int64)
    return np.fromiter((i for i, p in enumerate(listing.paths) if os.path.abspath(p) not in done), dtype=np.int64)


def _loader(listing: InputListing, pending: np.ndarray, prep: Preprocessing,
            settings: ScoreSettings) -> DataLoader[Batch]:
    """Batches of the pending images, decoded in up to ``settings.workers`` processes (no more than batches)."""
    dataset = ImageFiles(listing.paths, pending, prep, settings.max_bytes, settings.max_pixels)
    workers = min(settings.workers, max(1, len(pending) // settings.batch_size)) if len(pending) else 0
    return DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, worker_init_fn=worker_init if workers else None,
                      prefetch_factor=2 if workers else None)


def batch_rows(loaded: LoadedModel, listing: InputListing, pending: np.ndarray, batch: Batch,
                settings: ScoreSettings) -> list[dict[str, Any]]:
    """The rows of one batch, in order: the answers of the images that decoded, the errors of the others.

    Both engines build their rows here: the local loop below and the Ray actors (``snodevit.scoring.ray_engine``).

    A labelled row also carries its probability vector (``PROBS_KEY``) for the run's calibration metrics.
    """
    names = listing.class_names
    records: list[dict[str, Any]] = []
    probs: torch.Tensor | None = None
    if batch.images is not None:
        pred = loaded.predict(batch.images, num_samples=settings.num_samples, seed=settings.seed,
                              alpha=settings.alpha)
        records = prediction_records(pred, names, settings.top_k)
        probs = pred.summary.probs.cpu()  # (G, C)
    rows = []
    good_at = {k: g for g, k in enumerate(batch.good)}
    for k, pos in enumerate(batch.positions):
        idx = int(pending[pos])
        path = listing.paths[idx]
        label = int(listing.labels[idx])
        true_label = names[label] if label >= 0 else None
        if k in batch.errors:
            rows.append(error_row(path, *batch.errors[k], true_label))
            continue
        g = good_at[k]
        row = record_row(path, records[g], true_label)
        if label >= 0:
            row[PROBS_KEY] = probs[g].tolist()  # type: ignore[index]
        rows.append(row)
    return rows


def score_files(loaded: LoadedModel, listing: InputListing, plan: OutputPlan, settings: ScoreSettings, *,
                header: dict[str, Any], progress: bool = True,
                on_batch: Callable[[int], None] | None = None) -> ScoreSummary:
    """Score every image of ``listing`` into ``plan.out``; see the package docstring for the data flow.

    Args:
        loaded: the model (``snodevit.inference.backends.open_model``).
        listing: the images (:func:`snodevit.scoring.inputs.expand_inputs`).
        plan: the output (:func:`snodevit.scoring.partial.plan_output`).
        settings: samples, seed, batch size, workers, caps.
        header: the run's settings (:func:`run_header`), stored in / checked against the partial file.
        progress: show a tqdm bar (images/s and ETA) on stderr.
        on_batch: called with the number of batches written so far, after each batch is flushed.

    Returns:
        The summary of the whole run (earlier sessions' rows included).

    Raises:
        ScoreError: the partial file belongs to other settings, is corrupt, or is locked by another run.
        KeyboardInterrupt: passed through; the partial file keeps every finished batch for ``--resume``.
    """
    with PartialFile(plan.partial, header, plan.resume) as partial:
        pending = pending_indices(listing, partial.done)
        rows_before = partial.rows_before
        partial.done.clear()  # not needed any more
        loader = _loader(listing, pending, loaded.preprocessing, settings)
        bar = tqdm(total=len(listing), initial=len(listing) - len(pending), unit="img", desc="score",
                   disable=not progress, dynamic_ncols=True, smoothing=0.05)
        start = time.perf_counter()
        new_rows = 0
        try:
            for n_batch, batch in enumerate(loader, start=1):
                rows = batch_rows(loaded, listing, pending, batch, settings)
                partial.append(rows)
                partial.flush()
                new_rows += len(rows)
                bar.update(len(rows))
                if on_batch is not None:
                    on_batch(n_batch)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        summary = finalise(plan, listing.class_names)
    return with_session(summary, rows_before, new_rows, elapsed)


def with_session(summary: ScoreSummary, rows_before: int, new_rows: int, elapsed: float) -> ScoreSummary:
    """``summary`` with this session's figures: rows from earlier sessions, new rows, wall time and rate."""
    summary.resumed_rows = rows_before
    summary.new_rows = new_rows
    summary.elapsed_s = elapsed
    summary.images_per_s = new_rows / elapsed if elapsed > 0 else 0.0
    return summary
