"""The service's OpenAPI 3.0 document (``GET /docs.json``), made true to what the service enforces.

BentoML generates the document from the API signatures, in pydantic's JSON Schema 2020 dialect (numeric
``exclusiveMinimum``, ``const``, ``{"type": "null"}``, ``type: file``), with its own error bodies, and without what
the request guard (``service.guard``) and the engine check: unknown form fields refused, at least one image, the
most images of a batch, the calibrated alphas, top_k at most the number of classes, the 413/415/429/504 answers and
the ``{"error", "detail"}`` body of every refusal. :func:`service_document` rebuilds the request bodies from the
same pydantic models the guard validates with, converts every schema to OpenAPI 3.0, and documents every status
each route can answer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from .forms import RouteRule
from .schemas import ErrorResponse, MetadataResponse

REF = "#/components/schemas/{model}"
ERROR_REF = {"$ref": REF.format(model="Error")}
RAW_MEDIA_TYPES = ("image/*", "application/octet-stream")
#: An example body of each error status the service answers, and when it answers it.
ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("a parameter out of range, an unknown or repeated form field, a broken multipart body or image, more "
          "images than a batch may carry (too_many_images)",
          "invalid_parameter", "num_samples: Input should be less than or equal to 256"),
    413: ("the body, an image file or its pixel count is over the limit (see /metadata limits)", "too_large",
          "image: the image is 9000000 bytes, more than the limit of 5242880 bytes"),
    415: ("a Content-Type the route does not take, or a file that is not an image in an allowed format",
          "unsupported_media_type", "/classify takes multipart/form-data with a file field 'image'; got 'text/plain'"),
    429: ("too many requests in progress, or too many large uploads held at once; retry after Retry-After seconds",
          "overloaded", "the service is answering 64 requests, the most it takes at once; retry shortly"),
    500: ("an unexpected failure inside the service", "internal_error", "Internal Server Error"),
    503: ("not serving: still starting, shutting down (drain after SIGTERM; retry after Retry-After seconds, or on "
          "another replica) or the model cannot be served (/readyz says why)", "shutting_down",
          "the server is shutting down; send the request to another replica or retry shortly"),
    501: ("the served ONNX graph was exported without attention maps", "not_available",
          "this ONNX graph was exported without attention maps; export it again with attention"),
    504: ("no answer within the service's timeout", "timeout", "no answer within 60 s; the service is overloaded"),
}
#: The error statuses of each kind of route.
MODEL_ROUTE_ERRORS = (400, 413, 415, 429, 500, 503, 504)
EXPLAIN_ROUTE_ERRORS = (*MODEL_ROUTE_ERRORS, 501)
METADATA_ERRORS = (413, 429, 500, 503)
#: Statuses whose answer carries ``Retry-After`` (seconds).
RETRY_AFTER = (429, 503)
PARAMETER_EXAMPLES: dict[str, Any] = {"num_samples": 16, "seed": 7, "top_k": 3, "alpha": 0.1, "layer": 0}


def openapi30(schema: Any) -> Any:
    """A JSON Schema 2020 schema (as pydantic and BentoML write it) in the OpenAPI 3.0 dialect, recursively.

    Numeric ``exclusiveMinimum`` / ``exclusiveMaximum`` become ``minimum`` / ``maximum`` with the boolean flag;
    ``{"type": "null"}`` in an ``anyOf`` becomes ``nullable``; ``const`` becomes a one-value ``enum``; BentoML's
    ``type: file`` becomes a binary string; ``examples`` becomes ``example``.
    """
    if isinstance(schema, list):
        return [openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: openapi30(v) for k, v in schema.items()}
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            out[flag], out[bound] = out[bound], True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if out.get("type") == "file":
        out.update(type="string", format="binary")
    if "examples" in out:
        examples = out.pop("examples")
        if isinstance(examples, list) and examples:
            out["example"] = examples[0]
    variants = out.get("anyOf")
    if isinstance(variants, list) and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        out.pop("anyOf")
        out["nullable"] = True
        if len(rest) == 1 and "$ref" in rest[0]:  # siblings of a $ref are ignored in OpenAPI 3.0
            out["allOf"] = rest
        elif len(rest) == 1:
            out = {**rest[0], **out}
        else:
            out["anyOf"] = rest
    return out


def _model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """``model``'s schema in OpenAPI 3.0, its nested models moved into ``components``."""
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = openapi30(sub)
    return openapi30(schema)  # type: ignore[no-any-return]


def _error_responses(statuses: Sequence[int]) -> dict[str, Any]:
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    return {str(status): {"description": ERRORS[status][0],
                          "content": {"application/json": {"schema": ERROR_REF, "example": {
                              "error": ERRORS[status][1], "detail": ERRORS[status][2]}}},
                          **({"headers": retry} if status in RETRY_AFTER else {})}
            for status in statuses}


def _form_schema(rule: RouteRule, *, num_classes: int, depth: int, alphas: Sequence[float]) -> dict[str, Any]:
    """The multipart form of one route: the guard's parameter model, its file field, and the engine's bounds."""
    if rule.params is None:
        raise ValueError(f"the route taking '{rule.file_field}' has no parameter model to document")
    schema = _model_schema(rule.params, {})
    props: dict[str, Any] = schema["properties"]
    for name, prop in props.items():
        prop.pop("title", None)
        prop["example"] = PARAMETER_EXAMPLES[name]
    if "top_k" in props:
        props["top_k"]["maximum"] = num_classes
    if "layer" in props:
        props["layer"]["maximum"] = depth - 1
    if "alpha" in props and alphas:
        props["alpha"]["enum"] = [*alphas, None]
        props["alpha"]["example"] = alphas[0]
    if "num_samples" in props:  # an integer in range, or "auto" in any case with blanks around it
        for variant in props["num_samples"].get("anyOf", []):
            if variant.get("type") == "string":
                variant.pop("enum", None)
                variant["pattern"] = r"^\s*[Aa][Uu][Tt][Oo]\s*$"
    binary = {"type": "string", "format": "binary", "minLength": 1}  # an empty file is refused (400 empty_body)
    if rule.max_files == 1:
        props[rule.file_field] = {**binary, "description": "the image file"}
    else:
        props[rule.file_field] = {"type": "array", "items": binary, "minItems": 1, "maxItems": rule.max_files,
                                  "description": f"the image files, at most {rule.max_files} (400 beyond)"}
    return {"type": "object", "required": [rule.file_field], "properties": props, "additionalProperties": False,
            "description": f"at most {rule.max_body} bytes in all (413 beyond)"}


def _request_body(rule: RouteRule, form: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = {"multipart/form-data": {
        "schema": form, "encoding": {name: {"contentType": "application/json"}
                                     for name in form["properties"] if name != rule.file_field}}}
    if rule.raw_path:  # the guard routes a raw image body here; its parameters come from the query string
        for media in RAW_MEDIA_TYPES:
            content[media] = {"schema": {"type": "string", "format": "binary", "description": "the image file itself; "
                                         "parameters as query string (e.g. ?seed=3&num_samples=16)"}}
    return {"required": True, "content": content}


def service_document(spec: Mapping[str, Any], rules: Mapping[str, RouteRule], *, num_classes: int, depth: int,
                     alphas: Sequence[float], explain_routes: Sequence[str] = ("/explain", "/explain_image"),
                     metadata_path: str = "/metadata") -> dict[str, Any]:
    """BentoML's OpenAPI document (``Service.openapi_spec.asdict()``), made true to the running service.

    Args:
        spec: BentoML's document; not modified.
        rules: route path -> what the request guard accepts there (``service.service.route_rules``).
        num_classes: classes of the served model (the largest top_k).
        depth: blocks of the served model (layer is in [0, depth - 1]).
        alphas: the calibrated alphas (the values alpha may take besides null).
        explain_routes: routes that may answer 501 (a model without attention maps).
        metadata_path: the GET route of the metadata answer.

    Returns:
        A valid OpenAPI 3.0 document.
    """
    doc = openapi30(copy.deepcopy(dict(spec)))
    doc["openapi"] = "3.0.3"
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in [n for n in schemas if n.endswith("__Input")] + ["InvalidArgument", "NotFound", "InternalServerError"]:
        schemas.pop(name, None)  # BentoML's form models (rebuilt below) and error bodies (not the ones we answer)
    schemas["Error"] = _model_schema(ErrorResponse, schemas)
    for path, rule in rules.items():
        operation = doc["paths"][path]["post"]
        form = _form_schema(rule, num_classes=num_classes, depth=depth, alphas=alphas)
        operation["requestBody"] = _request_body(rule, form)
        ok = operation["responses"]
        responses = {"200": ok.get("200", ok.get(200))}
        responses.update(_error_responses(EXPLAIN_ROUTE_ERRORS if path in explain_routes else MODEL_ROUTE_ERRORS))
        operation["responses"] = responses
    schemas["MetadataResponse"] = _model_schema(MetadataResponse, schemas)
    doc["paths"][metadata_path] = _metadata_operations()
    return doc


def _metadata_operations() -> dict[str, Any]:
    """``GET /metadata``, and ``POST /metadata`` with a JSON object, ``{}`` (the call bentoml's clients make)."""
    answer = {"200": {"description": "Successful Response", "content": {"application/json": {
        "schema": {"$ref": REF.format(model="MetadataResponse")}}}}}
    about = ("Classes, preprocessing, model configuration, calibration figures and limits of the served model (the "
             "valid alphas are calibration.alphas)")
    return {
        "get": {"tags": ["Service APIs"], "operationId": "snodevit__metadata", "description": about,
                "responses": {**answer, **_error_responses(METADATA_ERRORS)}},
        "post": {"tags": ["Service APIs"], "operationId": "snodevit__metadata_post",
                 "description": about + "; the same answer as GET, for clients that call every API with POST "
                                        "(bentoml.SyncHTTPClient)",
                 "requestBody": {"required": False, "content": {"application/json": {"schema": {
                     "type": "object", "description": "no parameters: send {} (other members are ignored)"},
                     "example": {}}}},
                 "responses": {**answer, **_error_responses((400, 415, *METADATA_ERRORS))}},
    }
