"""benchmarks/decisions.py: decisions under shift through the real `snodevit score`, on a tiny gated model.

The figures are checked against an independent count of the rows that `snodevit score` writes for the same images,
and the torch and ONNX Runtime backends must take the same decisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _benchmarks import load_benchmark

decisions = load_benchmark("decisions")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from service.testing import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("gated") / "model", gate=True)
    out = tmp_path_factory.mktemp("decisions")
    assert decisions.main(["--model", str(model), "--out", str(out), "--images", "9", "--angles", "0", "90",
                           "--num-samples", "2", "--backends", "torch", "onnx"]) == 0
    return out, json.loads((out / "decisions.json").read_text())


def test_every_set_is_scored_and_the_files_are_written(run: tuple[Path, dict[str, Any]]) -> None:
    out, result = run
    assert list(result["rows"]) == ["test", "rotated 90", "sklearn digits", "pixel noise", "uniform_noise",
                                    "photo_crops", "constant", "inverted_digits", "letters", "tiny images"]
    for name, row in result["rows"].items():
        assert row["images"] == (3 if name == "tiny images" else 9)
        assert row["accepted"] + row["review_out_of_distribution"] + row["review_low_confidence"] == pytest.approx(1)
        assert (row["accuracy"] is None) == (name in ("uniform_noise", "photo_crops", "constant", "letters",
                                                      "tiny images"))
    # the gate of even a random model sees noise and inverted contrast
    assert result["rows"]["uniform_noise"]["review_out_of_distribution"] == 1.0
    assert result["agreement"] == {name: 1.0 for name in result["rows"]}  # torch and ONNX Runtime decide alike
    assert set(result["goals"]) >= {"test: accepted", "uniform_noise: sent to review", "rotated 90: error among "
                                    "accepted"}
    page = (out / "decisions.md").read_text()
    assert "| uniform_noise | 9 |" in page and "torch = ONNX decisions" in page
    for name in ("decisions_under_shift_rotation", "decisions_under_shift_sets"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_row_summary_against_a_hand_count() -> None:
    rows = [{"decision": "accept", "reason_code": "accepted", "label": "1", "true_label": "1"},
            {"decision": "accept", "reason_code": "accepted", "label": "2", "true_label": "3"},
            {"decision": "review", "reason_code": "out_of_distribution", "label": "4", "true_label": "4"},
            {"decision": "review", "reason_code": "low_confidence", "label": "5", "true_label": "6"}]
    s = decisions.summarize_rows(rows)
    assert s == {"images": 4.0, "accepted": 0.5, "review_out_of_distribution": 0.25, "review_low_confidence": 0.25,
                 "accuracy": 0.5, "error_among_accepted": 0.5}
    unlabelled = decisions.summarize_rows([{**r, "true_label": None} for r in rows])
    assert unlabelled["accuracy"] is None and unlabelled["error_among_accepted"] is None


def test_a_folder_without_a_model_exits_with_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        decisions.main(["--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
