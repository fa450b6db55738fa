"""`snodevit score` writing to a full disk and to a read-only folder: a clear error, exit code 74, no output file and
no temporary file left, and ``--resume`` finishing the job once there is room.

The disk is a real tmpfs of a few pages (``benchmarks/faults_disk.py``), so the errors are the kernel's own
``ENOSPC`` and ``EROFS``; where this process may not mount one (not root), the tests are skipped.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snodevit.cli.main import main
from snodevit.data.sets import load_dataset

from _benchmarks import load_benchmark
from test_score import QUIET, _write_digits, model_dir  # noqa: F401 - the fixture

disk = load_benchmark("faults_disk")
EXIT_WRITE = 74


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("in")
    _write_digits(root, load_dataset("mnist5k").raw("test"), range(40))
    return root


def _score(inputs: Path, model_dir: Path, out: Path, *extra: str) -> int:
    return main(["score", str(inputs), "--model", str(model_dir), "--batch-size", "4", "--num-samples", "4",
                 *QUIET, "--out", str(out), *extra])


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs folders under ``tmp_path`` (skipping the test where that is not permitted)."""
    with contextlib.ExitStack() as stack:
        def mount(name: str, size: int, read_only: bool = False) -> Path:
            try:
                return stack.enter_context(disk.small_tmpfs(tmp_path / name, size, read_only=read_only))
            except disk.MountUnavailable as err:  # pragma: no cover - depends on the machine
                pytest.skip(str(err))

        yield mount


def test_a_full_disk_stops_with_exit_74_keeps_whole_rows_and_resume_finishes(
        tmp_path: Path, inputs: Path, model_dir: Path, tmpfs: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    mount = tmpfs("disk", 16 * 1024)
    assert _score(inputs, model_dir, tmp_path / "ref.jsonl") == 0
    reference = (tmp_path / "ref.jsonl").read_text().splitlines()
    out = mount / "run.jsonl"
    capsys.readouterr()
    assert _score(inputs, model_dir, out) == EXIT_WRITE
    err = capsys.readouterr().err
    assert "No space left on device (ENOSPC)" in err and "--resume" in err and str(out) in err
    assert disk.files_in(mount) == ["run.jsonl.partial"]  # no output, no temporary file
    lines = (mount / "run.jsonl.partial").read_bytes().split(b"\n")
    whole = [json.loads(line) for line in lines[1:-1]]  # the header, whole rows, then at most one torn line
    assert 0 < len(whole) < 40 and len({r["path"] for r in whole}) == len(whole)

    disk.grow(mount, 4 * 2**20)  # room again, as after freeing space
    assert _score(inputs, model_dir, out, "--resume") == 0
    assert out.read_text().splitlines() == reference  # nothing lost, nothing twice, same numbers
    assert disk.files_in(mount) == ["run.jsonl"]


def test_a_read_only_folder_is_refused_with_exit_74_and_nothing_written(
        inputs: Path, model_dir: Path, tmpfs: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    mount = tmpfs("ro", 64 * 1024, read_only=True)
    capsys.readouterr()
    assert _score(inputs, model_dir, mount / "run.csv") == EXIT_WRITE
    err = capsys.readouterr().err
    assert "Read-only file system (EROFS)" in err and "nothing was written" in err
    assert disk.files_in(mount) == []
