"""The OpenAPI document (``GET /docs.json``) of the real server: valid OpenAPI 3.0, and true to what it enforces.

Unit tests of the JSON Schema 2020 -> OpenAPI 3.0 conversion run without a server; the document itself is fetched
from ``bentoml serve`` (the integration tier's fixture), where BentoML's own ``/docs.json`` route also exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest
from openapi_spec_validator import validate
from test_service_integration import server  # noqa: F401 - the real server, a module-scoped fixture

from service.openapi import openapi30
from service.settings import ServiceSettings
from service.testing import TEST_ENV

ROOT = Path(__file__).parent.parent
DIGIT_7 = (ROOT / "examples" / "digit_7.png").read_bytes()
OPERATIONS = {"/classify": "post", "/classify_batch": "post", "/explain": "post", "/explain_image": "post",
              "/metadata": "get"}
ERROR = {"$ref": "#/components/schemas/Error"}


# --------------------------------------------------------------------------------------------- conversion


def test_exclusive_bounds_become_openapi30_flags() -> None:
    assert openapi30({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}) == {
        "type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True}
    # already in 3.0 form: unchanged
    same = {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert openapi30(same) == same


def test_null_variants_become_nullable() -> None:
    assert openapi30({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": None}) == {
        "type": "integer", "minimum": 0, "nullable": True, "default": None}
    ref = openapi30({"anyOf": [{"$ref": "#/components/schemas/X"}, {"type": "null"}]})
    assert ref == {"allOf": [{"$ref": "#/components/schemas/X"}], "nullable": True}
    both = openapi30({"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]})
    assert both == {"anyOf": [{"type": "integer"}, {"type": "string"}], "nullable": True}


def test_const_file_and_examples_are_rewritten_at_any_depth() -> None:
    got = openapi30({"properties": {"a": {"const": "auto"}, "b": {"items": {"type": "file"}},
                                    "c": {"type": "integer", "examples": [3, 4]}}})
    assert got == {"properties": {"a": {"enum": ["auto"]}, "b": {"items": {"type": "string", "format": "binary"}},
                                  "c": {"type": "integer", "example": 3}}}


# --------------------------------------------------------------------------------------------- the served document


@pytest.fixture(scope="module")
def doc(server: str) -> dict[str, Any]:  # noqa: F811 - the imported fixture
    answer = httpx.get(f"{server}/docs.json", timeout=30)
    assert answer.status_code == 200
    return answer.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def metadata(server: str) -> dict[str, Any]:  # noqa: F811
    return httpx.get(f"{server}/metadata", timeout=30).json()  # type: ignore[no-any-return]


def form(doc: dict[str, Any], path: str) -> dict[str, Any]:
    return doc["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]  # type: ignore


@pytest.mark.integration
@pytest.mark.slow
def test_docs_json_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate(doc)  # raises OpenAPIValidationError naming the first problem
    assert doc["openapi"].startswith("3.0")


@pytest.mark.integration
@pytest.mark.slow
def test_every_operation_documents_its_errors_with_the_error_body(doc: dict[str, Any]) -> None:
    assert doc["components"]["schemas"]["Error"]["required"] == ["error", "detail"]
    for path, method in OPERATIONS.items():
        responses = doc["paths"][path][method]["responses"]
        wanted = {"413", "429", "500"} if path == "/metadata" else {"400", "413", "415", "429", "500", "504"}
        assert wanted <= set(responses), (path, sorted(responses))
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                body = response["content"]["application/json"]
                assert body["schema"] == ERROR, (path, status)
                assert set(body["example"]) == {"error", "detail"}, (path, status)
    assert "501" in doc["paths"]["/explain"]["post"]["responses"]


@pytest.mark.integration
@pytest.mark.slow
def test_parameters_carry_the_bounds_the_service_enforces(doc: dict[str, Any], metadata: dict[str, Any]) -> None:
    settings = ServiceSettings.from_env(TEST_ENV)
    limits = metadata["limits"]
    for path in ("/classify", "/classify_batch", "/explain", "/explain_image"):
        schema = form(doc, path)
        props = schema["properties"]
        assert schema["additionalProperties"] is False  # the guard refuses unknown form fields (400)
        integer = next(v for v in props["num_samples"]["anyOf"] if v.get("type") == "integer")
        assert (integer["minimum"], integer["maximum"]) == (1, settings.max_num_samples)
        assert props["num_samples"]["default"] == settings.num_samples
        assert props["top_k"]["maximum"] == limits["top_k_max"]
        alpha = props["alpha"]
        assert alpha["nullable"] is True and alpha["enum"] == [*metadata["calibration"]["alphas"], None]
        assert alpha["exclusiveMinimum"] is True and alpha["minimum"] == 0
        assert props["seed"]["nullable"] is True and props["seed"]["minimum"] == 0
        assert all("example" in p for p in props.values() if p.get("format") != "binary" and "items" not in p)
    batch = form(doc, "/classify_batch")
    assert batch["required"] == ["images"]
    assert (batch["properties"]["images"]["minItems"], batch["properties"]["images"]["maxItems"]) == (
        1, limits["max_images"])
    assert form(doc, "/classify")["required"] == ["image"]
    layer = form(doc, "/explain_image")["properties"]["layer"]
    assert (layer["minimum"], layer["maximum"]) == (0, metadata["config"]["depth"] - 1)
    assert set(doc["paths"]["/classify"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data", "image/*", "application/octet-stream"}
    assert set(doc["paths"]["/classify_batch"]["post"]["requestBody"]["content"]) == {"multipart/form-data"}


@pytest.mark.integration
@pytest.mark.slow
def test_the_documented_refusals_are_what_the_server_answers(server: str, doc: dict[str, Any]) -> None:  # noqa: F811
    digit = DIGIT_7
    unknown = httpx.post(f"{server}/classify", files={"image": ("a.png", digit, "image/png")},
                         data={"colour": "1"}, timeout=60)
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_parameter"
    null_alpha = httpx.post(f"{server}/classify", files={"image": ("a.png", digit, "image/png")},
                            data={"alpha": "null", "num_samples": "2"}, timeout=60)
    assert null_alpha.status_code == 200  # documented as nullable
    text = httpx.post(f"{server}/classify", content=b"hello", headers={"Content-Type": "text/plain"}, timeout=60)
    assert text.status_code == 415 and "415" in doc["paths"]["/classify"]["post"]["responses"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("value", ["true", "1.0", "1e0", "2.5"])
def test_integer_parameters_refuse_what_is_not_a_whole_number(server: str, value: str) -> None:  # noqa: F811
    """pydantic's lax mode reads true and 1.0 as 1; the document says integer, so the service refuses them."""
    answer = httpx.post(f"{server}/classify", files={"image": ("a.png", DIGIT_7, "image/png")},
                        data={"top_k": value, "num_samples": "2"}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_parameter", answer.text
    assert answer.json()["detail"].startswith("top_k")


@pytest.mark.integration
@pytest.mark.slow
def test_an_alpha_is_a_fitted_alpha_exactly(server: str, metadata: dict[str, Any]) -> None:  # noqa: F811
    fitted = metadata["calibration"]["alphas"][0]
    for value, status in ((repr(fitted), 200), (repr(fitted + 2**-56), 400)):  # the next float up is not fitted
        answer = httpx.post(f"{server}/classify", files={"image": ("a.png", DIGIT_7, "image/png")},
                            data={"alpha": value, "num_samples": "2"}, timeout=60)
        assert answer.status_code == status, (value, answer.text)


@pytest.mark.integration
@pytest.mark.slow
def test_schemathesis_finds_no_failure(server: str) -> None:  # noqa: F811
    """``st run <docs.json> --checks all`` against the real server: every check passes, no server error.

    Run from the repository root, so ``schemathesis.toml`` loads the hooks that draw real images for the image
    parts (tests/contract/schemathesis_hooks.py). A fixed seed keeps CI reproducible; the README's command draws
    a new one each run.
    """
    st = Path(sys.executable).with_name("st")
    run = subprocess.run([str(st), "run", f"{server}/docs.json", "--checks", "all", "--max-examples", "25",
                          "--seed", "1", "--no-color"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "No issues found" in out, out[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out)
    assert generated is not None and generated.group(1) == generated.group(2) and int(generated.group(1)) > 100, out


@pytest.mark.integration
@pytest.mark.slow
def test_bentoml_client_sees_every_endpoint(server: str, metadata: dict[str, Any]) -> None:  # noqa: F811
    """``bentoml.SyncHTTPClient`` builds its methods from ``/schema.json``: /metadata is one of them (POST), and
    answers what ``GET /metadata`` answers."""
    with bentoml.SyncHTTPClient(server, timeout=60) as client:
        assert {"classify", "classify_batch", "explain", "explain_image", "metadata"} <= set(client.endpoints)
        assert client.metadata()["calibration"] == metadata["calibration"]
        answer = client.classify(image=ROOT / "examples" / "digit_7.png", num_samples=4, seed=7)
    direct = httpx.post(f"{server}/classify", files={"image": ("digit_7.png", DIGIT_7, "image/png")},
                        data={"num_samples": "4", "seed": "7"}, timeout=60).json()
    assert answer["label"] == direct["label"]
    assert answer["confidence"] == direct["confidence"]  # same image, seed and S: the same answer


@pytest.mark.integration
@pytest.mark.slow
def test_the_readme_client_examples_run(server: str) -> None:  # noqa: F811
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "api_clients.py"), server], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split(" ", 1) for line in run.stdout.splitlines()]
    assert {key for key, _ in lines} == {"classes", "classify", "classify_batch", "explain", "explain_image",
                                         "metadata", "refused"}
    batch = next(rest for key, rest in lines if key == "classify_batch")
    assert batch.count("(") == 2  # the digit and the noise image, in upload order
    assert dict(lines)["refused"].startswith("400 {'error': 'invalid_parameter'")
    assert next(rest for key, rest in lines if key == "explain_image") == "b'PNG'"  # the client saved the PNG
