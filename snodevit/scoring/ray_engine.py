"""Batch scoring on Ray Data: ``snodevit score --engine ray``, the same rows as the local engine from a cluster.

The driver (the ``snodevit score`` process) lists the inputs (:func:`snodevit.scoring.inputs.expand_inputs`), skips
the images already in ``OUT.partial`` (``--resume``), and hands the rest to Ray Data as blocks of (index, path bytes,
label). ``map_batches`` runs :class:`ScoreActor`, a callable class that opens the model once per actor and turns
each batch into rows with the local engine's own steps: :class:`snodevit.scoring.files.ImageFiles` decodes (a bad
file becomes an error row), :func:`snodevit.scoring.run.batch_rows` calls ``LoadedModel.predict`` (the shared
``snodevit.inference.predictor.predict``) and builds the rows. Every image gets the run's ``--seed``, as locally, so
the rows equal the local engine's: the same labels, decisions and sets, and numbers within float32 rounding (only
the batch shapes differ). The rows stream back to the driver in input order (``preserve_order``), which appends them
to ``OUT.partial`` and converts it at the end (:func:`snodevit.scoring.output.finalise`): resume, the atomic output
and the run's figures are the local engine's.

Without ``address`` a local Ray starts (and stops at the end); with it the driver joins that cluster, whose nodes
must have snodevit installed and the model path and images readable at the same paths.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from snodevit.inference.backends import LoadedModel, open_model
from snodevit.scoring.errors import ScoreError
from snodevit.scoring.files import ImageFiles, collate
from snodevit.scoring.inputs import InputListing, PathTable
from snodevit.scoring.output import ScoreSummary, finalise
from snodevit.scoring.partial import OutputPlan, PartialFile
from snodevit.scoring.run import ScoreSettings, batch_rows, pending_indices, with_session

logger = logging.getLogger(__name__)

_BLOCKS_PER_ACTOR = 4  # input blocks per actor (at least): enough to keep every actor busy to the end


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs."""

    address: str | None = None  # a cluster to join ("auto", "HEAD:6379"); None starts a local Ray
    concurrency: int = 2  # model actors (each holds one copy of the model)
    num_cpus: float = 1.0  # CPUs reserved per actor; its torch and decoding threads are this, rounded down (>= 1)
    num_gpus: float = 0.0  # GPUs reserved per actor (fractions share a GPU); > 0 with --device auto runs on CUDA

    def __post_init__(self) -> None:
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ScoreError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        if not (math.isfinite(self.num_cpus) and self.num_cpus > 0):
            raise ScoreError(f"num_cpus must be a number > 0, got {self.num_cpus!r}")
        if not (math.isfinite(self.num_gpus) and self.num_gpus >= 0):
            raise ScoreError(f"num_gpus must be a number >= 0, got {self.num_gpus!r}")


@dataclass(frozen=True)
class ModelSpec:
    """How each actor opens the model: ``open_model``'s arguments."""

    path: str  # the model directory (or .onnx file), readable at this path on every node
    backend: str  # "torch" or "onnx"
    device: str  # as given (e.g. "auto"): each actor resolves it where it runs, on its own GPU if it has one
    precision: str  # resolved by the driver (``LoadedModel.precision``), so every actor computes alike


class ScoreActor:
    """The callable class of ``map_batches``: the model, opened once per actor, and one batch -> its rows.

    A batch holds ``index`` (int64), ``path`` (the path's bytes, any file name) and ``label`` (int32, -1 unknown);
    the answer holds ``index`` and ``row``, each row as the JSON text the partial file stores.
    """

    def __init__(self, model: ModelSpec, settings: ScoreSettings, class_names: Sequence[str], threads: int) -> None:
        torch.set_num_threads(threads)
        # decoding in as many threads as the actor has CPUs (PIL and torch let go of the GIL), so that an actor
        # given many CPUs and a GPU is not held up by one thread of PNG decoding (about 1.2 ms an image)
        self.decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snodevit-decode")
        self.settings = settings
        self.class_names = list(class_names)
        self.loaded: LoadedModel = open_model(model.path, model.backend, model.device, model.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [bytes(p).decode("utf-8", "surrogateescape") for p in batch["path"]]
        listing = InputListing(PathTable(paths), np.asarray(batch["label"], dtype=np.int32), self.class_names)
        positions = np.arange(len(paths), dtype=np.int64)
        s = self.settings
        files = ImageFiles(listing.paths, positions, self.loaded.preprocessing, s.max_bytes, s.max_pixels)
        decoded = collate(list(self.decoders.map(files.__getitem__, range(len(files)))))  # in order
        rows = batch_rows(self.loaded, listing, positions, decoded, s)
        text = np.array([json.dumps(r, separators=(",", ":")) for r in rows], dtype=object)
        return {"index": np.asarray(batch["index"], dtype=np.int64), "row": text}


@contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Join the cluster at ``address``, or start a local Ray; leave it at the end (a local one stops).

    A Ray already initialised in this process (a notebook, a test) is used as it is and left running.

    Raises:
        ScoreError: the cluster at ``address`` cannot be joined.
    """
    # Ray is imported where it is used: it adds about 0.6 s to every start of the CLI, whose other commands
    # and the local engine never need it.
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ScoreError(f"--address {address}: cannot join the Ray cluster ({err})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _block_rows(pending: int, options: RayOptions, batch_size: int) -> int:
    """Rows per input block: small enough for every actor to get several, at most eight batches."""
    return max(1, min(8 * batch_size, math.ceil(pending / (_BLOCKS_PER_ACTOR * options.concurrency))))


def _input_blocks(listing: InputListing, pending: np.ndarray, rows: int) -> list[pa.Table]:
    """The pending images as Arrow tables of (index, path bytes, label), ``rows`` each; paths as bytes, since a
    file name need not be valid UTF-8."""
    blocks = []
    for start in range(0, len(pending), rows):
        idx = pending[start:start + rows]
        paths = [listing.paths[int(i)].encode("utf-8", "surrogateescape") for i in idx]
        blocks.append(pa.table({"index": pa.array(idx, pa.int64()), "path": pa.array(paths, pa.binary()),
                                "label": pa.array(listing.labels[idx], pa.int32())}))
    return blocks


def _dataset(listing: InputListing, pending: np.ndarray, model: ModelSpec, settings: ScoreSettings,
             options: RayOptions) -> Any:
    """The Ray Dataset of the pending images' rows, in input order (lazy: nothing runs until it is read)."""
    import ray.data  # only when scoring on Ray (see ray_cluster)

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows land in the partial file in listing order
    context.enable_progress_bars = False  # the driver shows one bar over images, as the local engine does
    blocks = _input_blocks(listing, pending, _block_rows(len(pending), options, settings.batch_size))
    threads = max(1, int(options.num_cpus))
    return ray.data.from_arrow(blocks).map_batches(
        ScoreActor, fn_constructor_kwargs={"model": model, "settings": settings,
                                           "class_names": listing.class_names, "threads": threads},
        batch_size=settings.batch_size, batch_format="numpy", num_cpus=options.num_cpus,
        num_gpus=options.num_gpus, compute=ray.data.ActorPoolStrategy(size=options.concurrency))


def score_on_ray(model: ModelSpec, listing: InputListing, plan: OutputPlan, settings: ScoreSettings,
                 options: RayOptions, *, header: dict[str, Any], progress: bool = True) -> ScoreSummary:
    """Score every image of ``listing`` into ``plan.out`` on Ray Data; see the module docstring for the flow.

    Args:
        model: how the actors open the model (the driver has opened it already, for ``header``).
        listing / plan / settings / header: as :func:`snodevit.scoring.run.score_files` takes them.
        options: cluster address, actors and their resources.
        progress: show a tqdm bar (images/s and ETA) on stderr.

    Returns:
        The summary of the whole run (earlier sessions' rows included); ``elapsed_s`` counts from the start of
        the dataset's execution (actors starting and loading the model included), after Ray itself is up.

    Raises:
        ScoreError: the partial file belongs to other settings or is locked; the cluster cannot be joined.
        ray.exceptions.RayError: an actor failed beyond Ray's retries.
    """
    with PartialFile(plan.partial, header, plan.resume) as partial:
        pending = pending_indices(listing, partial.done)
        rows_before = partial.rows_before
        partial.done.clear()
        bar = tqdm(total=len(listing), initial=len(listing) - len(pending), unit="img", desc="score (ray)",
                   disable=not progress, dynamic_ncols=True, smoothing=0.05)
        new_rows = 0
        start = time.perf_counter()
        try:
            if len(pending):
                with ray_cluster(options.address):
                    start = time.perf_counter()
                    for out in _dataset(listing, pending, model, settings, options).iter_batches(batch_size=None):
                        partial.append(json.loads(text) for text in out["row"])
                        partial.flush()
                        new_rows += len(out["row"])
                        bar.update(len(out["row"]))
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        summary = finalise(plan, listing.class_names)
    return with_session(summary, rows_before, new_rows, elapsed)
