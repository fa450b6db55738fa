"""Checkpoints: safetensors weights + JSON config/metadata, written atomically. Never pickle.

A model directory holds::

    model.safetensors   the state dict (tensors only)
    config.json         SNodeViTConfig fields
    meta.json           class names, preprocessing, training figures, calibration (added by `snodevit calibrate`)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from calibration.files import atomic_path, atomic_write_json
from snodevit.config import SNodeViTConfig
from snodevit.model import SNodeViT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or corrupt."""


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict's names and bytes: identifies the exact weights in exports and the service."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_model(model: SNodeViT, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save weights, config and metadata into ``directory`` (created), each file replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    atomic_write_json(directory / CONFIG_FILE, model.cfg.to_dict())
    full_meta = dict(meta or {})
    full_meta["weights_sha256"] = weights_hash(model)
    atomic_write_json(directory / META_FILE, full_meta)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def update_meta(directory: str | Path, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into meta.json (atomically) and return the new metadata."""
    meta = read_meta(directory)
    meta.update(updates)
    atomic_write_json(Path(directory) / META_FILE, meta)
    return meta


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[SNodeViT, dict[str, Any]]:
    """Rebuild a model from its directory. Returns (model in eval mode, metadata).

    Raises:
        CheckpointError: missing directory/files, invalid JSON, or weights that do not match the config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {str(directory)!r} does not exist (train one with `snodevit train`)")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a snodevit model directory: {name} is missing")
    try:
        cfg = SNodeViTConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid model config: {e}") from e
    try:
        state = load_file(directory / WEIGHTS_FILE, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
    model = SNodeViT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"weights in {directory} do not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.to(map_location).eval()
    return model, read_meta(directory)
