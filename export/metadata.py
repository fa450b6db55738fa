"""What an exported graph carries besides its weights, so that the ``.onnx`` file alone is enough to serve.

Everything is stored in the model's ``metadata_props`` (string key -> string value) under the ``snodevit.``
prefix; structured values are JSON. ``encode_metadata`` builds the strings at export time and
``decode_metadata`` turns them back into Python values, checking that nothing a server needs is missing.

Keys::

    snodevit.format          version of this layout ("1")
    snodevit.version         snodevit version that exported the graph
    snodevit.config          SNodeViTConfig as JSON: the model can be rebuilt from it
    snodevit.class_names     JSON list, index = class id
    snodevit.preprocessing   JSON of ``snodevit.data.Preprocessing``: how an image becomes the ``images`` input
    snodevit.calibration     JSON object of ``snodevit.inference.Calibration.to_dict()`` (identity when not fitted)
    snodevit.weights_sha256  ``snodevit.checkpoint.weights_hash`` of the exported weights
    snodevit.opset           ONNX opset of the default domain
    snodevit.inputs          JSON object: input name -> shape rule, e.g. "(S, B, depth, K, N, m)"
    snodevit.noise_shape     JSON object: the rule and its static numbers (depth, K, N, m)
    snodevit.outputs         JSON object: output name -> shape rule
    snodevit.dynamic         "true" when B and S are dynamic, "false" when fixed to ``snodevit.static_sizes``
    snodevit.static_sizes    JSON object {"batch_size": B, "num_samples": S} of a static graph, else "null"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from snodevit.config import SNodeViTConfig
from snodevit.data import Preprocessing
from snodevit.inference.fitted import Calibration

PREFIX = "snodevit."
FORMAT_VERSION = "1"
IMAGES = "images"
NOISE = "noise"
LOGITS = "logits"
ATTENTION = "attention"
FEATURES = "features"

_REQUIRED = ("format", "version", "config", "class_names", "preprocessing", "calibration", "weights_sha256", "opset",
             "inputs", "noise_shape", "outputs", "dynamic", "static_sizes")
_JSON_KEYS = ("config", "class_names", "preprocessing", "calibration", "inputs", "noise_shape", "outputs",
              "static_sizes")


class OnnxModelError(ValueError):
    """An ``.onnx`` file that cannot be served: missing, empty, truncated, corrupt or not exported by snodevit."""


def io_shapes(cfg: SNodeViTConfig, attention_maps: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Human-readable shape rules of the graph's inputs and outputs (B, S dynamic unless the graph is static)."""
    inputs = {IMAGES: f"(B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) float32, preprocessed",
              NOISE: f"(S, B, {', '.join(map(str, cfg.noise_shape(1, 1)[2:]))}) float32 standard normals"}
    outputs = {LOGITS: f"(S, B, {cfg.num_classes}) float32"}
    if attention_maps:
        outputs[ATTENTION] = (f"(S, B, {cfg.depth}, {cfg.num_tokens}, {cfg.num_tokens}) float32 applied attention "
                              "per block (mean over heads and solver evaluations), token 0 = class token")
    outputs[FEATURES] = (f"(S, B, {cfg.num_gate_features}, {cfg.gate_feature_dim}) float32 quadrant-pooled patch "
                         f"tokens read by the out-of-distribution gate: {', '.join(cfg.gate_feature_names)}")
    return inputs, outputs


def check_meta(cfg: SNodeViTConfig, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the checkpoint metadata an export needs; returns class names, preprocessing and calibration.

    Raises:
        ValueError: missing class names or preprocessing (the file could not be served without them), class
            names or preprocessing that do not fit the model, or a malformed calibration.
    """
    for key in ("class_names", "preprocessing"):
        if not meta.get(key):
            raise ValueError(f"meta has no {key!r}: an exported graph without it could not be served "
                             "(models written by `snodevit train` have it)")
    class_names = [str(c) for c in meta["class_names"]]
    if len(class_names) != cfg.num_classes:
        raise ValueError(f"meta has {len(class_names)} class names but the model has {cfg.num_classes} classes")
    prep = Preprocessing.from_dict(dict(meta["preprocessing"]))
    if (prep.image_size, prep.channels) != (cfg.image_size, cfg.in_channels):
        raise ValueError(f"preprocessing makes {prep.channels}x{prep.image_size}x{prep.image_size} images but the "
                         f"model takes {cfg.in_channels}x{cfg.image_size}x{cfg.image_size}")
    calibration = Calibration.from_dict(meta.get("calibration"))
    return {"class_names": class_names, "preprocessing": prep.to_dict(), "calibration": calibration.to_dict()}


def encode_metadata(cfg: SNodeViTConfig, meta: Mapping[str, Any], *, weights_sha256: str, opset: int,
                    attention_maps: bool, static_sizes: tuple[int, int] | None, version: str) -> dict[str, str]:
    """Metadata strings for ``metadata_props``.

    Args:
        cfg: the exported model's configuration.
        meta: checkpoint metadata (``meta.json``): ``class_names``, ``preprocessing``, optional ``calibration``.
        weights_sha256: hash of the exported weights.
        opset: opset of the default ONNX domain in the graph.
        attention_maps: whether the graph has the ``attention`` output.
        static_sizes: (batch_size, num_samples) of a static graph, None when both are dynamic.
        version: snodevit version.

    Raises:
        ValueError: see ``check_meta``.
    """
    inputs, outputs = io_shapes(cfg, attention_maps)
    values: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "version": version,
        "config": cfg.to_dict(),
        **check_meta(cfg, meta),
        "weights_sha256": weights_sha256,
        "opset": str(opset),
        "inputs": inputs,
        "noise_shape": {"rule": "(S, B, L, K, N, m)", "L": cfg.num_noise_blocks, "K": cfg.num_steps,
                        "N": cfg.num_tokens, "m": cfg.noise_dim},
        "outputs": outputs,
        "dynamic": "false" if static_sizes else "true",
        "static_sizes": ({"batch_size": static_sizes[0], "num_samples": static_sizes[1]} if static_sizes else None),
    }
    # Strict JSON, which any ONNX tool's parser reads (Calibration.to_dict writes infinite thresholds as strings).
    return {PREFIX + k: (json.dumps(v, sort_keys=True, allow_nan=False) if k in _JSON_KEYS else str(v))
            for k, v in values.items()}


def decode_metadata(props: Mapping[str, str], source: str | Path) -> dict[str, Any]:
    """Decode ``metadata_props`` written by ``encode_metadata``.

    Args:
        props: the model's metadata strings.
        source: the file they came from, named in errors.

    Returns:
        A dict with the keys of the table in this module's docstring (without the prefix): ``config`` is a
        ``SNodeViTConfig``, ``preprocessing`` a ``Preprocessing``, ``calibration`` a ``Calibration``, ``opset``
        an int, ``dynamic`` a bool, the other JSON values decoded.

    Raises:
        OnnxModelError: no snodevit metadata (a foreign graph), a missing key, or a value that does not decode.
    """
    ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
    if not ours:
        raise OnnxModelError(f"{source} has no snodevit metadata: it is an ONNX graph, but not one written by "
                             "`snodevit export`")
    missing = [k for k in _REQUIRED if k not in ours]
    if missing:
        raise OnnxModelError(f"{source}: snodevit metadata is incomplete, missing {[PREFIX + k for k in missing]}")
    if ours["format"] != FORMAT_VERSION:
        raise OnnxModelError(f"{source}: metadata format {ours['format']!r} is not supported (this snodevit reads "
                             f"format {FORMAT_VERSION!r}); re-export the model")
    out: dict[str, Any] = dict(ours)
    try:
        for k in _JSON_KEYS:
            out[k] = json.loads(ours[k])
        out["config"] = SNodeViTConfig.from_dict(out["config"])
        out["preprocessing"] = Preprocessing.from_dict(out["preprocessing"])
        out["calibration"] = Calibration.from_dict(out["calibration"])
        out["opset"] = int(ours["opset"])
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise OnnxModelError(f"{source}: snodevit metadata does not decode: {e}") from e
    out["dynamic"] = ours["dynamic"] == "true"
    if len(out["class_names"]) != out["config"].num_classes:
        raise OnnxModelError(f"{source}: {len(out['class_names'])} class names for "
                             f"{out['config'].num_classes} classes")
    return out


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """Read and decode the snodevit metadata of an exported graph without starting a runtime.

    Returns:
        See ``decode_metadata``.

    Raises:
        FileNotFoundError: no such file.
        OnnxModelError: an empty, truncated or corrupt file, or an ONNX graph without snodevit metadata.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    check_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise OnnxModelError(f"{path} is not a readable ONNX model (truncated or corrupt?): {e}") from e
    if not model.HasField("graph"):
        raise OnnxModelError(f"{path} is not an ONNX model: it holds no graph")
    return decode_metadata({p.key: p.value for p in model.metadata_props}, path)


def check_file(path: Path) -> None:
    """Fail early, with the file's name, on what can be told without parsing.

    Raises:
        FileNotFoundError: no such file.
        OnnxModelError: a directory or an empty file.
    """
    if not path.exists():
        raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist (create one with `snodevit export`)")
    if not path.is_file():
        raise OnnxModelError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise OnnxModelError(f"{path} is empty (0 bytes): an interrupted copy? re-export or copy it again")
