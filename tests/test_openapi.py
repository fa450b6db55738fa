"""The OpenAPI document (``GET /docs.json``) of the real server: valid OpenAPI 3.0, and true to what it enforces.

Unit tests of the JSON Schema 2020 -> OpenAPI 3.0 conversion run without a server; the document itself is fetched
from ``bentoml serve`` (the integration tier's fixture), where BentoML's own ``/docs.json`` route also exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from test_service_integration import server  # noqa: F401 - the real server, a module-scoped fixture

from service.openapi import openapi30
from service.settings import ServiceSettings
from service.testing import TEST_ENV

DIGIT_7 = (Path(__file__).parent.parent / "examples" / "digit_7.png").read_bytes()
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
