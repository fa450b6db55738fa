"""`snodevit score --engine ray`: a real local Ray (2 CPUs, 2 model actors) gives the local engine's rows.

The reference is the local engine (itself tested against the service's path in test_score.py): the same paths in
the same order, the same labels, decisions, reasons, sets and errors, and numbers within float32 rounding (the
batch shapes differ, so the matrix kernels sum in another order). The folder mixes real MNIST digits with hostile
files: empty, random bytes, a truncated PNG, text named .png, and a file name that is not UTF-8.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from snodevit.cli import score as score_command
from snodevit.cli.main import main
from snodevit.data.sets import load_dataset

from test_score import model_dir  # noqa: F401 - the same small calibrated model as the local engine's tests

FLOATS = ("confidence", "uncertainty_total", "uncertainty_aleatoric", "uncertainty_epistemic", "uncertainty_std")
RAY = ["--engine", "ray", "--concurrency", "2", "--num-cpus", "1", "--no-progress"]
LOCAL = ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder (class sub-folders, so the rows carry true labels) of 16 digits and 5 hostile files."""
    images, labels = load_dataset("mnist5k").raw("test")  # uint8 (N, 1, 28, 28), int64 (N,)
    root = tmp_path_factory.mktemp("images")
    pngs = []
    for i in range(16):
        (root / str(int(labels[i]))).mkdir(exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(images[i][0].numpy()).save(buf, "PNG")
        pngs.append(buf.getvalue())
        (root / str(int(labels[i])) / f"digit{i:02d}.png").write_bytes(pngs[-1])
    hostile = root / "9"  # the last class folder: a local run's first batch holds none of them
    hostile.mkdir(exist_ok=True)
    (hostile / "empty.png").write_bytes(b"")
    (hostile / "noise.jpg").write_bytes(os.urandom(3000))
    (hostile / "truncated.png").write_bytes(pngs[1][: len(pngs[1]) // 2])
    (hostile / "text.png").write_text("not an image\n")
    with open(os.path.join(os.fsencode(hostile), b"name-\xff.png"), "wb") as f:  # not UTF-8, a good image
        f.write(pngs[2])
    return root


def _score(*args: Any) -> int:
    return main(["score", *map(str, args)])


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]


def _assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        for key, value in w.items():
            if key in FLOATS and value is not None:
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (w["path"], key)
            elif key == "top_k" and value is not None:
                assert [t["label"] for t in g[key]] == [t["label"] for t in value]
                assert [t["probability"] for t in g[key]] == pytest.approx([t["probability"] for t in value],
                                                                           abs=1e-6)
            else:
                assert g[key] == value, (w["path"], key)


def _interrupt_after_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next local run stop with KeyboardInterrupt once its first batch is in the partial file."""
    real = score_command.score_files

    def stop(n: int) -> None:
        raise KeyboardInterrupt

    def patched(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(score_command, "score_files", real)  # only the next run
        return real(*args, on_batch=stop, **kwargs)

    monkeypatch.setattr(score_command, "score_files", patched)


def test_ray_resumes_a_local_run_and_its_rows_equal_the_local_engines(
        tmp_path: Path, model_dir: Path, folder: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    common = [folder, "--model", model_dir, "--num-samples", 4, "--seed", 7]
    assert _score(*common, "--out", tmp_path / "local.jsonl", "--batch-size", 4, *LOCAL) == 1
    local = _rows(tmp_path / "local.jsonl")
    assert len(local) == 21
    assert sorted(r["error"] for r in local if r["error"]) == ["empty_body", "not_an_image", "not_an_image",
                                                                "truncated_image"]
    assert any("\udcff" in r["path"] and r["error"] is None for r in local)  # the non-UTF-8 name was scored

    out, partial = tmp_path / "run.jsonl", tmp_path / "run.jsonl.partial"
    _interrupt_after_first_batch(monkeypatch)
    assert _score(*common, "--out", out, "--batch-size", 5, *LOCAL) == 130
    first = [json.loads(line) for line in partial.read_bytes().splitlines()[1:]]
    assert len(first) == 5 and not any(r["error"] for r in first)  # Ray meets every hostile file
    capsys.readouterr()
    # another batch size on Ray: the rows must not depend on how images share a batch (each keeps the seed)
    assert _score(*common, "--out", out, "--batch-size", 3, "--resume", *RAY, "--json") == 1
    figures = json.loads(capsys.readouterr().out)
    assert (figures["engine"], figures["resumed_rows"], figures["new_rows"]) == ("ray", 5, 16)
    _assert_same_rows(_rows(out), local)
    assert not partial.exists()


def test_bad_engine_options_are_refused(tmp_path: Path, model_dir: Path, folder: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _score(folder, "--model", model_dir, "--out", tmp_path / "x.csv", "--engine", "ray", "--num-cpus", "-1")
    assert exit_info.value.code == 2
    assert "--num-cpus: expected a number >= 0" in capsys.readouterr().err
    assert _score(folder, "--model", model_dir, "--out", tmp_path / "x.csv", "--engine", "ray", "--num-cpus", "0",
                  "--no-progress") == 2
    assert "num_cpus must be a number > 0" in capsys.readouterr().err
