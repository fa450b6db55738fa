"""Test support: a tiny random SNodeViT in a throwaway BentoML home, served by the real service class.

``service.service`` reads its declared settings (the model tag among them) when it is imported and the rest when
the service starts, so :func:`prepare_service` sets the ``SNODEVIT_*`` variables and ``BENTOML_HOME`` first, then
imports (or re-imports) it. The three test tiers use it
alike: unit tests instantiate ``SNodeViTService()``, HTTP tests wrap ``SNodeViTService.to_asgi()``, integration
tests start ``bentoml serve`` with :attr:`PreparedService.env`.
"""

from __future__ import annotations

import atexit
import importlib
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from calibration import fit_feature_density, fit_novelty_threshold
from snodevit.checkpoint import save_model
from snodevit.config import MNIST_OVERRIDES
from snodevit.data import load_dataset, normalize
from snodevit.inference.fitted import Calibration, OodGate
from snodevit.inference.passes import draw_noise
from snodevit.inference.predictor import predict
from snodevit.model import SNodeViT, create_model

from .store import register_model, use_home

CALIBRATION: dict[str, Any] = {"temperature": 1.3, "conformal_score": "aps",
                               "conformal_thresholds": {"0.05": 0.9, "0.1": 0.8}, "decision_score": "confidence",
                               "decision_threshold": 0.5, "target_risk": 0.02,
                               "metrics": {"ece_before": 0.08, "ece_after": 0.02}}
# What `snodevit calibrate` keeps in meta.json as ``calibration_figures`` (its local paths included).
CALIBRATION_FIGURES: dict[str, Any] = {
    "model": "/tmp/tiny", "out": "/tmp/tiny/calibration", "report": "/tmp/tiny/calibration/report.html",
    "quick": True, "data": "mnist5k", "num_samples": 8, "calibration_images": 200, "test_images": 200,
    "accuracy": 0.9, "temperature": 1.3, "ece_before": 0.08, "ece_after": 0.02, "nll_before": 0.4, "nll_after": 0.3,
    "conformal_score": "aps", "coverage": {"0.05": 0.96, "0.1": 0.91}, "mean_set_size": {"0.05": 2.5, "0.1": 1.8},
    "bare_coverage": {"0.05": 0.95, "0.1": 0.9}, "bare_mean_set_size": {"0.05": 2.4, "0.1": 1.6},
    "empty_fraction": {"0.05": 0.0, "0.1": 0.05},
    "decision_score": "confidence", "decision_threshold": 0.5, "target_risk": 0.02, "selective_coverage": 0.7,
    "selective_risk": 0.015, "ood_auroc_max_probability": {"uniform_noise": 0.9, "photo_crops": 0.8},
    "ood_auroc_entropy": {"uniform_noise": 0.91, "photo_crops": 0.81},
    "ood_auroc_mutual_information": {"uniform_noise": 0.92, "photo_crops": None},
    "rotation_accuracy": {"0": 0.9, "90": 0.2, "180": 0.4}, "seconds": 12.5}
#: The test model's out-of-distribution gate (``make_tiny_model(gate=True)``): images it is fitted on and its rate.
GATE_TRAIN_IMAGES, GATE_CALIBRATION_IMAGES, GATE_REVIEW_RATE = 1000, 200, 0.02
TEST_ENV = {"SNODEVIT_NUM_SAMPLES": "8", "SNODEVIT_BATCH_WAIT_MS": "20",
            "SNODEVIT_TIMEOUT_S": "60"}


def fit_test_gate(model: SNodeViT, review_rate: float = GATE_REVIEW_RATE) -> dict[str, Any]:
    """A feature-density out-of-distribution gate for ``model``, fitted as `snodevit calibrate` fits one.

    The density is fitted on one sample's features of the first ``GATE_TRAIN_IMAGES`` mnist5k training images;
    the threshold is the conformal novelty threshold of the served scores (S = 8, image i seeded with i) of the
    first ``GATE_CALIBRATION_IMAGES`` calibration images. Returns the gate as meta.json stores it.
    """
    bundle = load_dataset("mnist5k")
    prep = bundle.preprocessing
    train, labels = bundle.raw("train")
    x = normalize(train[:GATE_TRAIN_IMAGES], prep)
    with torch.no_grad():
        feats = model.sample_logits(x, noise=draw_noise(model, list(range(len(x))), 1), return_features=True)[1][0]
    density = fit_feature_density(feats.double(), labels[:GATE_TRAIN_IMAGES], model.cfg.num_classes)
    probe = OodGate(score="feature_density", threshold=math.inf, review_rate=review_rate, density=density)
    cal_images = normalize(bundle.raw("calibration")[0][:GATE_CALIBRATION_IMAGES], prep)
    pred = predict(model, cal_images, num_samples=8, seed=list(range(len(cal_images))),
                   calibration=Calibration(ood_gate=probe))
    assert pred.ood_score is not None
    gate = OodGate(score="feature_density", threshold=fit_novelty_threshold(pred.ood_score, review_rate),
                   review_rate=review_rate, density=density, calibration_images=len(cal_images))
    return gate.to_dict()


def make_tiny_model(directory: str | os.PathLike[str], *, seed: int = 0, calibrated: bool = True,
                    gate: bool = False) -> Path:
    """Save a 2-block, 24-wide MNIST-shaped SNodeViT with random weights (about 20k parameters).

    The weights are perturbed away from the initialisation (whose zero head answers 0.1 for every class) and
    the diffusion is strong, so answers differ between images and between seeds. ``gate`` adds an
    out-of-distribution gate to the calibration (:func:`fit_test_gate`).
    """
    model = create_model("tiny", **MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4,
                                  time_hidden_dim=16, noise_dim=4, diffusion_scale=1.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    meta: dict[str, Any] = {"class_names": [str(i) for i in range(10)], "data": "mnist5k",
                            "preprocessing": load_dataset("mnist5k").preprocessing.to_dict()}
    if calibrated:
        meta["calibration"] = {**CALIBRATION, "ood_gate": fit_test_gate(model)} if gate else CALIBRATION
        meta["calibration_figures"] = CALIBRATION_FIGURES
    return save_model(model, directory, meta=meta)


@dataclass
class PreparedService:
    home: Path  # the temporary BENTOML_HOME
    model_dir: Path  # the tiny model's directory
    tag: str  # its store tag
    env: dict[str, str] = field(default_factory=dict)  # variables the service was configured with
    module: ModuleType | None = None  # the imported service.service

    @property
    def service_class(self) -> Any:
        assert self.module is not None
        return self.module.SNodeViTService


_PREPARED: PreparedService | None = None


def prepare_service(extra_env: dict[str, str] | None = None) -> PreparedService:
    """Once per process: tiny model -> temporary store -> env -> ``import service.service``.

    Later calls return the same service (``extra_env`` only counts on the first call). The temporary home is
    removed at exit.
    """
    global _PREPARED
    if _PREPARED is not None:
        return _PREPARED
    root = Path(tempfile.mkdtemp(prefix="snodevit-service-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # BentoML's /metrics reads the multiprocess files even in-process; `bentoml serve` sets this itself.
        (root / "prometheus").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(root / "prometheus")
    home = use_home(root / "bentoml")
    model_dir = make_tiny_model(root / "tiny", gate=True)
    tag = str(register_model(model_dir, name="snodevit-test", labels={"stage": "test"}))
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SNODEVIT_MODEL": tag, **TEST_ENV,
           **(extra_env or {})}
    os.environ.update(env)
    if "service.service" in sys.modules:
        module = importlib.reload(sys.modules["service.service"])
    else:
        module = importlib.import_module("service.service")
    _PREPARED = PreparedService(home, model_dir, tag, env, module)
    return _PREPARED
