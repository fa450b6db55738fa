"""snodevit: a stochastic (SDE) Vision Transformer with calibrated, decomposed uncertainty.

Public API::

    model = snodevit.create_model("tiny", image_size=28, in_channels=1, patch_size=4)
    logits = model.sample_logits(images, num_samples=8)            # (S, B, classes)
    pred = snodevit.predict(model, images, num_samples=8, seed=0)  # probabilities, uncertainty, decision
"""

from snodevit.checkpoint import CheckpointError, load_model, save_model
from snodevit.config import MNIST_OVERRIDES, SNodeViTConfig, get_config, list_variants, register_variant
from snodevit.inference.fitted import Calibration
from snodevit.inference.predictor import Prediction, predict
from snodevit.inference.summary import UncertaintySummary, attention_maps, summarize
from snodevit.model import SNodeViT, count_parameters, create_model
from snodevit.nn.solvers import SOLVERS, Solver, SolverSpec

__all__ = [
    "Calibration", "CheckpointError", "MNIST_OVERRIDES", "Prediction", "SNodeViT", "SNodeViTConfig", "SOLVERS",
    "Solver", "SolverSpec", "UncertaintySummary", "attention_maps", "count_parameters", "create_model", "get_config",
    "list_variants", "load_model", "predict", "register_variant", "save_model", "summarize",
]
__version__ = "0.1.0"
