"""benchmarks/attention_comparison.py: the quick mode end to end, and its argument checks."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "attention_comparison.py"
BACKENDS = ["ksvd", "ksvd-adaptive", "softmax", "linformer", "performer", "nystrom", "hybrid"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("attention")
    out, runs = tmp / "docs", tmp / "runs"
    proc = _run("--quick", "--device", "cpu", "--out", str(out), "--runs-dir", str(runs), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, runs, proc


def test_quick_run_writes_every_file_and_nothing_else(quick_run) -> None:
    out, _, proc = quick_run
    assert sorted(p.name for p in out.iterdir()) == [
        "attention-comparison.json", "attention-comparison.md", "attention-maps.png", "attention-scaling.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for name in BACKENDS:  # the final table on stdout names every backend
        assert any(line.split()[:1] == [name] for line in proc.stdout.splitlines()), proc.stdout


def test_every_backend_has_finite_figures(quick_run) -> None:
    out, _, _ = quick_run
    report = json.loads((out / "attention-comparison.json").read_text())
    assert sorted(report["accuracy"]) == sorted(report["backends"]) == sorted(BACKENDS)
    for name, row in report["accuracy"].items():
        for key in ("accuracy", "nll", "ece"):
            assert math.isfinite(row[key]), (name, key, row[key])
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["ece"] <= 1.0 and row["nll"] > 0
    assert report["test_images"] == 500  # the whole mnist5k test split
    sizes = report["plan"]["sizes"]
    assert len(sizes) == 2
    cells = {(r["backend"], r["image_size"]): r for r in report["cost"]}
    assert set(cells) == {(b, s) for b in BACKENDS for s in sizes}
    for (name, size), r in cells.items():
        assert r["patch_tokens"] == (size // 4) ** 2 and r["tokens"] == r["patch_tokens"] + 1
        assert r["params"] > 0 and r["flops"] > 0
        assert math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0 and r["runs"] == report["plan"]["repeats"]
    maps = report["maps"]["backends"]
    assert sorted(maps) == sorted(BACKENDS)
    for name, m in maps.items():  # the rollout is a distribution over the patch grid
        flat = [v for row in m["rollout"] for v in row]
        assert len(flat) == 49 and abs(sum(flat) - 1) < 1e-4 and min(flat) >= 0, name
    assert report["headline"] and "fastest" in report["headline"]


def test_costs_follow_the_architecture(quick_run) -> None:
    """Softmax vs Linformer against closed forms: the counter must see the fused softmax's N^2 products.

    Everything but the attention is the same in the two models, so per block and solver step the counted
    FLOPs differ by softmax's QK^T and AV (4 S N^2 D) minus Linformer's E K, F V, Q Kp^T and A Vp (8 S k N D),
    and the parameters by Linformer's two (k, N) projections.
    """
    out, _, _ = quick_run
    report = json.loads((out / "attention-comparison.json").read_text())
    cfg = report["runs"][0]  # a trained model's config carries the micro sizes
    cells = {(r["backend"], r["image_size"]): r for r in report["cost"]}
    from snodevit import SNodeViTConfig

    micro = SNodeViTConfig.from_dict(json.loads((Path(cfg["dir"]) / "config.json").read_text()))
    s, d, blocks = report["plan"]["num_samples"], micro.dim, micro.depth * micro.num_steps
    for size in report["plan"]["sizes"]:
        soft, lin = cells[("softmax", size)], cells[("linformer", size)]
        n = soft["tokens"]
        k = min(micro.linformer_k, n)
        assert soft["flops"] - lin["flops"] == blocks * (4 * s * n * n * d - 8 * s * k * n * d)
        assert lin["params"] - soft["params"] == micro.depth * 2 * k * n
    # FLOPs grow with the token count for every backend, and quadratically for softmax (attention dominates less
    # in a micro model, so only "more than linear" is asserted).
    small, big = report["plan"]["sizes"]
    ratio = (big // 4) ** 2 / (small // 4) ** 2
    for name in BACKENDS:
        assert cells[(name, big)]["flops"] > cells[(name, small)]["flops"], name
    assert cells[("softmax", big)]["flops"] > ratio * cells[("softmax", small)]["flops"]


def test_accuracy_matches_a_plain_loop_and_torchmetrics(quick_run) -> None:
    """Recompute one backend's test figures image by image, with the same per-image seeds, and score them
    with torchmetrics."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    import torch

    from snodevit import load_model
    from snodevit.data.sets import load_dataset

    out, _, _ = quick_run
    report = json.loads((out / "attention-comparison.json").read_text())
    run = next(r for r in report["runs"] if r["model"] == "nystrom")
    model, _ = load_model(run["dir"])
    test = load_dataset("mnist5k").test
    probs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a micro model on a shared CPU: more threads only spin
    try:
        with torch.no_grad():
            for i in range(len(test)):
                image, _ = test[i]
                noise = torch.randn(model.noise_shape(1, 8), generator=torch.Generator().manual_seed(i))
                probs.append(model.sample_logits(image[None], noise=noise).softmax(-1).mean(0)[0].double())
    finally:
        torch.set_num_threads(threads)
    p = torch.stack(probs)
    y = test.labels
    assert run["accuracy"] == pytest.approx(float(tm.multiclass_accuracy(p, y, 10, average="micro")), abs=1e-6)
    assert run["ece"] == pytest.approx(float(tm.multiclass_calibration_error(p, y, 10, n_bins=15)), abs=1e-5)
    assert run["nll"] == pytest.approx(float(torch.nn.functional.nll_loss(p.log(), y)), abs=1e-5)
    row = report["accuracy"]["nystrom"]
    assert row["accuracy"] == run["accuracy"] and row["nll"] == run["nll"]


def test_a_rerun_reuses_matching_checkpoints_and_retrains_changed_ones(quick_run, tmp_path: Path) -> None:
    out, runs, _ = quick_run
    ac = load_benchmark("attention_comparison")
    report = json.loads((out / "attention-comparison.json").read_text())
    shutil.copytree(runs, tmp_path / "runs")
    plan = ac.make_plan(ac.parse_args(["--quick", "--device", "cpu"]))
    jobs, aliases = ac.make_jobs(plan, tmp_path / "runs", retrain=False)
    assert jobs[0]["model"] == "ksvd" and len(jobs) == len(set(aliases.values()))
    first = ac.run_job(jobs[0])
    assert first["reused"] and first["accuracy"] == report["runs"][0]["accuracy"]
    changed = ac.make_plan(ac.parse_args(["--quick", "--device", "cpu", "--epochs", "2"]))
    job = ac.make_jobs(changed, tmp_path / "runs", retrain=False)[0][0]
    assert not ac.run_job(job)["reused"]  # another budget: the stored checkpoint does not match, so it retrains
    assert ac.run_job(job)["reused"]


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "--jobs"),
    (["--epochs", "x"], "--epochs"),
    (["--device", "tpu"], "--device"),
    (["--num-samples", "-1"], "--num-samples"),
])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], message: str, capsys) -> None:
    ac = load_benchmark("attention_comparison")
    with pytest.raises(SystemExit) as exc:
        ac.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_reports_agree_with_each_other(quick_run) -> None:
    out, _, _ = quick_run
    report = json.loads((out / "attention-comparison.json").read_text())
    md = (out / "attention-comparison.md").read_text()
    assert "Quick mode" in md and "attention-maps.png" in md and "attention-scaling.png" in md
    assert "static token count" in md  # the Linformer caveat is stated
    for name, row in report["accuracy"].items():
        assert f"| {name}" in md and f"{100 * row['accuracy']:.2f} %" in md
