"""Request parameters and JSON answers of the HTTP service, as pydantic models (they make the OpenAPI schema).

The answer of one image mirrors ``snodevit.inference.records.prediction_records`` key for key, so the service and the
batch-scoring CLI report the same numbers; the service adds ``model`` and ``timing``.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    create_model,
)

from snodevit.inference.decide import ReasonCode
from snodevit.inference.fitted import GateScore
from snodevit.inference.params import AUTO, MAX_SEED, parse_num_samples

from .settings import ServiceSettings


def _auto_or_int(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """``num_samples``: what ``parse_num_samples`` reads as ``AUTO`` ("auto" in any case, blanks around it) as
    ``AUTO``; anything else goes to the integer validator, whose errors (and bounds) the answer then names."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            if parse_num_samples(value) == AUTO:
                return AUTO
    return handler(value)


def _not_boolean(value: Any) -> Any:
    """Refuse ``true`` / ``false`` where a number is expected (pydantic's lax mode would read them as 1 / 0)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _whole_number(value: Any) -> Any:
    """An integer parameter is written as a whole number: ``1.0`` / ``"1e0"`` / ``true`` are refused, where pydantic's
    lax mode reads them as 1 (the OpenAPI document says integer, and a JSON Schema integer has no fraction part)."""
    value = _not_boolean(value)
    if isinstance(value, float):
        raise ValueError(f"must be a whole number, got {value!r}")
    if isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", value) and _is_float(value):
        raise ValueError(f"must be a whole number, got {value!r}")
    return value  # "auto", or what the integer validator names the problem of


NotBoolean = BeforeValidator(_not_boolean)
WholeNumber = BeforeValidator(_whole_number)


def parameter_types(settings: ServiceSettings) -> dict[str, Any]:
    """The annotated types of the request parameters under ``settings`` (bounds appear in the OpenAPI schema).

    The API signatures in ``service.service`` and :func:`params_model` both use these, so a multipart form
    field and a query parameter of a raw upload are validated by the same rules.
    """
    description = (f"Monte Carlo samples of the SDE per image, or 'auto': draw them in rounds and stop when the "
                   f"label, the decision and the uncertainty are settled (at most {settings.auto_max_samples}; "
                   "the answer's num_samples says how many were used)")
    # An integer in range keeps the constrained-int errors of plain integers; "auto" passes before them.
    num_samples_schema = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": settings.max_num_samples},
                                    {"type": "string", "const": AUTO}],
                          "minimum": 1, "maximum": settings.max_num_samples, "description": description}
    return {
        "num_samples": Annotated[int, Field(ge=1, le=settings.max_num_samples, description=description),
                                 WrapValidator(_auto_or_int), WholeNumber, WithJsonSchema(num_samples_schema)],
        "seed": Annotated[int | None, Field(ge=0, le=MAX_SEED, description="noise seed; drawn and returned when "
                                            "absent. The same image, seed and num_samples give the same answer"),
                          WholeNumber],
        "top_k": Annotated[int, Field(ge=1, description="classes listed in top_k (at most the number of classes)"),
                           WholeNumber],
        "alpha": Annotated[float | None, Field(gt=0, lt=1, description="miscoverage of the conformal prediction "
                                               "set; one of the calibrated alphas (see /metadata); default: the "
                                               "smallest"), NotBoolean],
        "layer": Annotated[int | None, Field(ge=0, description="block whose attention map is drawn; default: the "
                                             "attention rollout over all blocks"), WholeNumber],
    }


def params_model(settings: ServiceSettings, names: tuple[str, ...]) -> type[BaseModel]:
    """A model of the named parameters with the service defaults, used to validate raw-upload query strings."""
    types = parameter_types(settings)
    defaults: dict[str, Any] = {"num_samples": settings.num_samples, "seed": None, "top_k": settings.top_k,
                                "alpha": None, "layer": None}
    fields: dict[str, Any] = {n: (types[n], defaults[n]) for n in names}
    return create_model("QueryParameters", __config__=ConfigDict(extra="forbid"), **fields)


class TopKEntry(BaseModel):
    label: str
    class_index: int
    probability: float = Field(description="calibrated mean probability over the Monte Carlo samples")


class Uncertainty(BaseModel):
    total: float = Field(description="predictive entropy H[p], nats")
    aleatoric: float = Field(description="expected entropy of the samples E_s H[p_s], nats")
    epistemic: float = Field(description="mutual information total - aleatoric, nats")
    std: float = Field(description="standard deviation over samples of the predicted class's probability")


class ModelInfo(BaseModel):
    name: str = Field(description="model store name")
    tag: str = Field(description="model store tag (name:version)")
    version: str = Field(description="first 12 hex digits of the weights' SHA-256")
    backend: Literal["torch", "onnx"]
    device: str
    precision: Literal["fp32", "bf16"] = Field(description="what the forward passes run in (SNODEVIT_PRECISION); "
                                               "the uncertainty figures are always summed in fp32")
    calibration_precision: Literal["fp32", "bf16"] | None = Field(
        None, description="the precision the stored calibration was fitted in; when it differs from precision, "
        "the thresholds were fitted on slightly different numbers. None: the model is not calibrated")


class Timing(BaseModel):
    decode_ms: float = Field(description="reading, decoding and preprocessing the image")
    queue_ms: float = Field(description="waiting for the forward pass that took this image")
    inference_ms: float = Field(description="the forward pass (shared by batch_size images)")
    total_ms: float = Field(description="the whole request inside the service")
    batch_size: int = Field(description="images in the forward pass that answered this image")


#: A threshold as ``snodevit.inference.Calibration.to_dict`` writes it: a finite number, or the string "Infinity" /
#: "-Infinity" (strict JSON has no infinity). A float inf is refused here, so an answer never holds ``Infinity``.
Threshold = Annotated[float, Field(allow_inf_nan=False)] | Literal["Infinity", "-Infinity"]


class OodAnswer(BaseModel):
    """What the out-of-distribution gate made of one image."""

    score: float = Field(description="the gate's score (larger = less like the training images)")
    threshold: Threshold = Field(description="the image is sent to review as out of distribution when score > "
                                 "threshold ('Infinity': the gate never fires)")
    out_of_distribution: bool = Field(description="score > threshold")
    score_name: GateScore = Field(
        description="which score the gate thresholds (see /metadata calibration.ood_gate)")


class Classification(BaseModel):
    """One image's answer: the keys of ``snodevit.inference.records.prediction_records``."""

    label: str
    class_index: int
    confidence: float = Field(description="calibrated mean probability of the label")
    top_k: list[TopKEntry]
    uncertainty: Uncertainty
    prediction_set: list[str] | None = Field(description="conformal prediction set at alpha; null when the model "
                                             "has no conformal calibration")
    alpha: float | None
    decision: Literal["accept", "review"]
    reason_code: ReasonCode = Field(
        description="why: accepted; sent to review because confidence is low; sent to review because the image is "
        "out of distribution (the gate fired: the model was not made for such an input)")
    reason: str = Field(description="the decision in words, with the scores and thresholds it compared")
    ood: OodAnswer | None = Field(description="the out-of-distribution gate's score and flag; null for a model "
                                  "calibrated without a gate")
    seed: int
    num_samples: int = Field(description="Monte Carlo samples this answer used: the requested number, or with "
                             "num_samples='auto' as many as the adaptive rule drew")


class ClassifyResponse(Classification):
    model: ModelInfo
    timing: Timing


class BatchItem(Classification):
    index: int = Field(description="position of the image in the request")
    timing: Timing


class ClassifyBatchResponse(BaseModel):
    results: list[BatchItem]
    model: ModelInfo
    total_ms: float


class ExplainResponse(BaseModel):
    prediction: Classification
    grid_size: int = Field(description="patches per side g")
    depth: int = Field(description="number of blocks")
    pool: Literal["cls", "mean"] = Field(description="whose attention the maps show: the class token ('cls') or "
                                         "the mean over patch tokens ('mean')")
    layers: list[list[list[float]]] = Field(description="(depth, g, g) attention over patches per block, mean over "
                                            "heads and samples; each map sums to 1")
    rollout: list[list[float]] = Field(description="(g, g) attention rollout (Abnar & Zuidema 2020); sums to 1")
    model: ModelInfo
    timing: Timing


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


#: A measured figure; null when it could not be computed (e.g. the risk among no accepted image), never NaN/inf.
Figure = Annotated[float | None, BeforeValidator(_finite_or_none)]


class DecisionFigures(BaseModel):
    """What the served decision did on one image set, as `snodevit calibrate` measured it."""

    model_config = ConfigDict(extra="ignore")

    accepted: Figure = Field(None, description="share of the set accepted automatically")
    error_among_accepted: Figure = Field(None, description="error rate among the accepted images; null for a set "
                                         "without labels or with none accepted")
    review_out_of_distribution: Figure = Field(None, description="share sent to review by the out-of-distribution "
                                               "gate")


class CalibrationFigures(BaseModel):
    """What ``snodevit calibrate`` measured on the held-out test split (meta.json's ``calibration_figures``).

    The fitted parameters (temperature, thresholds) are the fields beside this one in ``CalibrationInfo``; the
    local paths the command also stores (model, out, report) are left out.
    """

    model_config = ConfigDict(extra="ignore")

    data: str | None = Field(None, description="data set whose calibration and test splits were used")
    quick: bool | None = Field(None, description="true for a `snodevit calibrate --quick` run: figures for tests only")
    num_samples: int | None = Field(None, description="Monte Carlo samples per image")
    calibration_images: int | None = Field(None, description="images the calibration was fitted on")
    test_images: int | None = Field(None, description="held-out images the figures were measured on")
    seconds: Figure = Field(None, description="duration of the calibration run")
    accuracy: Figure = Field(None, description="test accuracy")
    ece_before: Figure = Field(None, description="test expected calibration error before temperature scaling (T = 1)")
    ece_after: Figure = Field(None, description="test expected calibration error with the fitted temperature")
    nll_before: Figure = Field(None, description="test negative log-likelihood before temperature scaling, nats")
    nll_after: Figure = Field(None, description="test negative log-likelihood with the fitted temperature, nats")
    coverage: dict[str, Figure] | None = Field(None, description="alpha -> share of test images whose served "
                                               "prediction set (the top class always in it) holds the true label")
    mean_set_size: dict[str, Figure] | None = Field(None, description="alpha -> mean size of the served sets")
    bare_coverage: dict[str, Figure] | None = Field(None, description="alpha -> coverage of the bare sets "
                                                    "{y : score <= q}, which may be empty: the sets the 1 - alpha "
                                                    "guarantee is about")
    bare_mean_set_size: dict[str, Figure] | None = Field(None, description="alpha -> mean size of the bare sets")
    empty_fraction: dict[str, Figure] | None = Field(None, description="alpha -> share of test images whose bare "
                                                     "set is empty")
    selective_coverage: Figure = Field(None, description="share of test images the accept/review rule accepts")
    selective_risk: Figure = Field(None, description="error rate among the accepted test images (target: "
                                   "target_risk); null when none is accepted")
    ood_auroc_max_probability: dict[str, Figure] | None = Field(None, description="OOD set -> AUROC of telling it "
                                                                "from the test split by 1 - max probability")
    ood_auroc_entropy: dict[str, Figure] | None = Field(None, description="OOD set -> AUROC by predictive entropy")
    ood_auroc_mutual_information: dict[str, Figure] | None = Field(None, description="OOD set -> AUROC by mutual "
                                                                   "information (epistemic uncertainty)")
    rotation_accuracy: dict[str, Figure] | None = Field(None, description="rotation angle in degrees -> test "
                                                        "accuracy on the rotated images")
    decisions: dict[str, DecisionFigures] | None = Field(None, description="image set (the test split, rotated "
                                                         "digits, shifted and out-of-distribution sets) -> what the "
                                                         "served decision did on it")


class OodGateInfo(BaseModel):
    """The out-of-distribution gate (``snodevit.inference.OodGate.summary``), checked before the confidence rule."""

    score: GateScore = Field(description="what the gate thresholds: feature_density (class-conditional Gaussians "
                             "on every layer's pooled features), energy, or mutual_information")
    threshold: Threshold = Field(description="review as out of distribution when the score is above it")
    review_rate: float = Field(description="share of in-distribution images the threshold was fitted to send to "
                               "review (a conformal novelty threshold: at most this rate, Bates et al. 2023)")
    calibration_images: int = Field(description="images of the calibration split the threshold was fitted on")
    feature_groups: int | None = Field(None, description="feature vectors the density reads (embedding + blocks)")
    feature_dim: int | None = Field(None, description="width of each feature vector")


class CalibrationInfo(BaseModel):
    fitted: bool
    temperature: float
    conformal_score: str
    alphas: list[float] = Field(description="alphas with a fitted conformal threshold; the valid values of alpha")
    conformal_thresholds: dict[str, Threshold] = Field(description="alpha -> threshold of the prediction sets; "
                                                       "'Infinity': every class is in the set")
    decision_score: str
    decision_threshold: Threshold | None = Field(description="accept when decision_score is >= it (confidence) or <= "
                                                 "it (epistemic); null: every image is accepted (no rule fitted); "
                                                 "'Infinity' / '-Infinity': none is (no threshold kept the error "
                                                 "rate at target_risk)")
    target_risk: float | None
    ood_gate: OodGateInfo | None = Field(description="the out-of-distribution gate; null: the model was calibrated "
                                         "without one, and every input is judged by confidence alone")
    figures: CalibrationFigures | None = Field(description="what `snodevit calibrate` measured on the test split; "
                                               "null for a model without them (uncalibrated)")
    count_rules: dict[str, dict[str, Threshold | None]] = Field(
        default_factory=dict, description="samples n -> the decision_threshold and gate_threshold fitted for "
        "answers of n samples; an answer of n samples uses the largest fitted count <= n. Empty for a model "
        "calibrated before count rules: its thresholds, fitted at one count, then apply to every count")
    warnings: list[str] = Field(default_factory=list, description="what a user should know before trusting the "
                                "decisions: a missing gate, missing count rules, a missing calibration")


class Limits(BaseModel):
    max_bytes: int = Field(description="largest image file, bytes")
    max_pixels: int = Field(description="largest image, width * height")
    max_request_bytes: int = Field(description="largest /classify_batch body, bytes")
    max_single_request_bytes: int = Field(description="largest body of the single-image routes, bytes")
    max_images: int = Field(description="most images in one /classify_batch request")
    num_samples_min: int
    num_samples_max: int
    num_samples_default: int
    num_samples_auto_max: int = Field(description="the most samples num_samples='auto' draws for one image")
    top_k_default: int
    top_k_max: int
    allowed_formats: list[str]
    max_concurrency: int
    max_buffered_bytes: int
    timeout_s: float


class AdmissionInfo(BaseModel):
    """How many requests the server admits at once (sized from throughput measured at start), and its drain."""

    max_in_flight: int = Field(description="requests in progress before new ones get 429 with Retry-After: "
                               "floor(measured_images_per_s * max_queue_wait_s), within [max_batch_size, max_concurrency]")
    measured_images_per_s: float = Field(description="images/s of a full forward pass at num_samples, measured "
                                         "when the worker started")
    num_samples: int = Field(description="the S the throughput was measured at (the default)")
    max_queue_wait_s: float = Field(description="SNODEVIT_MAX_QUEUE_WAIT_S: the queue wait the limit is sized for")
    max_concurrency: int = Field(description="SNODEVIT_MAX_CONCURRENCY: the hard cap, whatever the throughput")
    drain_s: float = Field(description="SNODEVIT_DRAIN_S: after SIGTERM, how long admitted requests get to finish "
                           "(new ones get 503 shutting_down at once)")


class MetadataResponse(BaseModel):
    model: ModelInfo
    classes: list[str]
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    calibration: CalibrationInfo
    limits: Limits
    uploads: dict[str, str] = Field(description="how each endpoint takes its image")
    admission: AdmissionInfo | None = Field(default=None, description="the admission limit and the drain "
                                            "(service.lifecycle)")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: str = Field(description="short machine-readable code, e.g. 'invalid_parameter', 'too_many_pixels'")
    detail: str = Field(description="a sentence naming the problem (and the parameter, when it is one)")
