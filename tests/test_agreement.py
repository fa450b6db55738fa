"""The service and `snodevit score` agree: one rule for bad files, one for parameters and their defaults.

Each test feeds the same input to both and compares what comes out:

* the service's ``/classify`` path, run in process: ``Engine.check`` -> ``Engine.read_upload`` ->
  ``Engine.classify`` (what ``SNodeViTService.classify`` does, without BentoML), with the API's defaults
  (``ServiceSettings().num_samples`` / ``.top_k``, no seed, no alpha);
* the ``snodevit score`` command line (``snodevit.cli.main``), with none of its flags for the same parameters.

Both open the same tiny gated model (``service.testing.make_tiny_model``) with the defaults of each side, and
both resolve precision "auto" to the same precision, also on a CPU with native bf16 (simulated).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import snodevit.inference.precision
from service.engine import Engine
from service.errors import ServiceError
from service.settings import ServiceSettings
from service.testing import make_tiny_model
from snodevit.cli.main import main
from snodevit.data import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, IMAGE_ERROR_CODES
from snodevit.inference.params import DEFAULT_NUM_SAMPLES, MAX_SEED, default_alpha
from snodevit.scoring import ScoreSettings, record_row

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXAMPLES = Path(__file__).parent.parent / "examples"
#: Digits and out-of-distribution images (the gate sends grey / noise to review as out of distribution).
GOOD_IMAGES = (EXAMPLES / "digit_7.png", EXAMPLES / "digit_0.png", EXAMPLES / "ood" / "grey.png",
               EXAMPLES / "ood" / "noise.png")
QUIET = ["--no-progress", "--workers", "0"]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file contents, the error code both must answer with)."""
    png = (EXAMPLES / "digit_7.png").read_bytes()
    jpeg = _encoded(Image.open(EXAMPLES / "digit_7.png").convert("L"), "JPEG")
    return {
        "empty.png": (b"", "empty_body"),
        "truncated.png": (png[:60], "truncated_image"),
        "text.png": (b"just some text, not pixels\n", "not_an_image"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" '
                        b'height="8"/></svg>', "not_an_image"),
        # one pixel over the cap, refused on the header: 1 bit per pixel keeps the file at 2 KB
        "huge.png": (_encoded(Image.new("1", (4097, 4097)), "PNG"), "too_many_pixels"),
        "corrupt.jpg": (jpeg[:20] + bytes(200) + jpeg[220:], "corrupt_image"),
        "truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated_image"),
        "icon.ico": (_encoded(Image.new("L", (16, 16)), "ICO"), "unsupported_format"),
        "large.png": (png + bytes(DEFAULT_MAX_BYTES + 1 - len(png)), "too_large"),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("agreement") / "model", gate=True)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    """The service's engine with the service's default settings, opened as the service opens it."""
    instance = Engine.open(model_dir, ServiceSettings(), name="snodevit-test", tag="snodevit-test:1")
    yield instance
    instance.close()


def classify(engine: Engine, path: Path, **params: Any) -> dict[str, Any]:
    """What ``/classify`` answers for the file at ``path``: its record, or ``{"error": code}``.

    Parameters left out take the API's defaults (``SNodeViTService.classify``'s signature).
    """
    settings = engine.settings
    kwargs = {"num_samples": settings.num_samples, "seed": None, "top_k": settings.top_k, "alpha": None, **params}
    try:
        checked = engine.check(**kwargs)
        data = engine.read_upload(path, "image")
        [(record, _)], _ = asyncio.run(engine.classify([data], checked, endpoint="classify"))
    except ServiceError as err:
        return {"error": err.error}
    return record


def score(model_dir: Path, out: Path, inputs: list[Path], *flags: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """``snodevit score`` on ``inputs`` into ``out`` (JSON Lines): exit code and rows by file name."""
    code = main(["score", *map(str, inputs), "--model", str(model_dir), "--out", str(out), *QUIET, *flags])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, {Path(r["path"]).name: r for r in rows}


# --------------------------------------------------------------------------------------------- bad files
def test_the_same_bad_file_gets_the_same_error_code(tmp_path: Path, model_dir: Path, engine: Engine) -> None:
    files = hostile_files()
    assert {code for _, code in files.values()} <= set(IMAGE_ERROR_CODES)
    paths = []
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    service_codes = {p.name: classify(engine, p).get("error") for p in paths}
    code, rows = score(model_dir, tmp_path / "rows.jsonl", paths)
    cli_codes = {name: row["error"] for name, row in rows.items()}
    assert code == 1 and len(rows) == len(files)  # every file has its row, all of them errors
    assert cli_codes == service_codes
    assert service_codes == {name: expected for name, (_, expected) in files.items()}
    assert ServiceSettings().max_bytes == ScoreSettings().max_bytes == DEFAULT_MAX_BYTES
    assert ServiceSettings().max_pixels == ScoreSettings().max_pixels == DEFAULT_MAX_PIXELS


# --------------------------------------------------------------------------------------------- defaults
def test_no_parameters_give_the_same_samples_alpha_and_top_k(tmp_path: Path, model_dir: Path,
                                                            engine: Engine) -> None:
    """With nothing asked for, both use S = DEFAULT_NUM_SAMPLES, the smallest fitted alpha and the same top_k;
    the service draws a seed and reports it, `snodevit score` uses seed 0."""
    cal = engine.loaded.calibration
    assert len(cal.conformal_thresholds) > 1  # so "the smallest alpha" is a choice that can go wrong
    answer = classify(engine, GOOD_IMAGES[0])
    code, rows = score(model_dir, tmp_path / "rows.jsonl", [GOOD_IMAGES[0]])
    row = rows[GOOD_IMAGES[0].name]
    assert code == 0
    assert row["num_samples"] == answer["num_samples"] == DEFAULT_NUM_SAMPLES
    assert row["alpha"] == answer["alpha"] == default_alpha(cal) == min(float(a) for a in cal.conformal_thresholds)
    assert len(row["top_k"]) == len(answer["top_k"]) == ServiceSettings().top_k == ScoreSettings().top_k
    assert row["seed"] == ScoreSettings().seed == 0 and 0 <= answer["seed"] <= MAX_SEED


def test_the_same_image_and_seed_get_the_same_answer(tmp_path: Path, model_dir: Path, engine: Engine) -> None:
    """Every field of a `snodevit score` row (batch size 1: bit-identical to a lone request) is the service's
    answer record for that image and seed, other parameters left to their defaults; for seed 0 (the CLI's
    default) and for the seed the service drew."""
    drawn = classify(engine, GOOD_IMAGES[0])["seed"]
    for seed, flags in ((0, []), (drawn, ["--seed", str(drawn)])):
        code, rows = score(model_dir, tmp_path / f"seed{seed}.jsonl", list(GOOD_IMAGES), "--batch-size", "1", *flags)
        assert code == 0 and len(rows) == len(GOOD_IMAGES)
        for path in GOOD_IMAGES:
            answer = classify(engine, path, seed=seed)
            row = rows[path.name]
            assert row == record_row(row["path"], answer, None), path.name
            assert (row["label"], row["confidence"], row["decision"], row["reason_code"], row["prediction_set"]) == \
                (answer["label"], answer["confidence"], answer["decision"], answer["reason_code"],
                 answer["prediction_set"])
    reasons = {row["reason_code"] for row in rows.values()}
    assert "out_of_distribution" in reasons  # the gate's decisions are among those compared


# --------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("pinned", [None, "fp32", "bf16"])
def test_auto_precision_is_one_answer_for_both_on_a_native_bf16_cpu(tmp_path: Path, model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture,
                                                                     pinned: str | None) -> None:
    """On a CPU with native bf16 (simulated; this CPU emulates bf16, with the same answers) "auto" is one precision
    for the service, built from its defaults or from its environment as `bentoml serve` builds it, and for
    `snodevit score` without --precision, whether $SNODEVIT_PRECISION pins it or not (the test run pins fp32);
    both report it, and one image and seed get the same answer."""
    monkeypatch.setattr(snodevit.inference.precision, "cpu_has_bf16", lambda: True)
    if pinned is None:
        monkeypatch.delenv("SNODEVIT_PRECISION", raising=False)
    else:
        monkeypatch.setenv("SNODEVIT_PRECISION", pinned)
    want = pinned or "bf16"
    image, seed = GOOD_IMAGES[0], 7
    code, rows = score(model_dir, tmp_path / "rows.jsonl", [image], "--batch-size", "1", "--seed", str(seed),
                       "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["precision"] == report["settings"]["precision"] == want
    for settings in (ServiceSettings(), ServiceSettings.from_env(only=("precision",))):
        engine = Engine.open(model_dir, settings, name="snodevit-test", tag="snodevit-test:1")
        try:
            assert engine.info.precision == want, settings.precision
            answer = classify(engine, image, seed=seed)
        finally:
            engine.close()
        assert rows[image.name] == record_row(rows[image.name]["path"], answer, None), settings.precision


# --------------------------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize(("name", "value"), [
    ("num_samples", 0), ("num_samples", "sometimes"), ("seed", -1), ("seed", MAX_SEED + 1), ("alpha", 0.0),
    ("alpha", 1.5),
])
def test_the_same_bad_parameter_is_refused_by_both(tmp_path: Path, model_dir: Path, engine: Engine, name: str,
                                                   value: Any, capsys: pytest.CaptureFixture) -> None:
    """The service answers ``invalid_parameter`` naming it; `snodevit score` exits 2 naming it."""
    answer = classify(engine, GOOD_IMAGES[0], **{name: value})
    assert answer == {"error": "invalid_parameter"}
    flag = "--" + name.replace("_", "-")
    try:
        code, _ = score(model_dir, tmp_path / "rows.jsonl", [GOOD_IMAGES[0]], flag, str(value))
    except SystemExit as stop:  # refused while parsing the command line
        code = int(stop.code or 0)
    assert code == 2 and name in capsys.readouterr().err
    assert not (tmp_path / "rows.jsonl").exists()
