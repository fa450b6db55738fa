"""Evaluation: seeded Monte Carlo passes over data sets, shift sweeps, the calibrate pipeline behind `snodevit
calibrate`, and the uncertainty baselines the benchmark compares with."""
