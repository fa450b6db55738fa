"""Finishing a run: the partial file converted into CSV, JSON Lines or Parquet (in chunks), and the run's figures.

The output is written through :func:`calibration.files.atomic_path`, so OUT is either absent (or the old file)
or complete. The figures count every row, and when true labels are known they add the calibration metrics of
``calibration`` over the labelled rows; their probability vectors are packed in numpy blocks as they stream by.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration import accuracy, calibration_summary, conformal_coverage
from calibration.files import atomic_path
from snodevit.scoring.errors import write_error
from snodevit.scoring.partial import OutputFormat, OutputPlan
from snodevit.scoring.rows import PROBS_KEY, ROW_FIELDS

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 8192  # rows per Parquet row group / per conversion chunk / per packed block of labelled rows


def _partial_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        f.readline()  # header
        for line in f:
            yield json.loads(line)


def _csv_cell(name: str, value: Any) -> Any:
    if value is None:
        return ""
    if name in ("top_k", "prediction_set"):
        return json.dumps(value, separators=(",", ":"))
    return value


def _parquet_schema() -> Any:
    import pyarrow as pa  # optional and heavy: only Parquet outputs need it

    top = pa.struct([("label", pa.string()), ("class_index", pa.int64()), ("probability", pa.float64())])
    types = {"path": pa.string(), "label": pa.string(), "class_index": pa.int64(), "confidence": pa.float64(),
             "top_k": pa.list_(top), "uncertainty_total": pa.float64(), "uncertainty_aleatoric": pa.float64(),
             "uncertainty_epistemic": pa.float64(), "uncertainty_std": pa.float64(),
             "prediction_set": pa.list_(pa.string()), "alpha": pa.float64(), "decision": pa.string(),
             "reason_code": pa.string(), "reason": pa.string(), "ood_score": pa.float64(),
             "out_of_distribution": pa.bool_(), "seed": pa.int64(), "num_samples": pa.int64(),
             "true_label": pa.string(), "error": pa.string(), "error_detail": pa.string()}
    return pa.schema([(name, types[name]) for name in ROW_FIELDS])


class _Writer:
    """Streams rows into a file (the temporary file beside OUT) in one of the three formats."""

    def __init__(self, path: Path, fmt: OutputFormat) -> None:
        self.fmt = fmt
        self.closed = False
        self._chunk: list[dict[str, Any]] = []
        if fmt == "parquet":
            import pyarrow.parquet as pq  # optional and heavy: only Parquet outputs need it

            self._schema = _parquet_schema()
            self._pq = pq.ParquetWriter(path, self._schema)
        else:
            # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes
            self._f = open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
            if fmt == "csv":
                self._csv = csv.writer(self._f)
                self._csv.writerow(ROW_FIELDS)

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self._f.write(json.dumps({k: row[k] for k in ROW_FIELDS}, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow([_csv_cell(k, row[k]) for k in ROW_FIELDS])
        else:
            self._chunk.append({k: row[k] for k in ROW_FIELDS})
            if len(self._chunk) >= _CHUNK_ROWS:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa  # optional and heavy: only Parquet outputs need it

        if self._chunk:
            for r in self._chunk:  # Arrow strings must be valid UTF-8
                for k in ("path", "error_detail"):
                    if isinstance(r[k], str):
                        r[k] = r[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self._pq.write_table(pa.Table.from_pylist(self._chunk, schema=self._schema))
            self._chunk = []

    def close(self) -> None:
        """Write what is buffered and close; ``atomic_path`` then syncs the file to disk and moves it into place."""
        if self.closed:
            return
        self.closed = True
        if self.fmt == "parquet":
            try:
                self._flush_parquet()
            finally:
                self._pq.close()
        else:
            self._f.close()

    def abandon(self) -> None:
        """Close after a failure, which is the error that counts: a second one is only logged."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - already failing; atomic_path removes the temporary file
            logger.debug("closing the output after a failure failed too", exc_info=True)


@dataclass
class ScoreSummary:
    """Figures of a finished run (all its rows, including those of earlier, resumed sessions)."""

    output: str  # the file written
    format: OutputFormat  # csv, jsonl or parquet
    images: int  # rows in the output
    scored: int  # rows with an answer
    failed: int  # rows with an error
    errors: dict[str, int]  # error code -> rows
    decisions: dict[str, int]  # "accept" / "review" -> rows
    reasons: dict[str, int]  # reason code (accepted, low_confidence, out_of_distribution) -> rows
    labelled: int  # scored rows with a known true label (the metrics are over these)
    metrics: dict[str, float | int | None] | None  # ``calibration.calibration_summary`` plus set and selective figures
    resumed_rows: int = 0  # rows written by earlier sessions
    new_rows: int = 0  # rows written by this session
    elapsed_s: float = 0.0  # wall time of this session's scoring loop
    images_per_s: float = 0.0  # this session's rows per second of the scoring loop
    settings: dict[str, Any] = field(default_factory=dict)  # the run header

    @property
    def exit_code(self) -> int:
        """0 when every row was scored, 1 when some rows carry an error."""
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "format": self.format, "images": self.images, "scored": self.scored,
                "failed": self.failed, "errors": dict(self.errors), "decisions": dict(self.decisions),
                "reasons": dict(self.reasons),
                "labelled": self.labelled, "metrics": self.metrics, "resumed_rows": self.resumed_rows,
                "new_rows": self.new_rows, "elapsed_s": self.elapsed_s, "images_per_s": self.images_per_s,
                "settings": self.settings}


class _LabelledRows:
    """What the calibration metrics need from the labelled rows, packed in numpy blocks (not per-row objects).

    A million labelled 10-class rows take about 50 MB: float32 probabilities, int64 labels, bool sets and
    decisions.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.index = {n: i for i, n in enumerate(class_names)}
        self.num_classes = len(class_names)
        self.has_sets = True  # False as soon as one row has no prediction set (uncalibrated model)
        self._rows: list[tuple[list[float], int, list[str] | None, bool]] = []
        self._blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append((row[PROBS_KEY], self.index[row["true_label"]], row["prediction_set"],
                           row["decision"] == "accept"))
        self.count += 1
        if len(self._rows) >= _CHUNK_ROWS:
            self._pack()

    def _pack(self) -> None:
        if not self._rows:
            return
        probs = np.asarray([r[0] for r in self._rows], dtype=np.float32)  # (n, C)
        labels = np.asarray([r[1] for r in self._rows], dtype=np.int64)  # (n,)
        sets = np.zeros(probs.shape, dtype=bool)  # (n, C)
        for i, r in enumerate(self._rows):
            if r[2] is None:
                self.has_sets = False
            else:
                sets[i, [self.index[n] for n in r[2]]] = True
        accepted = np.asarray([r[3] for r in self._rows], dtype=bool)  # (n,)
        self._blocks.append((probs, labels, sets, accepted))
        self._rows = []

    def metrics(self) -> dict[str, float | int | None]:
        """``calibration.calibration_summary`` plus conformal set coverage/size and accuracy among accepted."""
        self._pack()
        p = torch.from_numpy(np.concatenate([b[0] for b in self._blocks]))  # (N, C) float32
        y = torch.from_numpy(np.concatenate([b[1] for b in self._blocks]))  # (N,)
        figures: dict[str, float | int | None] = dict(calibration_summary(p, y))
        if self.has_sets:
            sets = torch.from_numpy(np.concatenate([b[2] for b in self._blocks]))  # (N, C)
            figures["set_coverage"], figures["mean_set_size"] = conformal_coverage(sets, y)
        acc = torch.from_numpy(np.concatenate([b[3] for b in self._blocks]))  # (N,)
        figures["accepted"] = int(acc.sum())
        figures["accepted_fraction"] = float(acc.double().mean())
        figures["accepted_accuracy"] = accuracy(p[acc], y[acc]) if bool(acc.any()) else None
        return figures


class _Tally:
    """The counts of a run's rows as they stream into the output, and its labelled rows for the metrics."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.rows = self.scored = 0
        self.errors: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.labelled = _LabelledRows(class_names)

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if row["error"] is not None:
            self.errors[row["error"]] += 1
            return
        self.scored += 1
        self.decisions[row["decision"]] += 1
        self.reasons[row["reason_code"]] += 1
        if PROBS_KEY in row:
            self.labelled.add(row)

    def summary(self, plan: OutputPlan, settings: dict[str, Any]) -> ScoreSummary:
        metrics = self.labelled.metrics() if self.labelled.count else None
        return ScoreSummary(str(plan.out), plan.fmt, self.rows, self.scored, self.rows - self.scored,
                            dict(self.errors), dict(self.decisions), dict(self.reasons), self.labelled.count,
                            metrics, settings=settings)


def finalise(plan: OutputPlan, class_names: Sequence[str]) -> ScoreSummary:
    """Convert ``plan.partial`` into ``plan.out`` (atomically) and compute the run's figures; remove the partial.

    Raises:
        ValueError: the partial file holds a row that is not JSON.
        ScoreWriteError: OUT could not be written (a full disk, a read-only folder); the temporary file is removed
            and ``plan.partial`` kept whole, so ``--resume`` finishes the job once there is room.
    """
    with open(plan.partial, "rb") as f:
        settings = json.loads(f.readline())["settings"]
    tally = _Tally(class_names)
    try:
        with atomic_path(plan.out, make_parents=False) as tmp:
            writer = _Writer(tmp, plan.fmt)
            try:
                for row in _partial_rows(plan.partial):
                    tally.add(row)
                    writer.write(row)
            except BaseException:
                writer.abandon()
                raise
            writer.close()
    except OSError as err:
        raise write_error(err, plan.out, plan.partial) from None
    plan.partial.unlink()
    return tally.summary(plan, settings)
