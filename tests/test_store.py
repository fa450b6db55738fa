"""service.store: registering models in a temporary BentoML home, resolving tags, the ONNX graph alongside."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from service.testing import CALIBRATION, make_tiny_model
from snodevit.checkpoint import META_FILE, CheckpointError
from service.store import headline_metadata, register_model, resolve, stored_metadata, temporary_home

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def home(tmp_path: Path):
    with temporary_home(tmp_path / "bentoml") as h:
        yield h


def test_register_copies_the_model_and_its_figures(model_dir: Path, home: Path) -> None:
    import bentoml

    tag = register_model(model_dir, name="snodevit-unit", labels={"stage": "test"})
    entry = bentoml.models.get(tag)
    stored = Path(entry.path)
    assert stored.is_relative_to(home)
    for name in ("model.safetensors", "config.json", "meta.json"):
        assert (stored / name).read_bytes() == (model_dir / name).read_bytes()
    assert not (stored / "model.onnx").exists()
    assert entry.info.labels == {"project": "snodevit", "stage": "test"}
    meta = stored_metadata(str(tag))
    sha = json.loads((model_dir / META_FILE).read_text())["weights_sha256"]
    assert meta["weights_sha256"] == sha and meta["version"] == sha[:12]
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert meta["calibrated"] is True and meta["backends"] == ["torch"]
    assert meta["calibration.temperature"] == CALIBRATION["temperature"]
    assert meta["calibration.conformal_thresholds.0.05"] == 0.9
    assert meta["calibration.metrics.ece_after"] == 0.02


def test_latest_is_the_newest_version_and_resolve_finds_it(model_dir: Path, home: Path) -> None:
    first = register_model(model_dir, name="snodevit-unit")
    second = register_model(model_dir, name="snodevit-unit")
    assert first != second
    assert resolve("snodevit-unit:latest").name == second.version
    assert resolve(str(first)).name == first.version
    assert resolve(model_dir) == model_dir  # a directory is taken as it is


def test_resolve_unknown_names_what_the_store_has(model_dir: Path, home: Path) -> None:
    with pytest.raises(LookupError, match="store is empty"):
        resolve("snodevit-mnist:latest")
    tag = register_model(model_dir, name="snodevit-unit")
    with pytest.raises(LookupError, match=str(tag)):
        resolve("snodevit-mnist:latest")


def test_homes_are_separate(model_dir: Path, tmp_path: Path) -> None:
    import bentoml

    with temporary_home(tmp_path / "a"):
        register_model(model_dir, name="only-in-a")
        assert [m.tag.name for m in bentoml.models.list()] == ["only-in-a"]
        with temporary_home(tmp_path / "b"):
            assert bentoml.models.list() == []
            assert os.environ["BENTOML_HOME"] == str(tmp_path / "b")
        assert os.environ["BENTOML_HOME"] == str(tmp_path / "a")
        assert [m.tag.name for m in bentoml.models.list()] == ["only-in-a"]


def test_incomplete_directories_are_refused(model_dir: Path, home: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        register_model(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "config.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / META_FILE).write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(CheckpointError, match="preprocessing"):
        register_model(broken)
    meta = json.loads((model_dir / META_FILE).read_text())
    (broken / META_FILE).write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="changed after training"):
        register_model(broken)
    with pytest.raises(FileNotFoundError, match="snodevit export"):
        register_model(model_dir, onnx_path=tmp_path / "none.onnx")
    with pytest.raises(ValueError, match="labels"):
        register_model(model_dir, labels={"n": 1})  # type: ignore[dict-item]


def test_headline_metadata_keeps_scalars_only() -> None:
    meta = {"class_names": ["a", "b"], "preprocessing": {"image_size": 8},
            "calibration": {"temperature": 1.5, "curve": [1, 2], "bad": float("nan"), "deep": {"x": {"y": {"z": 1}}}},
            "training": {"best_epoch": 3, "history": [{"epoch": 1}]}}
    md = headline_metadata(meta, "ab" * 32, has_onnx=True)
    assert md["calibration.temperature"] == 1.5 and md["training.best_epoch"] == 3
    assert md["backends"] == ["torch", "onnx"]
    assert not any(k.startswith(("calibration.curve", "calibration.bad", "calibration.deep.x.y")) for k in md)


def test_headline_metadata_keeps_infinite_thresholds_as_strict_json() -> None:
    """An older meta.json holds float inf (read from the bare Infinity token), a newer one the string."""
    for threshold in (float("inf"), "Infinity"):
        meta = {"class_names": ["a", "b"], "preprocessing": {"image_size": 8},
                "calibration": {"temperature": 1.5, "conformal_thresholds": {"0.1": threshold},
                                "decision_threshold": threshold, "metrics": {"ece": 0.1}}}
        md = headline_metadata(meta, "ab" * 32, has_onnx=False)
        assert md["calibration.decision_threshold"] == md["calibration.conformal_thresholds.0.1"] == "Infinity"
        assert md["calibration.metrics.ece"] == 0.1
        json.dumps(md, allow_nan=False)


@pytest.mark.slow
def test_onnx_graph_is_stored_checked_and_served_alike(model_dir: Path, home: Path, tmp_path: Path) -> None:
    """The stored graph answers like the torch weights through the service engine (same noise, same numbers)."""
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("export")
    import snodevit
    from service.engine import Engine
    from service.settings import ServiceSettings
    from snodevit.inference.backends import open_model

    model, meta = snodevit.load_model(model_dir)
    onnx = export.export_onnx(model, tmp_path / "model.onnx", meta=meta, attention_maps=True)
    tag = register_model(model_dir, name="snodevit-unit", onnx_path=onnx)
    stored = resolve(str(tag))
    assert (stored / "model.onnx").read_bytes() == onnx.read_bytes()
    assert stored_metadata(str(tag))["backends"] == ["torch", "onnx"]

    settings = ServiceSettings(num_samples=4, batch_wait_ms=1)
    image = (Path(__file__).parent.parent / "examples" / "digit_7.png").read_bytes()
    answers = {}
    for backend in ("torch", "onnx"):
        engine = Engine(open_model(stored, backend=backend), settings, name="snodevit-unit", tag=str(tag))
        try:
            params = engine.check(num_samples=4, seed=11, top_k=3, alpha=None)
            [(record, _)], _ = asyncio.run(engine.classify([image], params, endpoint="test"))
            explained, _ = asyncio.run(engine.explain(image, params, endpoint="test"))
            figures = engine.metadata({}).calibration.figures  # the graph's meta.json beside it, for onnx too
            assert figures is not None and figures.ece_after == 0.02, backend
        finally:
            engine.close()
        assert engine.info.backend == backend
        answers[backend] = (record, explained)
    (rt, et), (ro, eo) = answers["torch"], answers["onnx"]
    assert ro["label"] == rt["label"] and ro["seed"] == rt["seed"] == 11
    assert ro["confidence"] == pytest.approx(rt["confidence"], abs=1e-5)
    assert torch.allclose(torch.tensor(eo.rollout), torch.tensor(et.rollout), atol=1e-5)

    # The graph next to other weights is refused.
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="other weights"):
        register_model(other, onnx_path=onnx)
