"""`python -m service.demo --pretrained DIR`: the shipped checkpoint is verified, copied and served, never trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service import demo
from service.testing import make_tiny_model
from snodevit.checkpoint import load_model, update_meta, weights_hash
from service.store import stored_metadata, temporary_home

REPO = Path(__file__).resolve().parents[1]


def _finished(directory: Path, calibrated: bool = False) -> Path:
    make_tiny_model(directory, calibrated=calibrated)
    meta = json.loads((directory / "meta.json").read_text())
    # make_tiny_model writes an untrained model: give it the history of a finished one-epoch run
    update_meta(directory, training={"config": {"epochs": 1}, "history": [{"epoch": 1, "val_accuracy": 0.1}]},
                provenance={"command": "snodevit train --epochs 1"}, weights_sha256=meta["weights_sha256"])
    return directory


def test_pretrained_is_copied_not_trained(tmp_path: Path, capsys) -> None:
    source, out = _finished(tmp_path / "shipped"), tmp_path / "run"
    calls: list[str] = []

    def fake_snodevit(argv: list[str]) -> int:
        calls.append(argv[0])
        assert argv[0] != "train", "a shipped checkpoint must not be retrained"
        return 1 if argv[0] == "export" else 0  # calibrate: leave uncalibrated; export: fail -> torch only

    with temporary_home(tmp_path / "bentoml"):
        assert demo.main(["--out", str(out), "--pretrained", str(source)], fake_snodevit) == 0
        assert "train" not in calls
        for name in ("model.safetensors", "config.json"):
            assert (out / name).read_bytes() == (source / name).read_bytes()
        model, meta = load_model(out)
        assert weights_hash(model) == meta["weights_sha256"]
        printed = capsys.readouterr().out
        assert "using the shipped checkpoint" in printed and "snodevit train --epochs 1" in printed
        assert stored_metadata("snodevit-mnist:latest")["backends"] == ["torch"]


def test_altered_pretrained_checkpoint_is_refused(tmp_path: Path) -> None:
    source = _finished(tmp_path / "shipped")
    update_meta(source, weights_sha256="0" * 64)
    with temporary_home(tmp_path / "bentoml"), pytest.raises(SystemExit, match="does not match"):
        demo.main(["--out", str(tmp_path / "run"), "--pretrained", str(source)], lambda argv: 0)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_unfinished_pretrained_checkpoint_is_refused(tmp_path: Path) -> None:
    with temporary_home(tmp_path / "bentoml"), pytest.raises(SystemExit, match="not a finished training run"):
        demo.main(["--out", str(tmp_path / "run"), "--pretrained", str(tmp_path / "missing")], lambda argv: 0)


@pytest.mark.skipif(not (REPO / "models/snodevit-mnist/meta.json").is_file(), reason="no shipped checkpoint")
def test_shipped_demo_checkpoint_matches_its_hash_and_recipe() -> None:
    model, meta = load_model(REPO / "models/snodevit-mnist")
    assert weights_hash(model) == meta["weights_sha256"]
    assert meta["data"] == "mnist5k" and meta["variant"] == "tiny" and demo.trained(REPO / "models/snodevit-mnist")
    assert meta["provenance"]["command"].startswith("snodevit train")


def test_a_graph_left_from_older_weights_is_exported_again(tmp_path: Path) -> None:
    """`--out` holding an unfinished run and its graph: the copied checkpoint gets a new graph, not the stale one."""
    source, out = _finished(tmp_path / "shipped", calibrated=True), tmp_path / "run"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"graph of some older weights")
    calls: list[str] = []

    def fake_snodevit(argv: list[str]) -> int:
        calls.append(argv[0])
        return 1 if argv[0] == "export" else 0

    with temporary_home(tmp_path / "bentoml"):
        assert demo.main(["--out", str(out), "--pretrained", str(source)], fake_snodevit) == 0
        assert calls == ["export"]  # calibrated already: only the graph is made
        assert stored_metadata("snodevit-mnist:latest")["backends"] == ["torch"]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_retraining_runs_the_ten_minute_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               native_bf16: bool) -> None:
    """Without --pretrained the demo trains 40 epochs, in bf16 where the CPU has native bf16 (fp32 elsewhere)."""
    out, seen = tmp_path / "run", {}
    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: native_bf16)

    def fake_snodevit(argv: list[str]) -> int:
        if argv[0] in ("train", "tail"):
            seen[argv[0]] = argv
        if argv[0] == "tail":  # the stochastic tail is what lands in --out
            _finished(out)
        return 1 if argv[0] == "export" else 0

    with temporary_home(tmp_path / "bentoml"):
        assert demo.main(["--out", str(out)], fake_snodevit) == 0
    argv = seen["train"]
    assert argv[argv.index("--variant") + 1] == "snodevit_mnist_every_block"
    assert argv[argv.index("--epochs") + 1] == "40"
    assert argv[argv.index("--precision") + 1] == ("bf16" if native_bf16 else "auto")
    every = argv[argv.index("--out") + 1]
    tail = seen["tail"]
    assert tail[tail.index("--model") + 1] == every and tail[tail.index("--out") + 1] == str(out)
