"""Service tier 2 (HTTP): every endpoint through the ASGI app, the bad-input table, determinism, batching.

``docs/bad-inputs.md`` holds the table that :func:`test_bad_inputs_table_matches_the_docs` produces by sending
each bad input; regenerate it with ``SNODEVIT_UPDATE_DOCS=1 pytest tests/test_service_http.py -k table``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.testing import prepare_service
from snodevit.inference.records import prediction_records

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

ROOT = Path(__file__).parent.parent
DIGIT_7 = (ROOT / "examples" / "digit_7.png").read_bytes()
DIGIT_2 = (ROOT / "examples" / "digit_2.png").read_bytes()
DOC = ROOT / "docs" / "bad-inputs.md"
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"
MiB = 2**20


@pytest.fixture(scope="module")
def prepared():
    return prepare_service()


@pytest.fixture(scope="module")
def client(prepared) -> Iterator[Any]:
    from starlette.testclient import TestClient

    with TestClient(prepared.service_class.to_asgi()) as c:
        yield c


def without_timing(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "timing"}


def png_header(width: int, height: int) -> bytes:
    """A valid, tiny PNG that declares width x height pixels (a decompression bomb if large)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(fmt: str, mode: str = "L", size: tuple[int, int] = (28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- endpoints


def test_classify_multipart_and_raw_give_the_same_answer(client) -> None:
    multipart = client.post("/classify", files={"image": ("seven.png", DIGIT_7, "image/png")},
                            data={"seed": "21", "num_samples": "8", "top_k": "5"})
    raw = client.post("/classify?seed=21&num_samples=8&top_k=5", content=DIGIT_7,
                      headers={"Content-Type": "image/png"})
    octets = client.post("/classify?seed=21&num_samples=8&top_k=5", content=DIGIT_7,
                         headers={"Content-Type": "application/octet-stream"})
    assert multipart.status_code == raw.status_code == octets.status_code == 200
    a = multipart.json()
    assert without_timing(a) == without_timing(raw.json()) == without_timing(octets.json())
    assert len(a["top_k"]) == 5 and a["seed"] == 21 and a["model"]["name"] == "snodevit-test"
    # the test run pins SNODEVIT_PRECISION=fp32 (tests/conftest.py); the test model was calibrated in fp32
    assert a["model"]["precision"] == "fp32" and a["model"]["calibration_precision"] == "fp32"
    assert set(a) == {"label", "class_index", "confidence", "top_k", "uncertainty", "prediction_set", "alpha",
                      "decision", "reason_code", "reason", "ood", "seed", "num_samples", "model", "timing"}
    assert set(a["ood"]) == {"score", "threshold", "out_of_distribution", "score_name"}


def test_same_seed_same_json(client) -> None:
    answers = [client.post("/classify", files={"image": ("a.png", DIGIT_7, "image/png")}, data={"seed": "5"}).json()
               for _ in range(3)]
    assert without_timing(answers[0]) == without_timing(answers[1]) == without_timing(answers[2])
    drawn = client.post("/classify", files={"image": ("a.png", DIGIT_7, "image/png")}).json()
    again = client.post("/classify", files={"image": ("a.png", DIGIT_7, "image/png")},
                        data={"seed": str(drawn["seed"])}).json()
    assert without_timing(again) == without_timing(drawn)


def test_num_samples_auto_reports_the_samples_used(client, prepared) -> None:
    from snodevit.data import decode_image, normalize, to_uint8_tensor
    from snodevit.inference.backends import open_model
    from service.store import resolve

    auto = client.post("/classify", files={"image": ("a.png", DIGIT_7, "image/png")},
                       data={"seed": "6", "num_samples": "auto"})
    raw = client.post("/classify?seed=6&num_samples=AUTO", content=DIGIT_7, headers={"Content-Type": "image/png"})
    assert auto.status_code == raw.status_code == 200
    body = auto.json()
    assert without_timing(body) == without_timing(raw.json())
    assert 8 <= body["num_samples"] <= 32  # rounds of 8 up to SNODEVIT_AUTO_MAX_SAMPLES (default 32)
    loaded = open_model(resolve(prepared.tag), device="cpu")
    x = normalize(to_uint8_tensor(decode_image(DIGIT_7), loaded.preprocessing), loaded.preprocessing)[None]
    plain = prediction_records(loaded.predict(x, num_samples=body["num_samples"], seed=[6]), loaded.class_names, 3)[0]
    assert (body["label"], body["decision"]) == (plain["label"], plain["decision"])
    assert body["confidence"] == pytest.approx(plain["confidence"], abs=1e-5)
    assert client.get("/metadata").json()["limits"]["num_samples_auto_max"] == 32
    files = [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate([DIGIT_7, DIGIT_2])]
    batch = client.post("/classify_batch", data={"seed": "6", "num_samples": "auto"}, files=files)
    assert batch.status_code == 200
    first = batch.json()["results"][0]
    assert (first["label"], first["decision"], first["num_samples"]) == (body["label"], body["decision"],
                                                                         body["num_samples"])


def test_classify_batch(client) -> None:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate([DIGIT_7, DIGIT_2, DIGIT_7])]
    r = client.post("/classify_batch", files=files, data={"seed": "3", "top_k": "2"})
    assert r.status_code == 200
    body = r.json()
    assert [x["index"] for x in body["results"]] == [0, 1, 2]
    assert all(len(x["top_k"]) == 2 and x["seed"] == 3 for x in body["results"])
    assert body["results"][0]["timing"]["batch_size"] == 3
    assert without_timing({**body["results"][0], "index": 0}) == without_timing({**body["results"][2], "index": 0})


def test_explain_and_explain_image(client) -> None:
    e = client.post("/explain", files={"image": ("a.png", DIGIT_7, "image/png")}, data={"seed": "2"})
    assert e.status_code == 200
    body = e.json()
    assert body["grid_size"] == 7 and len(body["layers"]) == body["depth"] == 2 and len(body["rollout"]) == 7
    assert body["prediction"]["seed"] == 2
    png = client.post("/explain_image", files={"image": ("a.png", DIGIT_7, "image/png")}, data={"seed": "2"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-snodevit-label"] == body["prediction"]["label"]
    assert png.headers["x-snodevit-reason-code"] == body["prediction"]["reason_code"]
    assert Image.open(io.BytesIO(png.content)).size == (224, 224)
    raw = client.post("/explain_image?seed=2", content=DIGIT_7, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.content == png.content
    layer = client.post("/explain_image?seed=2&layer=0", content=DIGIT_7, headers={"Content-Type": "image/png"})
    assert layer.status_code == 200 and layer.content != png.content


def test_metadata_health_and_docs(client) -> None:
    md = client.get("/metadata")
    assert md.status_code == 200
    body = md.json()
    assert body["classes"] == [str(i) for i in range(10)] and body["calibration"]["alphas"] == [0.05, 0.1]
    assert body["calibration"]["figures"]["ece_after"] == 0.02  # meta.json's calibration_figures
    assert body["limits"]["max_bytes"] == 10 * MiB and "/classify" in body["uploads"]
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    schemas = spec["components"]["schemas"]
    assert set(schemas["ClassifyResponseIODescriptor"]["properties"]) == {
        "label", "class_index", "confidence", "top_k", "uncertainty", "prediction_set", "alpha", "decision",
        "reason_code", "reason", "ood", "seed", "num_samples", "model", "timing"}
    form = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"]
    assert (form["properties"]["num_samples"]["minimum"], form["properties"]["num_samples"]["maximum"]) == (1, 256)
    assert spec["paths"]["/explain_image"]["post"]["responses"]["200"]["content"].keys() == {"image/png"}


def test_metrics_count_samples_decisions_and_errors(client) -> None:
    client.post("/classify", files={"image": ("a.png", DIGIT_7, "image/png")}, data={"num_samples": "8"})
    client.post("/classify", files={"image": ("a.txt", b"text", "text/plain")})
    text = client.get("/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("snodevit_")}
    assert values['snodevit_images_total{endpoint="classify"}'] >= 1
    assert values["snodevit_mc_samples_total"] >= 8
    assert sum(v for k, v in values.items() if k.startswith("snodevit_decisions_total")) >= 1
    assert values['snodevit_errors_total{error="not_an_image",status="415"}'] >= 1
    assert values["snodevit_batch_size_count"] >= 1
    # every answered image's sample count, so that _sum / _count is the mean samples per image
    assert values["snodevit_samples_per_image_count"] >= 1
    assert values["snodevit_samples_per_image_sum"] == values["snodevit_mc_samples_total"]
    assert values['snodevit_samples_per_image_bucket{le="4.0"}'] < values['snodevit_samples_per_image_bucket{le="8.0"}']
    assert "bentoml_service_request_total" in text


def test_concurrent_http_requests_share_passes(client) -> None:
    """Eight requests in flight at once through the ASGI app: all answered, some in a shared pass."""
    from concurrent.futures import ThreadPoolExecutor

    def post(i: int) -> Any:
        return client.post("/classify", files={"image": ("a.png", DIGIT_7 if i % 2 else DIGIT_2, "image/png")},
                           data={"seed": str(i)})

    with ThreadPoolExecutor(8) as pool:  # the TestClient's event loop serves the eight at once
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert max(r.json()["timing"]["batch_size"] for r in responses) > 1
    assert [r.json()["seed"] for r in responses] == list(range(8))


# --------------------------------------------------------------------------------------------- bad inputs


@dataclass(frozen=True)
class BadInput:
    what: str  # the bad input, for people
    request: str  # the request, in short
    send: Callable[[Any], Any]  # client -> response
    status: int  # expected status
    error: str  # expected error code
    names: str | None = None  # the parameter the detail must start with


def _file(data: bytes, name: str = "upload.png", ctype: str = "image/png", **form: str) -> Callable[[Any], Any]:
    return lambda c: c.post("/classify", files={"image": (name, data, ctype)}, data=form or None)


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * min(MiB, total - sent)
        sent += MiB


BAD_INPUTS: list[BadInput] = [
    BadInput("a text file", "`POST /classify`, file `image` = `hello`", _file(b"hello, I am text"), 415,
             "not_an_image"),
    BadInput("an empty (0-byte) file", "file `image` of 0 bytes", _file(b""), 400, "empty_body"),
    BadInput("a truncated PNG", "the first 60 bytes of a PNG", _file(DIGIT_7[:60]), 400, "truncated_image"),
    BadInput("a corrupt PNG", "PNG signature + random bytes", _file(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
             400, "corrupt_image"),
    BadInput("a decompression bomb", "a 20000 x 20000 PNG (a few hundred bytes)", _file(png_header(20000, 20000)),
             413, "too_many_pixels"),
    BadInput("too many pixels", "a 5000 x 5000 PNG (over the 4096 x 4096 cap, checked on the header)",
             _file(png_header(5000, 5000)), 413, "too_many_pixels"),
    BadInput("an image file over 10 MiB", "`image` of 10 MiB + 1 KiB (request under the cap)",
             _file(b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * MiB + 1024)), 413, "too_large"),
    BadInput("a request body over the cap", "`/classify` body of 11 MiB (Content-Length checked first)",
             _file(b"\0" * (11 * MiB)), 413, "request_too_large"),
    BadInput("a streamed body over the cap", "raw body of 11 MiB, chunked (no Content-Length)",
             lambda c: c.post("/classify", content=_chunks(11 * MiB), headers={"Content-Type": "image/png"}), 413,
             "request_too_large"),
    BadInput("an unsupported image format", "an ICO file", _file(encoded("ICO", "RGBA", (32, 32)), "a.ico"), 415,
             "unsupported_format"),
    BadInput("SVG (vector, not raster)", "an SVG document",
             _file(b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', "a.svg", "image/svg+xml"),
             415, "not_an_image"),
    BadInput("num_samples below 1", "form `num_samples=0`", _file(DIGIT_7, num_samples="0"), 400,
             "invalid_parameter", "num_samples"),
    BadInput("num_samples above the limit", "form `num_samples=1000`", _file(DIGIT_7, num_samples="1000"), 400,
             "invalid_parameter", "num_samples"),
    BadInput("num_samples not a number", "form `num_samples=many`", _file(DIGIT_7, num_samples="many"), 400,
             "invalid_parameter", "num_samples"),
    BadInput("a negative seed", "form `seed=-1`", _file(DIGIT_7, seed="-1"), 400, "invalid_parameter", "seed"),
    BadInput("top_k above the number of classes", "form `top_k=11`", _file(DIGIT_7, top_k="11"), 400,
             "invalid_parameter", "top_k"),
    BadInput("an alpha without a fitted threshold", "form `alpha=0.2`", _file(DIGIT_7, alpha="0.2"), 400,
             "invalid_parameter", "alpha"),
    BadInput("alpha outside (0, 1)", "form `alpha=1.5`", _file(DIGIT_7, alpha="1.5"), 400, "invalid_parameter",
             "alpha"),
    BadInput("a block index the model lacks", "`POST /explain_image`, form `layer=9`",
             lambda c: c.post("/explain_image", files={"image": ("a.png", DIGIT_7, "image/png")},
                              data={"layer": "9"}), 400, "invalid_parameter", "layer"),
    BadInput("no image field", "form `seed=1` only", lambda c: c.post("/classify", files={"seed": (None, "1")}), 400,
             "invalid_parameter", "image"),
    BadInput("the image as a URL in a text field", "form `image=http://169.254.169.254/x.png`",
             lambda c: c.post("/classify", files={"image": (None, "http://169.254.169.254/x.png")}), 400,
             "invalid_parameter", "image"),
    BadInput("two images to /classify", "file `image` twice",
             lambda c: c.post("/classify", files=[("image", ("a.png", DIGIT_7, "image/png"))] * 2), 400,
             "invalid_parameter", "image"),
    BadInput("a misspelt parameter", "form `num_sample=8`", _file(DIGIT_7, num_sample="8"), 400, "invalid_parameter",
             "num_sample"),
    BadInput("a JSON body", '`{"image": "/etc/passwd"}` as application/json',
             lambda c: c.post("/classify", json={"image": "/etc/passwd"}), 415, "unsupported_media_type"),
    BadInput("a URL-encoded form", "`image=http://...` as application/x-www-form-urlencoded",
             lambda c: c.post("/classify", data={"image": "http://example.com/a.png"}), 415,
             "unsupported_media_type"),
    BadInput("a malformed multipart body", "`garbage` with a multipart Content-Type",
             lambda c: c.post("/classify", content=b"garbage",
                              headers={"Content-Type": "multipart/form-data; boundary=XyZ"}), 400,
             "malformed_multipart"),
    BadInput("query parameters with a multipart upload", "`POST /classify?seed=1` + multipart",
             lambda c: c.post("/classify?seed=1", files={"image": ("a.png", DIGIT_7, "image/png")}), 400,
             "invalid_parameter"),
    BadInput("a raw body with a bad query parameter", "raw PNG, `?num_samples=0`",
             lambda c: c.post("/classify?num_samples=0", content=DIGIT_7, headers={"Content-Type": "image/png"}),
             400, "invalid_parameter", "num_samples"),
    BadInput("a raw body that is not an image", "`hello` as image/png",
             lambda c: c.post("/classify", content=b"hello", headers={"Content-Type": "image/png"}), 415,
             "not_an_image"),
    BadInput("too many images in a batch", "`/classify_batch` with 65 files",
             lambda c: c.post("/classify_batch", files=[("images", ("a.png", DIGIT_7, "image/png"))] * 65), 400,
             "too_many_images"),
    BadInput("one bad image in a batch", "`/classify_batch`: a PNG and a text file",
             lambda c: c.post("/classify_batch", files=[("images", ("a.png", DIGIT_7, "image/png")),
                                                        ("images", ("b.txt", b"text", "text/plain"))]), 415,
             "not_an_image"),
    BadInput("a batch body over the cap", "`/classify_batch` body of 33 MiB",
             lambda c: c.post("/classify_batch", files={"images": ("a.png", b"\0" * (33 * MiB), "image/png")}), 413,
             "request_too_large"),
    BadInput("the wrong method", "`GET /classify`", lambda c: c.get("/classify"), 405, "method_not_allowed"),
    BadInput("an unknown route", "`POST /predict`", lambda c: c.post("/predict", content=DIGIT_7), 404, "not_found"),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[tuple[BadInput, int, dict[str, str]]]) -> str:
    lines = ["| # | Bad input | Request | Status | `error` | `detail` |", "|---|---|---|---|---|---|"]
    for i, (case, status, body) in enumerate(rows, 1):
        lines.append(f"| {i} | {_cell(case.what)} | {_cell(case.request)} | {status} | `{body['error']}` | "
                     f"{_cell(body['detail'])} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def bad_results(client) -> list[tuple[BadInput, int, dict[str, str]]]:
    out = []
    for case in BAD_INPUTS:
        r = case.send(client)
        out.append((case, r.status_code, r.json()))
    return out


def test_at_least_twenty_bad_inputs() -> None:
    assert len(BAD_INPUTS) >= 20


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.what for c in BAD_INPUTS])
def test_bad_input_gets_its_4xx(bad_results, case: BadInput) -> None:
    [(status, body)] = [(s, b) for c, s, b in bad_results if c is case]
    assert set(body) == {"error", "detail"} and body["detail"]
    assert (status, body["error"]) == (case.status, case.error)
    if case.names is not None:
        assert body["detail"].startswith(f"{case.names}:")  # the parameter is named


def test_server_keeps_serving_after_bad_inputs(bad_results, client) -> None:
    assert client.get("/readyz").status_code == 200
    r = client.post("/classify", files={"image": ("a.png", DIGIT_7, "image/png")}, data={"seed": "1"})
    assert r.status_code == 200 and r.json()["seed"] == 1


def test_bad_inputs_table_matches_the_docs(bad_results) -> None:
    table = render_table(bad_results)
    text = DOC.read_text() if DOC.exists() else ""
    if os.environ.get("SNODEVIT_UPDATE_DOCS") == "1":
        head, _, rest = text.partition(TABLE_START)
        _, _, tail = rest.partition(TABLE_END)
        DOC.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
        text = DOC.read_text()
    documented = text.partition(TABLE_START)[2].partition(TABLE_END)[0].strip()
    assert documented == table, ("docs/bad-inputs.md is stale: run "
                                 "SNODEVIT_UPDATE_DOCS=1 pytest tests/test_service_http.py -k table")
