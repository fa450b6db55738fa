"""Register trained models in the BentoML model store, and find them again.

A stored model is a plain copy of the model directory written by ``snodevit train`` (and updated by
``snodevit calibrate``), plus the ONNX graph when one is given::

    model.safetensors   weights
    config.json         SNodeViTConfig
    meta.json           class names, preprocessing, calibration, training figures
    model.onnx          optional: ``snodevit export`` of the same weights

so ``snodevit.inference.backends.open_model(stored_path, backend="torch" | "onnx")`` opens it like any model
directory.
The BentoML entry's metadata carries the headline figures (classes, weights hash, calibration), so
``bentoml models get snodevit-mnist:latest`` answers "which model is this?" without loading it.

BentoML reads ``BENTOML_HOME`` once per process; :func:`use_home` (or :func:`temporary_home`) switches an
already running process (tests, notebooks) to another store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import bentoml
from bentoml import Tag
from bentoml.exceptions import BentoMLException, NotFound

from export.metadata import read_onnx_metadata
from export.runtime import ONNX
from snodevit.checkpoint import CONFIG_FILE, META_FILE, WEIGHTS_FILE, CheckpointError, load_model, weights_hash
from snodevit.inference.backends import TORCH, LoadedModel
from snodevit.inference.fitted import Calibration

logger = logging.getLogger(__name__)

DEFAULT_NAME = "snodevit-mnist"
ONNX_FILE = "model.onnx"
# Nested calibration figures copied into the entry's metadata at most this deep / this many.
_MAX_FIGURES = 64
_MAX_DEPTH = 3


def _store_overrides(home: Path) -> list[tuple[Any, Any]]:
    # BentoML's internals, imported only when a process switches stores (they are not its public API, and load
    # its whole configuration container)
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for sub in ("", "models", "bentos", "envs", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return [(BentoMLContainer.bentoml_home, str(home)),
            (BentoMLContainer.model_store, ModelStore(str(home / "models"))),
            (BentoMLContainer.bento_store, BentoStore(str(home / "bentos"))),
            (BentoMLContainer.tmp_bento_store, BentoStore(str(home / "tmp")))]


def use_home(home: str | os.PathLike[str]) -> Path:
    """Point this process (and the subprocesses it starts) at the BentoML home ``home``, for good.

    Sets ``BENTOML_HOME`` and replaces BentoML's cached stores, so it also works after ``bentoml`` was imported
    and used. The folder and its ``models``/``bentos`` sub-folders are created.

    Returns:
        The home as an absolute path.
    """
    home = Path(home).absolute()
    for provider, value in _store_overrides(home):
        provider.set(value)
    os.environ["BENTOML_HOME"] = str(home)
    return home


@contextlib.contextmanager
def temporary_home(home: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`use_home` inside a ``with`` block; the previous home (variable and stores) is back afterwards."""
    home = Path(home).absolute()
    previous = os.environ.get("BENTOML_HOME")
    with contextlib.ExitStack() as stack:
        for provider, value in _store_overrides(home):
            stack.enter_context(provider.patch(value))
        os.environ["BENTOML_HOME"] = str(home)
        try:
            yield home
        finally:
            if previous is None:
                os.environ.pop("BENTOML_HOME", None)
            else:
                os.environ["BENTOML_HOME"] = previous


def _figures(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Flatten the scalar figures of a (nested) dict: ``{"a": {"b": 1.0}} -> [("a.b", 1.0)]``. Drops NaN/inf."""
    if isinstance(value, Mapping):
        if depth >= _MAX_DEPTH:
            return []
        out: list[tuple[str, Any]] = []
        for key in sorted(value, key=str):
            out.extend(_figures(value[key], f"{prefix}{key}.", depth + 1))
        return out
    key = prefix.rstrip(".")
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return [(key, value)]
    if isinstance(value, float):
        return [(key, value)] if math.isfinite(value) else []
    return []


def headline_metadata(meta: Mapping[str, Any], weights_sha256: str, has_onnx: bool) -> dict[str, Any]:
    """The metadata stored on the BentoML entry: identity, classes, preprocessing and calibration figures.

    Args:
        meta: the model's meta.json.
        weights_sha256: hash of the weights as loaded.
        has_onnx: whether an ONNX graph is stored alongside.

    Returns:
        A JSON-able dict; calibration figures (temperature, thresholds and any metrics ``snodevit calibrate``
        stored) are flattened to ``"calibration.<path>": value`` with at most 64 entries.
    """
    calibration = dict(meta.get("calibration") or {})
    if calibration:  # thresholds as Calibration writes them: an older file's float inf shows as "Infinity", not dropped
        written = Calibration.from_dict(calibration).to_dict()
        calibration |= {k: written[k] for k in ("conformal_thresholds", "decision_threshold") if k in calibration}
    figures = dict(_figures(calibration, "calibration."))
    if len(figures) > _MAX_FIGURES:
        logger.info("keeping the first %d of %d calibration figures in the store metadata", _MAX_FIGURES, len(figures))
        figures = dict(list(figures.items())[:_MAX_FIGURES])
    training = meta.get("training") or {}
    best = {k: training[k] for k in ("best_epoch", "best_val_accuracy", "best_val_nll") if k in training}
    return {
        "weights_sha256": weights_sha256,
        "version": weights_sha256[:12],
        "class_names": list(meta.get("class_names", [])),
        "num_classes": len(meta.get("class_names", [])),
        "preprocessing": dict(meta.get("preprocessing", {})),
        "data": str(meta.get("data", "")),
        "calibrated": bool(calibration),
        "backends": [TORCH, ONNX] if has_onnx else [TORCH],
        **{f"training.{k}": v for k, v in best.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        **figures,
    }


def _check_onnx(onnx_path: Path, weights_sha256: str, meta: Mapping[str, Any]) -> None:
    onnx_meta = read_onnx_metadata(onnx_path)
    if onnx_meta["weights_sha256"] != weights_sha256:
        raise CheckpointError(f"{onnx_path} was exported from other weights (sha256 "
                              f"{onnx_meta['weights_sha256'][:12]}) than the model directory ({weights_sha256[:12]}); "
                              "re-run `snodevit export`")
    want = meta.get("calibration")
    have = onnx_meta["calibration"] if onnx_meta["calibration"].is_fitted else None
    # Compared as Calibration: an older meta.json holds float inf where a new graph holds "Infinity".
    if want and have is not None and Calibration.from_dict(want) != have:
        raise CheckpointError(f"{onnx_path} carries a different calibration than meta.json (calibrated after "
                              "exporting?); re-run `snodevit export` so both backends give the same answers")
    if want and have is None:
        raise CheckpointError(f"{onnx_path} was exported before `snodevit calibrate`; re-run `snodevit export`")


def register_model(
    model_dir: str | os.PathLike[str],
    name: str = DEFAULT_NAME,
    onnx_path: str | os.PathLike[str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Tag:
    """Copy a trained model directory (and optionally its ONNX graph) into the BentoML model store.

    The weights are loaded once to check that they match config.json and that meta.json has what serving needs
    (class names, preprocessing); an ONNX graph must come from the same weights and calibration.

    Args:
        model_dir: a directory written by ``snodevit train`` (``model.safetensors``, ``config.json``,
            ``meta.json``).
        name: the store name; each call adds a new version of it, which becomes ``<name>:latest``.
        onnx_path: a ``.onnx`` file written by ``snodevit export`` from the same directory, stored as
            ``model.onnx``.
        labels: BentoML labels (string keys and values), e.g. ``{"stage": "demo"}``.

    Returns:
        The new entry's tag, e.g. ``snodevit-mnist:3xd2kcq6mwqzqn7k``.

    Raises:
        CheckpointError: the directory is not a complete, loadable model, or the ONNX graph does not match it.
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: labels that are not strings.
    """
    model_dir = Path(model_dir)
    model, meta = load_model(model_dir, map_location="cpu")
    missing = [k for k in ("class_names", "preprocessing") if k not in meta]
    if missing:
        raise CheckpointError(f"{model_dir / META_FILE} lacks {missing}; was it written by `snodevit train`?")
    sha = weights_hash(model)
    if meta.get("weights_sha256") not in (None, sha):
        raise CheckpointError(f"{model_dir / META_FILE} names weights {str(meta['weights_sha256'])[:12]} but "
                              f"{WEIGHTS_FILE} holds {sha[:12]}; the directory was changed after training")
    onnx = Path(onnx_path) if onnx_path is not None else None
    if onnx is not None:
        if not onnx.is_file():
            raise FileNotFoundError(f"ONNX graph {str(onnx)!r} does not exist (create it with `snodevit export`)")
        _check_onnx(onnx, sha, meta)
    label_dict = {"project": "snodevit", **dict(labels or {})}
    bad = {k: v for k, v in label_dict.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"labels must map strings to strings, got {bad}")
    metadata = headline_metadata(meta, sha, has_onnx=onnx is not None)
    with bentoml.models.create(name, labels=label_dict, metadata=metadata) as entry:
        target = Path(entry.path)
        for file in (WEIGHTS_FILE, CONFIG_FILE, META_FILE):
            shutil.copy2(model_dir / file, target / file)
        if onnx is not None:
            shutil.copy2(onnx, target / ONNX_FILE)
    logger.info("registered %s from %s%s", entry.tag, model_dir, f" with {onnx}" if onnx else "")
    return entry.tag


def resolve(tag_or_path: str | os.PathLike[str]) -> Path:
    """The directory of a model: an existing directory as given, else a store tag (``name`` or ``name:version``).

    Raises:
        LookupError: neither an existing directory nor a tag in the store; the message lists what the store has.
    """
    path = Path(tag_or_path)
    if path.is_dir():
        return path
    text = str(tag_or_path)
    try:
        return Path(bentoml.models.get(text).path)
    except (NotFound, BentoMLException, ValueError) as err:
        try:
            known = sorted({str(m.tag) for m in bentoml.models.list()})
        except BentoMLException:
            known = []
        hint = f"; the store has {known}" if known else "; the store is empty (run `python -m service.demo`)"
        raise LookupError(f"{text!r} is neither a model directory nor a model in the BentoML store "
                          f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): {err}{hint}") from None


def stored_metadata(tag: str) -> dict[str, Any]:
    """The metadata of a stored model (see :func:`headline_metadata`), JSON round-tripped to plain types."""
    return json.loads(json.dumps(bentoml.models.get(tag).info.metadata, default=str))


def check_served(loaded: LoadedModel, registered: Mapping[str, Any], *, name: str,
                 weights_sha256: str | None) -> None:
    """The model as opened is the one its store entry was registered as: same weights, calibration still there.

    Opening already refuses missing files and weights that do not parse (a truncated safetensors file); this
    catches what still loads: weights changed or damaged after registration (the hash the entry recorded, and the
    one meta.json names), and a calibration that went missing from meta.json (the service would otherwise answer
    with uncalibrated confidences and no prediction sets, and say nothing).

    Args:
        loaded: the opened model.
        registered: the entry's metadata (:func:`headline_metadata`, written by :func:`register_model`).
        name: the model's tag or path, for the message.
        weights_sha256: ``snodevit.checkpoint.weights_hash`` of the weights as loaded (torch); None for an ONNX
            graph, checked through the hash its metadata carries (``loaded.weights_sha256``).

    Raises:
        CheckpointError: naming what differs and what to do.
    """
    have = weights_sha256 or loaded.weights_sha256
    claims = {"the store entry": registered.get("weights_sha256"),
              META_FILE: loaded.meta.get("weights_sha256") if weights_sha256 else None}
    for where, want in claims.items():
        if want and want != have:
            raise CheckpointError(f"{name}: the weights hash to {have[:12]} but {where} records {str(want)[:12]}: "
                                  "the stored files were changed or damaged after registration; register the "
                                  "model again")
    if registered.get("calibrated") and not loaded.calibration.is_fitted:
        raise CheckpointError(f"{name}: registered with a calibration, but its {META_FILE} holds none (removed or "
                              "overwritten); run `snodevit calibrate` on the model and register it again")
