"""Streaming batch scoring: image files in, one answer row per image out, resumable and fault tolerant.

The engine behind ``snodevit score``. Data flows in one direction with bounded memory:

1. :func:`expand_inputs` lists the images (files, folders walked recursively, glob patterns, list files) into a
   packed :class:`PathTable` (paths, never pixels) with an optional true label per image, from class sub-folders
   (an image folder) or a ``path,label`` CSV.
2. :class:`ImageFiles` decodes and preprocesses one file in a DataLoader worker with the same
   :func:`snodevit.images.load_image_file` + :func:`snodevit.images.preprocess` as the HTTP service; a file that
   cannot be read becomes an error item instead of an exception.
3. :func:`score_files` sends each batch through ``LoadedModel.predict`` (the shared inference function: the
   Monte Carlo samples are folded into one forward pass) and turns it into rows with
   :func:`snodevit.records.prediction_records`, the function the service answers with; the rows are appended to
   ``OUT.partial`` and flushed after every batch.
4. :func:`finalise` converts the partial file into CSV, JSONL or Parquet (in chunks), computes the run's figures
   (through ``calibration``'s metrics when labels are known) and moves the result into place with ``os.replace``.

Resume. ``OUT.partial`` is JSON Lines: a header line holding every setting that changes the numbers (model
weights, backend, samples, seed, top-k, alpha, image caps, inputs), then one row per line. A run killed at any
point leaves complete lines plus at most one torn last line; resuming truncates the torn line, reads the set of
finished paths back and scores only the rest, so no row is lost or written twice. The header must match the
resumed command, otherwise resuming is refused. The partial file is locked (``flock``) while a run writes it.

Memory. Paths are packed into two numpy arrays (no per-path Python objects that forked workers would copy on
write); rows are never held beyond one batch, and the output is converted in chunks. What grows with the run: the
set of finished paths on resume, and for labelled images their probability vectors (N_labelled x classes
float32), which the calibration metrics need at the end.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from snodevit.data import IMAGE_EXTENSIONS
from snodevit.data import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, Preprocessing, load_image_file,
                                  preprocess, undecodable)
from snodevit.inference.params import AUTO
from snodevit.inference.backends import LoadedModel
from snodevit.inference.records import prediction_records

logger = logging.getLogger(__name__)

OutputFormat = Literal["csv", "jsonl", "parquet"]
#: Output file name endings and the format each one selects.
OUTPUT_FORMATS: dict[str, OutputFormat] = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
#: Columns of every output, in order. ``uncertainty_*`` are the ``uncertainty`` dict of ``prediction_records``.
ROW_FIELDS: tuple[str, ...] = (
    "path", "label", "class_index", "confidence", "top_k", "uncertainty_total", "uncertainty_aleatoric",
    "uncertainty_epistemic", "uncertainty_std", "prediction_set", "alpha", "decision", "reason_code", "reason",
    "ood_score", "out_of_distribution", "seed", "num_samples", "true_label", "error", "error_detail",
)
PARTIAL_SUFFIX = ".partial"
_PARTIAL_VERSION = 2  # 2: rows carry the out-of-distribution gate (reason_code, ood_score, ...)
_PROBS_KEY = "_probs"  # internal field of labelled rows in the partial file, dropped from the output
_CHUNK_ROWS = 8192  # rows per Parquet row group / per conversion chunk
_GLOB_CHARS = frozenset("*?[")


class ScoreError(ValueError):
    """Unusable arguments or state (no inputs, bad output path, mismatched resume); the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


class PathTable:
    """An immutable list of paths packed into one byte buffer and an offset array.

    A list of a million ``str`` objects would be copied page by page into every forked DataLoader worker as
    the workers touch reference counts; two numpy arrays are shared for good.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        buf = bytearray()
        offsets = [0]
        for p in paths:
            buf += p.encode("utf-8", "surrogateescape")
            offsets.append(len(buf))
        self._data = np.frombuffer(bytes(buf), dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)  # (N + 1,)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._data[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass
class InputListing:
    """The images of a run, in scoring order."""

    paths: PathTable  # the path of each image as it appears in the output's ``path`` column
    labels: np.ndarray  # (N,) int32 index into ``class_names`` of the true class, -1 where unknown
    class_names: list[str]  # the model's classes
    warnings: list[str] = field(default_factory=list)  # inputs that matched nothing, and the like
    labelled_folders: list[str] = field(default_factory=list)  # folder inputs read as image folders

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())


def _is_list_file(arg: str) -> bool:
    return arg.startswith("@") or (arg.lower().endswith(".txt") and os.path.isfile(arg))


def _walk_images(top: str) -> Iterator[str]:
    """Image files under ``top`` in sorted order; hidden files and folders skipped, folder links not followed."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.normpath(os.path.join(dirpath, name))


def _folder_classes(top: str, class_names: Sequence[str]) -> bool:
    """True when ``top`` is an image folder of this model: it has sub-folders and all of them are class names."""
    try:
        subdirs = [e.name for e in os.scandir(top) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return False
    return bool(subdirs) and set(subdirs) <= set(class_names)


def _read_list_file(path: str) -> Iterator[str]:
    """Paths listed one per line; blank lines and ``#`` comments skipped; relative to the list file's folder."""
    base = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield os.path.normpath(os.path.join(base, line))
    except OSError as err:
        raise ScoreError(f"cannot read the list file {path}: {err.strerror or err}") from None


def read_labels_file(path: str | os.PathLike[str], class_names: Sequence[str]) -> dict[str, int]:
    """Read a ``path,label`` CSV into {absolute path: class index}.

    Relative paths are relative to the CSV's folder. A first row ``path,label`` is a header and skipped. Labels
    are class names of the model.

    Raises:
        ScoreError: the file cannot be read, a row does not have two fields, a label is not a class name, or a
            path is given two different labels.
    """
    path = os.fspath(path)
    base = os.path.dirname(path)
    index = {name: i for i, name in enumerate(class_names)}
    out: dict[str, int] = {}
    unknown: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 2:
                    raise ScoreError(f"{path}:{lineno}: expected two fields 'path,label', got {len(row)}")
                p, label = row[0].strip(), row[1].strip()
                if lineno == 1 and (p.lower(), label.lower()) == ("path", "label"):
                    continue
                if label not in index:
                    unknown.add(label)
                    continue
                key = os.path.abspath(os.path.join(base, p))
                if out.get(key, index[label]) != index[label]:
                    raise ScoreError(f"{path}:{lineno}: {p} is labelled twice, differently")
                out[key] = index[label]
    except OSError as err:
        raise ScoreError(f"cannot read the labels file {path}: {err.strerror or err}") from None
    if unknown:
        raise ScoreError(f"{path}: labels {sorted(unknown)[:10]} are not classes of the model; its classes are "
                         f"{list(class_names)[:20]}")
    return out


def expand_inputs(inputs: Sequence[str], class_names: Sequence[str],
                  labels: dict[str, int] | None = None) -> InputListing:
    """List the images named by the command line's INPUT arguments, in a deterministic order.

    Forms (tried in this order):

    * ``@FILE``, or an existing ``*.txt`` file: a list of image paths, one per line, relative to the list
      file's folder (blank lines and ``#`` comments skipped). A listed path that is missing becomes an error row.
    * a folder: every image file below it (by extension, see ``snodevit.data.IMAGE_EXTENSIONS``; hidden files
      and folders skipped; folder symlinks not followed), sorted. When every sub-folder is named after a class
      of the model it is an image folder and each image's class folder is its true label.
    * an existing file: that file, whatever its extension.
    * a pattern with ``*``, ``?`` or ``[`` (``**`` recurses): the matching files, and the images below matching
      folders.

    A path that appears twice is scored once. ``labels`` (absolute path -> class index, from
    :func:`read_labels_file`) takes precedence over folder labels.

    Raises:
        ScoreError: a named file, folder or list file does not exist, or nothing matched at all.
    """
    names = list(class_names)
    class_index = {n: i for i, n in enumerate(names)}
    seen: set[str] = set()
    paths: list[str] = []
    label_list: list[int] = []
    warnings: list[str] = []
    labelled_folders: list[str] = []

    def add(path: str, label: int) -> None:
        key = os.path.abspath(path)
        if key in seen:
            return
        seen.add(key)
        if labels is not None and key in labels:
            label = labels[key]
        paths.append(path)
        label_list.append(label)

    def add_folder(top: str) -> int:
        before = len(paths)
        if _folder_classes(top, names):
            labelled_folders.append(top)
            for p in _walk_images(top):
                first = os.path.relpath(p, top).split(os.sep, 1)[0]
                add(p, class_index.get(first, -1))
        else:
            for p in _walk_images(top):
                add(p, -1)
        return len(paths) - before

    for arg in inputs:
        before = len(paths)
        if _is_list_file(arg):
            list_path = arg[1:] if arg.startswith("@") else arg
            if not os.path.isfile(list_path):
                raise ScoreError(f"list file {list_path!r} does not exist")
            for p in _read_list_file(list_path):
                add(p, -1)
        elif os.path.isdir(arg):
            add_folder(arg)
        elif os.path.exists(arg):
            add(os.path.normpath(arg), -1)
        elif _GLOB_CHARS & set(arg):
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    add_folder(match)
                else:
                    add(os.path.normpath(match), -1)
        else:
            raise ScoreError(f"input {arg!r} does not exist (give image files, folders, glob patterns or @list.txt)")
        if len(paths) == before:
            warnings.append(f"input {arg!r} matched no (new) image files")
    if not paths:
        raise ScoreError(f"no input images matched {list(inputs)}; folders are searched recursively for files "
                         f"ending in {sorted(IMAGE_EXTENSIONS)}")
    table = PathTable(paths)
    label_arr = np.asarray(label_list, dtype=np.int32)
    del paths, label_list, seen
    return InputListing(table, label_arr, names, warnings, labelled_folders)


# ---------------------------------------------------------------------------------------------------------------
# Decoding in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """A collated batch: the images that decoded, and an (error, detail) pair for those that did not."""

    positions: list[int]  # (B,) positions into the pending index array, in order
    images: torch.Tensor | None  # (G, C, H, W) preprocessed images of the G good items, None when G == 0
    good: list[int]  # (G,) offsets into ``positions`` of the images
    errors: dict[int, tuple[str, str]]  # offset into ``positions`` -> (error code, detail)


class ImageFiles(Dataset[tuple[int, torch.Tensor | None, str | None, str | None]]):
    """Decode + preprocess the files ``paths[indices[i]]``; a file that fails is returned as an error.

    Args:
        paths: all paths of the run.
        indices: (M,) int64 indices into ``paths`` still to score.
        prep: the model's preprocessing.
        max_bytes / max_pixels: caps of :func:`snodevit.images.load_image_file`.
    """

    def __init__(self, paths: PathTable, indices: np.ndarray, prep: Preprocessing, max_bytes: int,
                 max_pixels: int) -> None:
        self.paths = paths
        self.indices = indices
        self.prep = prep
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        path = self.paths[int(self.indices[i])]
        try:
            image = load_image_file(path, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            return i, preprocess(image, self.prep), None, None
        except ImageError as err:
            return i, None, err.error, err.detail
        except Exception as err:  # noqa: BLE001 - one hostile file must not end a million-image run
            logger.debug("unexpected failure decoding %s", path, exc_info=True)
            refused = undecodable(err, path)
            return i, None, refused.error, refused.detail


def _collate(items: list[tuple[int, torch.Tensor | None, str | None, str | None]]) -> _Batch:
    good = [k for k, it in enumerate(items) if it[1] is not None]
    images = torch.stack([items[k][1] for k in good]) if good else None  # type: ignore[misc]  # (G, C, H, W)
    errors = {k: (str(it[2]), str(it[3])) for k, it in enumerate(items) if it[1] is None}
    return _Batch([it[0] for it in items], images, good, errors)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-file; leave the cores to the model


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def record_row(path: str, record: dict[str, Any], true_label: str | None) -> dict[str, Any]:
    """One output row from one ``prediction_records`` dict: the same numbers, ``uncertainty`` flattened."""
    u = record["uncertainty"]
    ood = record["ood"]
    return {"path": path, "label": record["label"], "class_index": record["class_index"],
            "confidence": record["confidence"], "top_k": record["top_k"], "uncertainty_total": u["total"],
            "uncertainty_aleatoric": u["aleatoric"], "uncertainty_epistemic": u["epistemic"],
            "uncertainty_std": u["std"], "prediction_set": record["prediction_set"], "alpha": record["alpha"],
            "decision": record["decision"], "reason_code": record["reason_code"], "reason": record["reason"],
            "ood_score": None if ood is None else ood["score"],
            "out_of_distribution": None if ood is None else ood["out_of_distribution"], "seed": record["seed"],
            "num_samples": record["num_samples"], "true_label": true_label, "error": None, "error_detail": None}


def error_row(path: str, error: str, detail: str, true_label: str | None) -> dict[str, Any]:
    """The row of an image that could not be scored: every answer field empty, ``error`` set."""
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(path=path, true_label=true_label, error=error, error_detail=detail)
    return row


# ---------------------------------------------------------------------------------------------------------------
# Settings, output plan, partial file
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSettings:
    """How a run scores; everything but ``batch_size`` and ``workers`` changes the numbers."""

    num_samples: int | Literal["auto"] = 8  # S Monte Carlo samples per image, or "auto" (adaptive, at most 32)
    seed: int = 0  # noise seed of every image: same image + seed -> same answer (as the service's ``seed``)
    top_k: int = 3  # classes listed in ``top_k``
    alpha: float | None = None  # conformal miscoverage; None: the smallest fitted alpha
    batch_size: int = 64  # images per forward pass (times S samples, folded)
    workers: int = 2  # DataLoader decoding processes; 0 decodes in the main process
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files become ``too_large`` rows
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images become ``too_many_pixels`` rows

    def __post_init__(self) -> None:
        if self.num_samples != AUTO and (not isinstance(self.num_samples, int) or self.num_samples < 1):
            raise ScoreError(f"num_samples must be an integer >= 1 or 'auto', got {self.num_samples!r}")
        for name in ("top_k", "batch_size", "max_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ScoreError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ScoreError(f"workers must be an integer >= 0, got {self.workers!r}")
        if not 0 <= self.seed <= 2**63 - 1:
            raise ScoreError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise ScoreError(f"alpha must be in (0, 1), got {self.alpha}")


@dataclass(frozen=True)
class OutputPlan:
    """Where a run writes and whether it continues an earlier one."""

    out: Path  # the final file
    fmt: OutputFormat  # from the file name ending
    partial: Path  # ``OUT.partial``: the resumable JSON Lines stream
    resume: bool  # True: continue ``partial``; False: start a new one


def plan_output(out: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> OutputPlan:
    """Check the output path before any work is done.

    Rules: the name must end in .csv, .jsonl or .parquet and its folder must exist. With ``resume``, an existing
    ``OUT.partial`` is continued (a missing one starts afresh); an existing OUT with no partial file means that
    run already finished. With ``overwrite``, an existing OUT and partial file are replaced. With neither, an
    existing OUT or partial file is an error.

    Raises:
        ScoreError: as above.
    """
    if resume and overwrite:
        raise ScoreError("--resume and --overwrite contradict each other; pick one")
    path = Path(out)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ScoreError(f"cannot tell the output format of {str(path)!r}: the name must end in "
                         f"{', '.join(OUTPUT_FORMATS)}")
    if path.is_dir():
        raise ScoreError(f"{path} is a folder; give a file name ending in {', '.join(OUTPUT_FORMATS)}")
    if not path.parent.is_dir():
        raise ScoreError(f"the output folder {path.parent} does not exist")
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if overwrite:
        return OutputPlan(path, fmt, partial, resume=False)
    if resume:
        if partial.exists():
            return OutputPlan(path, fmt, partial, resume=True)
        if path.exists():
            raise ScoreError(f"{path} is complete (there is no {partial.name} to resume); "
                             "pass --overwrite to score again")
        return OutputPlan(path, fmt, partial, resume=False)
    if partial.exists():
        raise ScoreError(f"{partial} holds an unfinished run; pass --resume to continue it or --overwrite to "
                         "start again")
    if path.exists():
        raise ScoreError(f"{path} exists; pass --overwrite to replace it")
    return OutputPlan(path, fmt, partial, resume=False)


def run_header(loaded: LoadedModel, settings: ScoreSettings, inputs: Sequence[str],
               labels_file: str | None) -> dict[str, Any]:
    """The settings a partial file is bound to; a resume must present the same ones."""
    return {"model_sha256": loaded.weights_sha256, "backend": loaded.backend_name, "precision": loaded.precision,
            "class_names": list(loaded.class_names), "num_samples": settings.num_samples, "seed": settings.seed,
            "top_k": settings.top_k, "alpha": settings.alpha, "max_bytes": settings.max_bytes,
            "max_pixels": settings.max_pixels, "inputs": list(inputs),
            "labels_file": None if labels_file is None else os.path.abspath(labels_file)}


class PartialFile:
    """``OUT.partial``: a locked, append-only JSON Lines stream with a header line.

    Use as a context manager. ``done`` holds the absolute paths already scored (read back on resume).
    """

    def __init__(self, path: Path, header: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.header = header
        self.done: set[str] = set()
        self.rows_before = 0
        self._f: IO[bytes] = open(path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise ScoreError(f"another `snodevit score` is writing {path}; wait for it or stop it") from None
        try:
            if resume and self._load():
                return
            self._f.seek(0)
            self._f.truncate()
            self._write_line({"snodevit_score_partial": _PARTIAL_VERSION, "cwd": os.getcwd(), "settings": header})
            self.flush()
        except BaseException:
            self.close()
            raise

    def _write_line(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def _load(self) -> bool:
        """Read an existing partial file; False when it holds not even a complete header (start afresh)."""
        self._f.seek(0)
        first = self._f.readline()
        if not first.endswith(b"\n"):
            return False
        try:
            meta = json.loads(first)
            version, cwd, settings = meta["snodevit_score_partial"], meta["cwd"], meta["settings"]
        except (ValueError, KeyError, TypeError):
            raise ScoreError(f"{self.path} is not a partial file of `snodevit score`; remove it or pass "
                             "--overwrite") from None
        if version != _PARTIAL_VERSION:
            raise ScoreError(f"{self.path} was written by another version of `snodevit score`; pass --overwrite")
        if cwd != os.getcwd():  # relative inputs and row paths would name other files
            raise ScoreError(f"cannot resume {self.path} from {os.getcwd()}: resume from {cwd}, where it started")
        diff = sorted(k for k in set(settings) | set(self.header) if settings.get(k) != self.header.get(k))
        if diff:
            was = ", ".join(f"{k}={settings.get(k)!r}" for k in diff if k != "class_names")
            now = ", ".join(f"{k}={self.header.get(k)!r}" for k in diff if k != "class_names")
            raise ScoreError(f"cannot resume {self.path}: it was started with other settings ({', '.join(diff)}: "
                             f"was {was or 'other classes'}; now {now or 'other classes'}). Resume with the same "
                             "command, or pass --overwrite to start again")
        offset = len(first)
        lineno = 1
        while True:
            line = self._f.readline()
            if not line:
                break
            lineno += 1
            if not line.endswith(b"\n"):  # torn by a kill mid-write: that image is scored again
                logger.info("dropping a torn last line of %s", self.path)
                self._f.truncate(offset)
                break
            try:
                row_path = json.loads(line)["path"]
            except (ValueError, KeyError, TypeError):
                raise ScoreError(f"{self.path}:{lineno} is corrupt; pass --overwrite to start again") from None
            self.done.add(os.path.abspath(row_path))
            self.rows_before += 1
            offset += len(line)
        self._f.seek(0, os.SEEK_END)
        return True

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows (one JSON line each) in one write.

        :meth:`flush` then hands them to the OS: they survive a killed process, though not a power cut.
        """
        self._f.write(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Finalisation: partial stream -> CSV / JSONL / Parquet, and the run's figures
# ---------------------------------------------------------------------------------------------------------------


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
    import pyarrow as pa

    top = pa.struct([("label", pa.string()), ("class_index", pa.int64()), ("probability", pa.float64())])
    types = {"path": pa.string(), "label": pa.string(), "class_index": pa.int64(), "confidence": pa.float64(),
             "top_k": pa.list_(top), "uncertainty_total": pa.float64(), "uncertainty_aleatoric": pa.float64(),
             "uncertainty_epistemic": pa.float64(), "uncertainty_std": pa.float64(),
             "prediction_set": pa.list_(pa.string()), "alpha": pa.float64(), "decision": pa.string(),
             "reason_code": pa.string(), "reason": pa.string(), "ood_score": pa.float64(),
             "out_of_distribution": pa.bool_(), "seed": pa.int64(), "num_samples": pa.int64(), "true_label": pa.string(),
             "error": pa.string(), "error_detail": pa.string()}
    return pa.schema([(name, types[name]) for name in ROW_FIELDS])


class _Writer:
    """Streams rows into a temporary file next to OUT in one of the three formats."""

    def __init__(self, tmp: Path, fmt: OutputFormat) -> None:
        self.fmt = fmt
        self.closed = False
        self._chunk: list[dict[str, Any]] = []
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._schema = _parquet_schema()
            self._pq = pq.ParquetWriter(tmp, self._schema)
        else:
            # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes
            self._f = open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
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
        import pyarrow as pa

        if self._chunk:
            for r in self._chunk:  # Arrow strings must be valid UTF-8
                for k in ("path", "error_detail"):
                    if isinstance(r[k], str):
                        r[k] = r[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self._pq.write_table(pa.Table.from_pylist(self._chunk, schema=self._schema))
            self._chunk = []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fmt == "parquet":
            try:
                self._flush_parquet()
            finally:
                self._pq.close()
        else:
            with self._f:
                self._f.flush()
                os.fsync(self._f.fileno())


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
        self._rows.append((row[_PROBS_KEY], self.index[row["true_label"]], row["prediction_set"],
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
        from calibration import accuracy, calibration_summary, conformal_coverage

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


def finalise(plan: OutputPlan, class_names: Sequence[str]) -> ScoreSummary:
    """Convert ``plan.partial`` into ``plan.out`` (atomically) and compute the run's figures; remove the partial.

    Raises:
        ValueError: the partial file holds a row that is not JSON.
    """
    tmp = plan.out.with_name(f".{plan.out.name}.{os.getpid()}.tmp")
    errors: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    rows = scored = 0
    labelled = _LabelledRows(class_names)
    writer = _Writer(tmp, plan.fmt)
    try:
        with open(plan.partial, "rb") as f:
            settings = json.loads(f.readline())["settings"]
        for row in _partial_rows(plan.partial):
            rows += 1
            if row["error"] is not None:
                errors[row["error"]] += 1
            else:
                scored += 1
                decisions[row["decision"]] += 1
                reasons[row["reason_code"]] += 1
                if _PROBS_KEY in row:
                    labelled.add(row)
            writer.write(row)
        writer.close()
        os.replace(tmp, plan.out)
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - already failing; the temporary file is removed below
            logger.debug("closing %s after a failure failed too", tmp, exc_info=True)
        tmp.unlink(missing_ok=True)
        raise
    plan.partial.unlink()
    metrics = labelled.metrics() if labelled.count else None
    return ScoreSummary(str(plan.out), plan.fmt, rows, scored, rows - scored, dict(errors), dict(decisions),
                        dict(reasons),
                        labelled.count, metrics, settings=settings)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def score_files(loaded: LoadedModel, listing: InputListing, plan: OutputPlan, settings: ScoreSettings, *,
                header: dict[str, Any], progress: bool = True,
                on_batch: Callable[[int], None] | None = None) -> ScoreSummary:
    """Score every image of ``listing`` into ``plan.out``; see the module docstring for the data flow.

    Args:
        loaded: the model (``snodevit.loading.open_model``).
        listing: the images (:func:`expand_inputs`).
        plan: the output (:func:`plan_output`).
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
    from tqdm.auto import tqdm

    names = listing.class_names
    with PartialFile(plan.partial, header, plan.resume) as partial:
        if partial.done:
            pending = np.fromiter((i for i, p in enumerate(listing.paths) if os.path.abspath(p) not in partial.done),
                                  dtype=np.int64)
        else:
            pending = np.arange(len(listing), dtype=np.int64)
        rows_before = partial.rows_before
        partial.done.clear()  # not needed any more
        dataset = ImageFiles(listing.paths, pending, loaded.preprocessing, settings.max_bytes, settings.max_pixels)
        workers = min(settings.workers, max(1, len(pending) // settings.batch_size)) if len(pending) else 0
        loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_collate, worker_init_fn=_worker_init if workers else None,
                            prefetch_factor=2 if workers else None)
        bar = tqdm(total=len(listing), initial=len(listing) - len(pending), unit="img", desc="score",
                   disable=not progress, dynamic_ncols=True, smoothing=0.05)
        start = time.perf_counter()
        new_rows = 0
        try:
            for n_batch, batch in enumerate(loader, start=1):
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
                        row[_PROBS_KEY] = probs[g].tolist()  # type: ignore[index]
                    rows.append(row)
                partial.append(rows)
                partial.flush()
                new_rows += len(rows)
                bar.update(len(rows))
                if on_batch is not None:
                    on_batch(n_batch)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        summary = finalise(plan, names)
    summary.resumed_rows = rows_before
    summary.new_rows = new_rows
    summary.elapsed_s = elapsed
    summary.images_per_s = new_rows / elapsed if elapsed > 0 else 0.0
    return summary
