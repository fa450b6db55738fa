"""Evaluation: seeded Monte Carlo passes over data sets (``passes``), the calibrate pipeline behind `snodevit
calibrate` (``pipeline``: its settings in ``config``, the test-split sections in ``sections``, the shift, OOD and
decision sweeps in ``sweeps``, the goals in ``goals``, the figures in ``figures``), and the uncertainty baselines
the benchmark compares with (``baselines``).
"""

from snodevit.evaluation.baselines import DeepEnsemble, DiffusionOff, MCDropout
from snodevit.evaluation.config import (CONFORMAL_SCORES, DECISION_SCORES, FAR_OOD_SETS, GATE_CANDIDATES,
    OOD_SCORES, OOD_SETS, UNCERTAINTY_SCORES, CalibrateConfig, quick_config)
from snodevit.evaluation.figures import decision_figures
from snodevit.evaluation.goals import (GOAL_ACCEPTED, GOAL_ACCURACY, GOAL_COVERAGE_SLACK, GOAL_ECE,
    GOAL_FAR_OOD_REVIEW, GOAL_FAR_OOD_SETS, GOAL_ID_ERROR, GOAL_SHIFT_ERROR, goals)
from snodevit.evaluation.passes import collect, pass_seeds, run_passes
from snodevit.evaluation.pipeline import CalibrationResult, calibrate_model, report_intro

__all__ = [
    "CONFORMAL_SCORES", "CalibrateConfig", "CalibrationResult", "DECISION_SCORES", "DeepEnsemble", "DiffusionOff",
    "FAR_OOD_SETS", "GATE_CANDIDATES", "GOAL_ACCEPTED", "GOAL_ACCURACY", "GOAL_COVERAGE_SLACK", "GOAL_ECE",
    "GOAL_FAR_OOD_REVIEW", "GOAL_FAR_OOD_SETS", "GOAL_ID_ERROR", "GOAL_SHIFT_ERROR", "MCDropout", "OOD_SCORES",
    "OOD_SETS", "UNCERTAINTY_SCORES", "calibrate_model", "collect", "decision_figures", "goals", "pass_seeds",
    "quick_config", "report_intro", "run_passes",
]
