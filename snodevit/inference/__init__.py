"""From images to answers: the request-parameter policy (``params``), the noise and the folded Monte Carlo passes
(``passes``), their summaries (``summary``), the fitted calibration (``fitted``), the decisions (``decide``),
adaptive sampling (``adaptive``) and the one inference function (``predictor.predict``) that the service, the CLI
and the benchmarks share; the backend registry (``backends``), precision and the answer records.
"""

from snodevit.inference.adaptive import AdaptiveSampling, settled
from snodevit.inference.backends import LoadedModel, backend_names, open_model, register_backend
from snodevit.inference.decide import ACCEPTED, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, REASON_CODES, decide_outcomes
from snodevit.inference.fitted import GATE_SCORES, Calibration, OodGate, threshold_to_json
from snodevit.inference.params import AUTO, MAX_SEED, default_alpha, parse_num_samples, resolve_seeds
from snodevit.inference.passes import SamplingBackend, draw_noise, sample_in_passes
from snodevit.inference.precision import PRECISIONS, resolve_precision
from snodevit.inference.predictor import Prediction, predict
from snodevit.inference.records import prediction_records
from snodevit.inference.summary import UncertaintySummary, attention_maps, summarize

__all__ = [
    "ACCEPTED", "AUTO", "AdaptiveSampling", "Calibration", "GATE_SCORES", "LOW_CONFIDENCE", "LoadedModel", "MAX_SEED",
    "OUT_OF_DISTRIBUTION", "OodGate", "PRECISIONS", "Prediction", "REASON_CODES", "SamplingBackend",
    "UncertaintySummary", "attention_maps", "backend_names", "decide_outcomes", "default_alpha", "draw_noise",
    "open_model", "parse_num_samples", "predict", "prediction_records", "register_backend", "resolve_precision",
    "resolve_seeds", "sample_in_passes", "settled", "summarize", "threshold_to_json",
]
