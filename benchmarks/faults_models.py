"""Broken models for the fault benchmark and its tests: a copy of a good store entry, damaged one way.

Each fault is what an operator meets in practice: weights changed after registration (a bad copy, a half-applied
update, a bit flip: the file still loads, with other numbers), weights cut short (a full disk or an interrupted
copy), and a ``meta.json`` that lost its calibration (overwritten by an older one). The copy keeps the good entry's
store metadata, so the entry still claims what it was registered as.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, get_args

import bentoml
from safetensors import safe_open
from safetensors.torch import save_file

from snodevit.checkpoint import META_FILE, WEIGHTS_FILE

Fault = Literal["hash_mismatch", "truncated_weights", "missing_calibration"]
FAULTS: tuple[str, ...] = get_args(Fault)
#: The words each fault's refusal must contain (service.store.check_served, snodevit.checkpoint.load_model).
REASON_WORDS: dict[str, str] = {"hash_mismatch": "records", "truncated_weights": "not a readable safetensors file",
                                "missing_calibration": "holds none"}


def _perturb_weights(path: Path) -> None:
    """Change one number of the first floating-point tensor; the file stays a valid safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, t in sorted(tensors.items()) if t.is_floating_point() and t.numel())
    flat = tensors[name].clone().reshape(-1)
    flat[0] += 1e-3
    tensors[name] = flat.reshape(tensors[name].shape)
    save_file(tensors, str(path), metadata=metadata)


def damage(directory: Path, fault: Fault) -> None:
    """Damage the model files in ``directory`` in place."""
    weights = directory / WEIGHTS_FILE
    if fault == "hash_mismatch":
        _perturb_weights(weights)
    elif fault == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif fault == "missing_calibration":
        meta = json.loads((directory / META_FILE).read_text())
        meta.pop("calibration", None)
        meta.pop("calibration_figures", None)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    else:
        raise ValueError(f"fault must be one of {list(FAULTS)}, got {fault!r}")


def broken_entry(good_tag: str, fault: Fault, name: str = "snodevit-broken") -> str:
    """A new store entry ``name:<version>``: the files of ``good_tag``, damaged by ``fault``, under its metadata.

    Returns:
        The new entry's tag.
    """
    good = bentoml.models.get(good_tag)
    with bentoml.models.create(name, labels={"project": "snodevit", "fault": fault},
                               metadata=dict(good.info.metadata)) as entry:
        target = Path(entry.path)
        for file in Path(good.path).iterdir():
            if file.is_file() and file.name != "model.yaml":
                shutil.copy2(file, target / file.name)
        damage(target, fault)
    return str(entry.tag)
