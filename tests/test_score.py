"""`snodevit score`: rows against the shared inference function, broken files, resume, output formats, metrics.

Every test runs the real command line (``snodevit.cli.main``) on real MNIST digits written as PNG files, with a
tiny random model; the references are computed independently with ``open_model`` + ``preprocess`` +
``prediction_records`` (the service's path).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import snodevit
import snodevit.scoring.output
from calibration import calibration_summary
from snodevit.cli import score as score_command
from snodevit.cli.main import main
from snodevit.data.sets import load_dataset
from snodevit.data import load_image_file, preprocess
from snodevit.inference.backends import open_model
from snodevit.inference.records import prediction_records
from snodevit.scoring import ROW_FIELDS, record_row

SMALL = dict(snodevit.MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
CALIBRATION = {"temperature": 1.3, "conformal_score": "aps", "conformal_thresholds": {"0.05": 0.9},
               "decision_score": "confidence", "decision_threshold": 0.5, "target_risk": 0.02}
FLOATS = ("confidence", "uncertainty_total", "uncertainty_aleatoric", "uncertainty_epistemic", "uncertainty_std",
          "alpha")
INTS = ("class_index", "seed", "num_samples")
QUIET = ["--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_dataset("mnist5k").raw("test")  # uint8 (N, 1, 28, 28), int64 (N,)
    return images[:40], labels[:40]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = snodevit.create_model("tiny", **SMALL)
    torch.nn.init.normal_(m.head.weight)  # the head starts at zero; give the tests non-trivial answers
    d = tmp_path_factory.mktemp("model")
    snodevit.save_model(m, d, meta={"class_names": [str(i) for i in range(10)],
                                    "preprocessing": load_dataset("mnist5k").preprocessing.to_dict(),
                                    "calibration": CALIBRATION})
    return d


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buf, "PNG")
    return buf.getvalue()


def _write_digits(root: Path, digits: tuple[torch.Tensor, torch.Tensor], idx: range, *,
                  class_folders: bool = False) -> list[Path]:
    images, labels = digits
    paths = []
    for i in idx:
        folder = root / str(int(labels[i])) if class_folders else root
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"digit{i:03d}.png"
        p.write_bytes(_png(images[i]))
        paths.append(p)
    return paths


def _score(*argv: Any) -> int:
    return main(["score", *map(str, argv)])


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference(model_dir: Path, path: Path, num_samples: int, seed: int, top_k: int = 3) -> dict[str, Any]:
    """The service's answer for one image: decode, preprocess, the shared predict alone, prediction_records."""
    loaded = open_model(model_dir, device="cpu")
    x = preprocess(load_image_file(path), loaded.preprocessing)
    pred = loaded.predict(x[None], num_samples=num_samples, seed=seed)
    return prediction_records(pred, loaded.class_names, top_k)[0]


# --------------------------------------------------------------------------------------------- broken files
def test_a_folder_with_broken_files_gives_one_row_per_file_and_exit_code_1(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor],
        capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "in"
    good = _write_digits(root, digits, range(5)) + _write_digits(root / "nested" / "deeper", digits, range(5, 7))
    truncated = root / "truncated.png"
    truncated.write_bytes(_png(digits[0][7])[:60])
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    text = root / "notes.png"
    text.write_text("this is not an image\n")
    empty = root / "nested" / "empty.png"
    empty.touch()
    huge = root / "huge.png"
    Image.new("L", (64, 64), 255).save(huge)  # 4096 pixels > --max-pixels below
    (root / "readme.txt").write_text("skipped: not an image extension")
    (root / ".hidden.png").write_bytes(_png(digits[0][8]))  # skipped: hidden
    out = tmp_path / "out.jsonl"

    code = _score(root, "--model", model_dir, "--out", out, "--max-pixels", 1000, "--batch-size", 3, "--json",
                  *QUIET)
    figures = json.loads(capsys.readouterr().out)
    rows = _jsonl(out)

    assert code == 1
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == 12
    assert set(by_path) == {str(p) for p in [*good, truncated, corrupt, text, empty, huge]}
    expected_errors = {truncated: "truncated_image", corrupt: "corrupt_image", text: "not_an_image",
                       empty: "empty_body", huge: "too_many_pixels"}
    for p, err in expected_errors.items():
        row = by_path[str(p)]
        assert row["error"] == err and str(p) in row["error_detail"]
        assert row["label"] is None and row["confidence"] is None
    for p in good:
        row = by_path[str(p)]
        assert row["error"] is None and row["error_detail"] is None
        assert row["label"] in [str(i) for i in range(10)] and 0 < row["confidence"] <= 1
    assert figures["images"] == 12 and figures["scored"] == 7 and figures["failed"] == 5
    assert figures["errors"] == {"truncated_image": 1, "corrupt_image": 1, "not_an_image": 1, "empty_body": 1,
                                 "too_many_pixels": 1}
    assert figures["metrics"] is None  # no labels
    assert not out.with_name("out.jsonl.partial").exists()


def test_all_good_images_exit_0(tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    _write_digits(tmp_path / "in", digits, range(3))
    assert _score(tmp_path / "in", "--model", model_dir, "--out", tmp_path / "o.csv", *QUIET) == 0


# ------------------------------------------------------------------------------------- same numbers as service
def test_rows_are_exactly_prediction_records_of_the_shared_predict(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    paths = _write_digits(tmp_path / "in", digits, range(6))
    out = tmp_path / "o.jsonl"
    # One image per forward pass: the float32 matrix products then see the same shapes as a lone request.
    assert _score(tmp_path / "in", "--model", model_dir, "--out", out, "--num-samples", 5, "--seed", 1234,
                  "--top-k", 4, "--batch-size", 1, *QUIET) == 0
    rows = {r["path"]: r for r in _jsonl(out)}
    for p in paths:
        ref = record_row(str(p), _reference(model_dir, p, 5, 1234, top_k=4), None)
        assert rows[str(p)] == ref
    assert rows[str(paths[0])]["seed"] == 1234 and rows[str(paths[0])]["num_samples"] == 5


def test_batched_rows_agree_with_lone_requests_to_float32_rounding(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    paths = _write_digits(tmp_path / "in", digits, range(10))
    out = tmp_path / "o.jsonl"
    assert _score(tmp_path / "in", "--model", model_dir, "--out", out, "--num-samples", 4, "--seed", 7,
                  "--batch-size", 4, *QUIET) == 0
    rows = {r["path"]: r for r in _jsonl(out)}
    for p in paths:
        ref = record_row(str(p), _reference(model_dir, p, 4, 7), None)
        got = rows[str(p)]
        for k in ROW_FIELDS:
            if k in FLOATS:
                assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
            elif k == "top_k":
                assert [t["label"] for t in got[k]] == [t["label"] for t in ref[k]]
                assert [t["probability"] for t in got[k]] == pytest.approx([t["probability"] for t in ref[k]],
                                                                           rel=1e-5, abs=1e-6)
            elif k != "reason":  # the reason prints the confidence to 4 decimals
                assert got[k] == ref[k], k


def test_decoding_in_worker_processes_gives_the_same_rows(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    _write_digits(tmp_path / "in", digits, range(12))
    (tmp_path / "in" / "bad.png").write_text("nope")
    for name, workers in (("w0.jsonl", 0), ("w2.jsonl", 2)):
        assert _score(tmp_path / "in", "--model", model_dir, "--out", tmp_path / name, "--batch-size", 4,
                      "--workers", workers, "--no-progress") == 1
    assert _jsonl(tmp_path / "w0.jsonl") == _jsonl(tmp_path / "w2.jsonl")


# ----------------------------------------------------------------------------------------------------- resume
def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n_batches: int) -> None:
    """Make the next run stop with KeyboardInterrupt right after its n-th batch has been written."""
    real = score_command.score_files

    def stop(n: int) -> None:
        if n == n_batches:
            raise KeyboardInterrupt

    def patched(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(score_command, "score_files", real)  # only the next run
        return real(*args, on_batch=stop, **kwargs)

    monkeypatch.setattr(score_command, "score_files", patched)


def test_an_interrupted_run_resumed_gives_exactly_the_rows_of_an_uninterrupted_run(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _write_digits(tmp_path / "in", digits, range(20), class_folders=True)
    (tmp_path / "in" / str(int(digits[1][0])) / "broken.png").write_bytes(b"")
    args = [tmp_path / "in", "--model", model_dir, "--batch-size", 3, "--num-samples", 3, *QUIET]
    assert _score(*args, "--out", tmp_path / "ref.jsonl") == 1
    reference = _jsonl(tmp_path / "ref.jsonl")

    out = tmp_path / "run.jsonl"
    partial = tmp_path / "run.jsonl.partial"
    _interrupt_after(monkeypatch, 3)
    assert _score(*args, "--out", out) == 130
    assert not out.exists()
    lines = partial.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 3 * 3  # header + three batches
    # A kill in the middle of a write leaves a torn last line: it must be dropped, not duplicated or fatal.
    with partial.open("ab") as f:
        f.write(lines[-1][: len(lines[-1]) // 2])
    assert _score(*args, "--out", out) == 2  # neither --resume nor --overwrite
    assert _score(*args, "--out", out, "--resume", "--seed", 1) == 2  # other settings: refused
    _interrupt_after(monkeypatch, 2)
    assert _score(*args, "--out", out, "--resume") == 130  # interrupted twice
    assert _score(*args, "--out", out, "--resume") == 1

    resumed = _jsonl(out)
    assert resumed == reference  # same rows, same order, nothing lost or duplicated
    assert len({r["path"] for r in resumed}) == len(resumed) == 21
    assert not partial.exists()
    assert _score(*args, "--out", out, "--resume") == 2  # already complete


def test_a_killed_process_resumes_without_losing_or_repeating_rows(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    _write_digits(tmp_path / "in", digits, range(40))
    args = [tmp_path / "in", "--model", model_dir, "--batch-size", 1, "--num-samples", 16, *QUIET]
    out = tmp_path / "run.csv"
    partial = tmp_path / "run.csv.partial"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "snodevit.cli", "score", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    done = partial.read_bytes().count(b"\n") - 1
    assert 3 <= done < 40 and not out.exists()

    assert _score(*args, "--out", out, "--resume") == 0
    assert _score(*args, "--out", tmp_path / "ref.csv") == 0
    with out.open(newline="") as f1, (tmp_path / "ref.csv").open(newline="") as f2:
        resumed, reference = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert resumed == reference and len(resumed) == 40


# ----------------------------------------------------------------------------------------------------- formats
def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    """Undo the CSV encoding: empty cell -> None, JSON text for the lists, numbers parsed."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v == "":
            out[k] = None
        elif k in ("top_k", "prediction_set"):
            out[k] = json.loads(v)
        elif k in FLOATS:
            out[k] = float(v)
        elif k in INTS:
            out[k] = int(v)
        else:
            out[k] = v
    return out


def test_csv_jsonl_and_parquet_hold_the_same_rows(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snodevit.scoring.output, "_CHUNK_ROWS", 4)  # several Parquet row groups
    _write_digits(tmp_path / "in", digits, range(10), class_folders=True)
    (tmp_path / "in" / str(int(digits[1][0])) / "bad.png").write_text("nope")
    args = [tmp_path / "in", "--model", model_dir, "--batch-size", 4, *QUIET]
    for ext in ("csv", "jsonl", "parquet"):
        assert _score(*args, "--out", tmp_path / f"o.{ext}") == 1
    rows = _jsonl(tmp_path / "o.jsonl")
    with (tmp_path / "o.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == ROW_FIELDS
        from_csv = [_from_csv(r) for r in reader]
    table = pq.read_table(tmp_path / "o.parquet")
    assert tuple(table.column_names) == ROW_FIELDS
    assert len(rows) == 11 and list(rows[0]) == list(ROW_FIELDS)
    assert from_csv == rows
    assert table.to_pylist() == rows
    assert sum(r["error"] == "not_an_image" for r in rows) == 1
    assert all(isinstance(r["top_k"], list) and r["prediction_set"] for r in rows if r["error"] is None)


# ----------------------------------------------------------------------------------------------------- metrics
def _plain_loop(model_dir: Path, paths: list[Path], labels: list[int], num_samples: int) -> dict[str, Any]:
    loaded = open_model(model_dir, device="cpu")
    probs = torch.cat([loaded.predict(preprocess(load_image_file(p), loaded.preprocessing)[None],
                                      num_samples=num_samples, seed=0).summary.probs for p in paths])
    return calibration_summary(probs, torch.tensor(labels))


def test_an_image_folder_yields_the_accuracy_and_calibration_of_a_plain_loop(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor],
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snodevit.scoring.output, "_CHUNK_ROWS", 8)  # the labelled rows are packed in several blocks
    paths = _write_digits(tmp_path / "in", digits, range(30), class_folders=True)
    (tmp_path / "in" / str(int(digits[1][0])) / "bad.png").write_text("nope")  # failed rows do not count
    labels = [int(digits[1][i]) for i in range(30)]
    ref = _plain_loop(model_dir, paths, labels, 4)
    code = _score(tmp_path / "in", "--model", model_dir, "--out", tmp_path / "o.csv", "--num-samples", 4,
                  "--batch-size", 7, "--json", *QUIET)
    figures = json.loads(capsys.readouterr().out)
    assert code == 1
    m = figures["metrics"]
    assert figures["labelled"] == m["n_samples"] == 30
    assert figures["labelled_folders"] == [str(tmp_path / "in")]
    assert m["accuracy"] == ref["accuracy"]
    for k in ("nll", "ece", "brier", "aurc"):
        assert m[k] == pytest.approx(ref[k], abs=1e-5), k
    loaded = open_model(model_dir, device="cpu")
    sets = [set(r["prediction_set"]) for r in (
        prediction_records(loaded.predict(preprocess(load_image_file(p), loaded.preprocessing)[None],
                                          num_samples=4, seed=0), loaded.class_names)[0] for p in paths)]
    assert m["set_coverage"] == pytest.approx(sum(str(y) in s for s, y in zip(sets, labels)) / 30)
    assert m["mean_set_size"] == pytest.approx(sum(map(len, sets)) / 30)
    with (tmp_path / "o.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"]: r["true_label"] for r in rows if r["error"] == ""} == \
        {str(p): str(y) for p, y in zip(paths, labels)}

    # The same images flat, with a labels CSV (paths relative to the CSV) instead of class folders.
    flat = tmp_path / "flat"
    flat_paths = _write_digits(flat, digits, range(30))
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(
        f"flat/{p.name},{y}\n" for p, y in zip(flat_paths, labels)))
    assert _score(flat, "--labels", tmp_path / "labels.csv", "--model", model_dir, "--out", tmp_path / "f.csv",
                  "--num-samples", 4, "--batch-size", 7, "--json", *QUIET) == 0
    m2 = json.loads(capsys.readouterr().out)["metrics"]
    assert m2.keys() == m.keys() and m2["accuracy"] == m["accuracy"] and m2["n_samples"] == 30
    assert m2 == pytest.approx(m, abs=1e-5)  # other batches (sorted by name, not by class): float32 rounding


# ------------------------------------------------------------------------------------------- input forms
def test_list_files_globs_and_duplicates(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_digits(tmp_path / "in", digits, range(6))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "some.txt").write_text(f"# two images\n../in/{paths[0].name}\n\n../in/missing.png\n"
                                                 f"{paths[1]}\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.jsonl"
    code = _score("@lists/some.txt", "in/digit00[2-3].png", "in/digit000.png", "--model", model_dir,
                  "--out", out, *QUIET)
    rows = _jsonl(out)
    assert code == 1  # the missing listed file is an error row
    assert [r["path"] for r in rows] == [str(Path("in/digit000.png")), str(Path("in/missing.png")), str(paths[1]),
                                         str(Path("in/digit002.png")), str(Path("in/digit003.png"))]
    assert rows[1]["error"] == "unreadable_file"


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("case, message", [
    ("no_match", "matched"),
    ("missing_input", "does not exist"),
    ("bad_extension", "output format"),
    ("exists", "--overwrite"),
    ("bad_model", "--model"),
    ("uncalibrated_alpha", "--alpha"),
    ("unknown_label", "not classes"),
])
def test_unusable_arguments_exit_2_with_a_message(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor], case: str, message: str,
        capsys: pytest.CaptureFixture) -> None:
    _write_digits(tmp_path / "in", digits, range(2))
    (tmp_path / "empty").mkdir()
    (tmp_path / "done.csv").write_text("already here\n")
    (tmp_path / "labels.csv").write_text("in/digit000.png,seven\n")
    inputs, out, extra = [tmp_path / "in"], tmp_path / "o.csv", []
    model: Path = model_dir
    if case == "no_match":
        inputs = [tmp_path / "empty", str(tmp_path / "*.jpg")]
    elif case == "missing_input":
        inputs = [tmp_path / "nope"]
    elif case == "bad_extension":
        out = tmp_path / "o.xlsx"
    elif case == "exists":
        out = tmp_path / "done.csv"
    elif case == "bad_model":
        model = tmp_path / "no-model"
    elif case == "uncalibrated_alpha":
        extra = ["--alpha", "0.2"]
    elif case == "unknown_label":
        extra = ["--labels", tmp_path / "labels.csv"]
    code = _score(*inputs, "--model", model, "--out", out, *extra, *QUIET)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("snodevit score: error:")
    if case == "exists":
        assert (tmp_path / "done.csv").read_text() == "already here\n"


def test_argument_syntax_errors_exit_2(tmp_path: Path, model_dir: Path) -> None:
    for bad in (["--batch-size", "0"], ["--alpha", "1.5"], ["--resume", "--overwrite"]):
        with pytest.raises(SystemExit) as exc:
            _score(tmp_path, "--model", model_dir, "--out", tmp_path / "o.csv", *bad)
        assert exc.value.code == 2


# ----------------------------------------------------------------------------------------------------- onnx
def test_the_onnx_backend_scores_the_same_answers(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    pytest.importorskip("export.runtime")  # the ONNX predictor is needed
    from export import export_onnx

    model, meta = snodevit.load_model(model_dir)
    onnx_path = export_onnx(model, tmp_path / "model.onnx", meta=meta)
    _write_digits(tmp_path / "in", digits, range(8))
    common = [tmp_path / "in", "--batch-size", 4, "--num-samples", 4, *QUIET]
    assert _score(*common, "--model", model_dir, "--out", tmp_path / "t.jsonl") == 0
    assert _score(*common, "--model", onnx_path, "--backend", "onnx", "--out", tmp_path / "o.jsonl") == 0
    torch_rows, onnx_rows = _jsonl(tmp_path / "t.jsonl"), _jsonl(tmp_path / "o.jsonl")
    for t, o in zip(torch_rows, onnx_rows, strict=True):
        assert (t["path"], t["label"], t["prediction_set"], t["decision"]) == \
            (o["path"], o["label"], o["prediction_set"], o["decision"])
        assert o["confidence"] == pytest.approx(t["confidence"], abs=1e-4)
        assert o["uncertainty_epistemic"] == pytest.approx(t["uncertainty_epistemic"], abs=1e-4)


# --------------------------------------------------------------------------------------------- out-of-distribution gate
def test_rows_carry_the_gate_and_agree_with_the_service_path(tmp_path: Path,
                                                            digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A gated model: digits pass the gate, blank and noise images are sent to review as out of distribution; every
    row's gate fields equal ``prediction_records`` of the shared predict (the service's path)."""
    from service.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "gated", gate=True)
    root = tmp_path / "in"
    _write_digits(root, digits, range(6))
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        (root / f"grey{i}.png").write_bytes(_png(torch.full((1, 28, 28), 60 + 60 * i, dtype=torch.uint8)))
        (root / f"noise{i}.png").write_bytes(_png(torch.randint(0, 256, (1, 28, 28), generator=gen,
                                                                dtype=torch.uint8)))
    out = tmp_path / "rows.jsonl"
    assert _score(root, "--model", model, "--out", out, "--num-samples", 4, "--seed", 5, *QUIET) == 0
    rows = {Path(r["path"]).name: r for r in _jsonl(out)}
    assert len(rows) == 12
    for name, row in rows.items():
        ref = _reference(model, root / name, 4, row["seed"])
        assert (row["decision"], row["reason_code"], row["out_of_distribution"]) == \
            (ref["decision"], ref["reason_code"], ref["ood"]["out_of_distribution"])
        assert row["ood_score"] == pytest.approx(ref["ood"]["score"], rel=1e-5)  # batch of 12 vs 1: float32
        if name.startswith(("grey", "noise")):
            assert (row["decision"], row["reason_code"], row["out_of_distribution"]) == \
                ("review", "out_of_distribution", True), name
    assert sum(not r["out_of_distribution"] for n, r in rows.items() if n.startswith("digit")) >= 5


# --------------------------------------------------------------------------------------------- precision
def test_bf16_scoring_gives_the_bf16_answers_and_records_its_precision(
        tmp_path: Path, model_dir: Path, digits: tuple[torch.Tensor, torch.Tensor],
        capsys: pytest.CaptureFixture) -> None:
    paths = _write_digits(tmp_path / "in", digits, range(3))
    out = tmp_path / "out.jsonl"
    assert _score(*paths, "--model", model_dir, "--out", out, "--num-samples", 4, "--precision", "bf16", "--json",
                  *QUIET) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["precision"] == "bf16"
    for row in _jsonl(out):
        loaded = open_model(model_dir, device="cpu", precision="bf16")
        x = preprocess(load_image_file(Path(row["path"])), loaded.preprocessing)
        ref = prediction_records(loaded.predict(x[None], num_samples=4, seed=0), loaded.class_names, 3)[0]
        assert row["label"] == ref["label"] and row["confidence"] == pytest.approx(ref["confidence"], abs=1e-6)


def test_bf16_with_the_onnx_backend_is_a_usage_error(tmp_path: Path, model_dir: Path,
                                                     digits: tuple[torch.Tensor, torch.Tensor],
                                                     capsys: pytest.CaptureFixture) -> None:
    paths = _write_digits(tmp_path / "in", digits, range(1))
    code = _score(*paths, "--model", model_dir, "--out", tmp_path / "o.csv", "--backend", "onnx", "--precision",
                  "bf16", *QUIET)
    err = capsys.readouterr().err
    assert code == 2 and "precision 'bf16' applies to the torch backend" in err and "Traceback" not in err
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.csv.partial").exists()
