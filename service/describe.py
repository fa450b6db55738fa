"""What the service says about the model it serves: the ``model`` block of every answer and the ``/metadata``
answer (classes, preprocessing, config, calibration and its figures, the request limits)."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from snodevit.data import DEFAULT_ALLOWED_FORMATS
from snodevit.inference.backends import LoadedModel
from snodevit.inference.fitted import Calibration

from .schemas import CalibrationFigures, CalibrationInfo, Limits, MetadataResponse, ModelInfo, OodGateInfo
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


def model_info(loaded: LoadedModel, *, name: str, tag: str) -> ModelInfo:
    """The ``model`` block of every answer: which model, weights, backend, device and precision answered."""
    cal = loaded.calibration
    return ModelInfo(name=name, tag=tag, version=loaded.version,
                     backend=loaded.backend_name,  # type: ignore[arg-type]
                     device=str(loaded.device), precision=loaded.precision,
                     calibration_precision=cal.precision if cal.is_fitted else None)


def fitted_alphas(loaded: LoadedModel) -> list[float]:
    """The alphas with a fitted conformal threshold, smallest first: the values a request's ``alpha`` may take."""
    return loaded.calibration.alphas


def calibration_figures(loaded: LoadedModel) -> CalibrationFigures | None:
    """The test figures of the model's `snodevit calibrate` run (meta.json); None when uncalibrated or absent."""
    raw = loaded.meta.get("calibration_figures")
    if not loaded.calibration.is_fitted or not isinstance(raw, dict):
        return None
    try:
        return CalibrationFigures.model_validate(raw)
    except ValidationError as err:  # a figure for people to read: never a reason not to serve
        logger.warning("calibration_figures in %s do not read, /metadata leaves them out: %s", loaded.source, err)
        return None


def calibration_warnings(cal: Calibration) -> list[str]:
    """What a user should know before trusting this model's decisions (``/metadata`` calibration.warnings)."""
    if not cal.is_fitted:
        return ["the model is not calibrated: confidences are raw, no image is judged out of distribution, and "
                "every image is accepted; run `snodevit calibrate`"]
    out = []
    if cal.ood_gate is None:
        out.append("no out-of-distribution gate is fitted: images the model was not made for are judged by "
                   "confidence alone and can be accepted; run `snodevit calibrate` with a --gate-score")
    if not cal.count_rules:
        out.append("the thresholds were fitted at one sample count and apply unchanged to every other; re-run "
                   "`snodevit calibrate` to fit them for each count")
    return out


def metadata_response(loaded: LoadedModel, settings: ServiceSettings, *, info: ModelInfo,
                      figures: CalibrationFigures | None, auto_max_samples: int,
                      uploads: dict[str, str]) -> MetadataResponse:
    """The ``/metadata`` answer.

    Args:
        loaded: the served model.
        settings: the service's limits and defaults.
        info: the model block of its answers (:func:`model_info`).
        figures: its calibration figures (:func:`calibration_figures`).
        auto_max_samples: the most samples ``num_samples="auto"`` draws for one image.
        uploads: how each endpoint takes its image.
    """
    cal = loaded.calibration
    written = cal.to_dict()  # strict JSON: an infinite threshold is the string "Infinity" / "-Infinity"
    s = settings
    num_classes = len(loaded.class_names)
    return MetadataResponse(
        model=info, classes=list(loaded.class_names), preprocessing=loaded.preprocessing.to_dict(),
        config=loaded.cfg.to_dict(),
        calibration=CalibrationInfo(
            fitted=cal.is_fitted, temperature=cal.temperature, conformal_score=cal.conformal_score,
            alphas=fitted_alphas(loaded), conformal_thresholds=written["conformal_thresholds"],
            decision_score=cal.decision_score, decision_threshold=written["decision_threshold"],
            target_risk=cal.target_risk, figures=figures,
            ood_gate=None if cal.ood_gate is None else OodGateInfo.model_validate(cal.ood_gate.summary()),
            count_rules=written.get("count_rules", {}), warnings=calibration_warnings(cal)),
        limits=Limits(max_bytes=s.max_bytes, max_pixels=s.max_pixels, max_request_bytes=s.max_request_bytes,
                      max_single_request_bytes=s.max_single_request_bytes, max_images=s.max_images,
                      num_samples_min=1, num_samples_max=s.max_num_samples, num_samples_default=s.num_samples,
                      num_samples_auto_max=auto_max_samples,
                      top_k_default=min(s.top_k, num_classes), top_k_max=num_classes,
                      allowed_formats=list(DEFAULT_ALLOWED_FORMATS), max_concurrency=s.max_concurrency,
                      max_buffered_bytes=s.max_buffered_bytes, timeout_s=s.timeout_s),
        uploads=uploads)
