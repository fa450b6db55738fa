"""benchmarks/uncertainty.py end to end in --quick mode: every method and section produces finite figures.

The figures of a quick run are meaningless (one epoch on a hundred images); the test checks that the pipeline
runs, that the doc, JSON and figures are written (into tmp_path, never into docs/) and that checkpoints are
reused. The full run is for the GPU machine (see the module docstring). The committed report renders the committed
doc byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from _benchmarks import load_benchmark

bench = load_benchmark("uncertainty")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _finite_numbers(value: Any, where: str = "report") -> list[str]:
    """Paths of every number in ``value`` that is not finite (NaN/inf would have failed json.dumps anyway)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _finite_numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _finite_numbers(v, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    return []


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    root = tmp_path_factory.mktemp("uncertainty")
    out, runs = root / "out", root / "runs"
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out), "--runs", str(runs)]) == 0
    return json.loads((out / "uncertainty-benchmark.json").read_text()), out, runs


def test_every_method_and_section_has_finite_figures(quick_run: tuple[dict[str, Any], Path, Path]) -> None:
    report, _, _ = quick_run
    budget = bench.budget_from_args(bench.build_parser().parse_args(["--quick"]))
    names = [m.name for m in bench.methods_for(budget)]
    assert list(report["summary"]) == names and list(report["cost"]) == names
    assert _finite_numbers(report) == []
    angles = [f"{a:g}" for a in budget.angles]
    for name in names:
        s = report["summary"][name]
        for section in ("test", "digits"):
            for metric in ("accuracy", "nll", "brier", "ece", "aurc"):
                assert f"{section}.{metric}" in s, (name, section, metric)
        for a in angles:
            assert f"rotation.{a}.ece" in s and f"rotation.{a}.accuracy" in s
        for ood in bench.OOD_SETS:
            for score in ("auroc_entropy", "auroc_mutual_information"):
                assert 0.0 <= s[f"ood.{ood}.{score}"]["mean"] <= 1.0
        assert 0.0 < s["temperature"]["mean"]
        assert len(s["rejection_accuracy"]["mean"]) == len(bench.REJECTION_GRID)
        c = report["cost"][name]
        assert c["flops_per_image"] > 0 and c["cpu_ms_per_image"] > 0 and c["parameters"] > 0
        run = report["runs"][name][0]
        assert run["mi_is_zero"] == (run["num_samples"] == 1)
        if run["mi_is_zero"]:  # a single sample has no spread: MI is exactly 0 and its AUROC that of a constant
            assert s["test.mean_mutual_information"]["mean"] == 0.0
            assert s["ood_min.auroc_mutual_information"]["mean"] == 0.5
    # the ensemble's cost is its members' (same architecture as det), a sampling method's grows with S
    ens = next(n for n in names if n.startswith("ensemble-"))
    assert report["cost"][ens]["flops_per_image"] == pytest.approx(budget.ensemble_size
                                                                  * report["cost"]["det"]["flops_per_image"])
    assert report["cost"]["snodevit"]["flops_per_image"] > report["cost"]["snodevit-no-noise"]["flops_per_image"]
    assert set(report["goals"]) >= {"snodevit"}


def test_doc_and_figures_are_written(quick_run: tuple[dict[str, Any], Path, Path]) -> None:
    report, out, _ = quick_run
    doc = (out / "uncertainty-benchmark.md").read_text()
    for heading in ("## Goal check", "## Test split", "## Under shift", "## Far out of distribution", "## Cost",
                    "## Setup", "## What was tried"):
        assert heading in doc
    for name in report["summary"]:
        assert f"| {name} |" in doc
    assert "QUICK MODE" in doc and "fit_temperature" in doc and report["environment"]["cpu"] in doc
    pngs = sorted(p.name for p in out.glob("uncertainty-*.png"))
    assert pngs == ["uncertainty-cost.png", "uncertainty-rejection.png", "uncertainty-rotation.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_checkpoints_are_reused_on_a_rerun(quick_run: tuple[dict[str, Any], Path, Path]) -> None:
    report, _, runs = quick_run
    budget = bench.budget_from_args(bench.build_parser().parse_args(["--quick"]))
    jobs = bench.train_jobs(budget, runs, "cpu", 1, retrain=False)
    assert report["trained"] == len(jobs) and report["reused"] == 0
    assert all(bench._checkpoint_matches(j) for j in jobs)
    assert bench.train_one(jobs[0])["reused"] is True
    longer = bench.train_jobs(bench.budget_from_args(bench.build_parser().parse_args(["--quick", "--epochs", "2"])),
                              runs, "cpu", 1, retrain=False)
    assert not any(bench._checkpoint_matches(j) for j in longer)  # other settings never reuse a checkpoint


def test_a_checkpoint_from_before_a_new_train_option_is_still_reused(
        quick_run: tuple[dict[str, Any], Path, Path]) -> None:
    """A TrainConfig field added later (stored configs lack it) counts at its default, which keeps the old recipe."""
    _, _, runs = quick_run
    budget = bench.budget_from_args(bench.build_parser().parse_args(["--quick"]))
    job = bench.train_jobs(budget, runs, "cpu", 1, retrain=False)[0]
    assert bench._checkpoint_matches(job)
    older = replace(job, train_config={k: v for k, v in job.train_config.items() if k != "ood_shuffle_grid"})
    assert bench._train_config_filled(older.train_config) == job.train_config
    assert bench._train_config_filled({**job.train_config, "no_such_option": 1}) is None
    assert not bench._checkpoint_matches(replace(job, train_config={**job.train_config, "ood_shuffle_grid": 4}))


def test_the_committed_report_renders_the_committed_doc() -> None:
    """docs/uncertainty-benchmark.md is what the script writes for docs/uncertainty-benchmark.json, byte for byte."""
    report = json.loads((DOCS / "uncertainty-benchmark.json").read_text())
    assert bench.render_markdown(report).encode() == (DOCS / "uncertainty-benchmark.md").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "1"], "expected an integer >= 2"),
    (["--seeds", "0", "100"], "collide with ensemble member seeds"),
    (["--seeds", "1", "1"], "must be distinct"),
    (["--jobs", "0"], "expected an integer >= 1"),
    (["--epochs", "x"], "expected an integer >= 1"),
])
def test_bad_arguments_exit_with_code_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
