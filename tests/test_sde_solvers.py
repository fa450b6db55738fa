"""Solvers as classes: what they declare holds (torchsde ``tests/test_strong_convergence.py`` style), the pairing with
the noise type is checked when a block is built, and the block only calls ``step``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import snodevit
from snodevit.config import SOLVER_TYPES
from snodevit.nn import solvers
from snodevit.nn.solvers import NOISE_GENERAL, NOISE_NONE, SDE_ITO, SDE_STRATONOVICH, SOLVERS, Euler, Solver

SMALL = dict(snodevit.MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)


class LinearSDE:
    """dX = mu X dt + s X dW on a grid of step ``dt`` (geometric Brownian motion), counting drift evaluations."""

    def __init__(self, mu: float, s: float, dt: float) -> None:
        self.mu, self.s, self.dt = mu, s, dt
        self.drift_evals = 0

    def prepare(self, x: Tensor) -> Tensor:
        return x

    def drift(self, x: Tensor, prepared: Tensor, k: int) -> Tensor:
        self.drift_evals += 1
        return self.mu * x

    def diffusion(self, prepared: Tensor, k: int, xi: Tensor) -> Tensor:
        return self.s * prepared * math.sqrt(self.dt) * xi


def test_every_solver_declares_its_contract_and_the_config_names_them_all() -> None:
    assert set(SOLVERS) == set(SOLVER_TYPES)  # a solver added to one is added to the other
    for name, cls in SOLVERS.items():
        assert issubclass(cls, Solver) and cls.name == name
        assert cls.sde_type in (SDE_ITO, SDE_STRATONOVICH)
        assert set(cls.noise_types) <= {NOISE_GENERAL, NOISE_NONE} and cls.noise_types
        assert cls.strong_order > 0 and cls.drift_evals_per_step >= 1
    assert snodevit.SOLVERS is SOLVERS and snodevit.SolverSpec is Solver  # the public names still work


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_step_evaluates_the_drift_as_often_as_declared(name: str) -> None:
    sde = LinearSDE(0.3, 0.5, 0.25)
    solver = SOLVERS[name](NOISE_GENERAL)
    solver.step(sde, 0, torch.ones(3), torch.randn(3))
    assert sde.drift_evals == solver.drift_evals_per_step


def test_euler_and_heun_steps_are_the_textbook_formulas() -> None:
    mu, s, dt = 0.3, 0.5, 0.25
    x, xi = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.7, -1.2], dtype=torch.float64)
    dw = math.sqrt(dt) * xi
    euler = SOLVERS["euler"](NOISE_GENERAL).step(LinearSDE(mu, s, dt), 0, x, xi)
    torch.testing.assert_close(euler, x + mu * x * dt + s * x * dw, rtol=0, atol=1e-15)
    pred = x + mu * x * dt + s * x * dw
    heun = SOLVERS["heun"](NOISE_GENERAL).step(LinearSDE(mu, s, dt), 0, x, xi)
    torch.testing.assert_close(heun, x + 0.5 * dt * mu * (x + pred) + 0.5 * s * (x + pred) * dw, rtol=0, atol=1e-15)
    # without noise both integrate the ODE: Euler's and the trapezoidal rule
    ode = SOLVERS["heun"](NOISE_NONE).step(LinearSDE(mu, s, dt), 0, x, None)
    torch.testing.assert_close(ode, x + 0.5 * dt * mu * (x + (x + mu * x * dt)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_each_solver_reaches_its_declared_strong_order(name: str) -> None:
    """Mean |X_T - exact X_T| over 20000 paths of geometric Brownian motion falls at least as dt^strong_order.

    The exact solution is the one of the solver's interpretation: exp((mu - s^2/2) T + s W_T) for Ito,
    exp(mu T + s W_T) for Stratonovich. Scalar noise commutes, so Heun does better than its general-noise 0.5.
    """
    cls = SOLVERS[name]
    mu, s, paths, finest = 0.5, 0.8, 20000, 128
    gen = torch.Generator().manual_seed(0)
    xi_fine = torch.randn(finest, paths, generator=gen, dtype=torch.float64)
    w_t = xi_fine.sum(0) / math.sqrt(finest)
    exact = torch.exp((mu - (0.5 * s * s if cls.sde_type == SDE_ITO else 0.0)) + s * w_t)
    errors, steps = [], [4, 8, 16, 32]
    for n in steps:
        # the same Brownian path on a coarser grid: dW over a coarse step is the sum of the fine ones
        xi = xi_fine.reshape(n, finest // n, paths).sum(1) / math.sqrt(finest // n)
        sde, solver, x = LinearSDE(mu, s, 1.0 / n), cls(NOISE_GENERAL), torch.ones(paths, dtype=torch.float64)
        for k in range(n):
            x = solver.step(sde, k, x, xi[k])
        errors.append((x - exact).abs().mean().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope >= cls.strong_order - 0.1, (slope, errors)


def test_the_noise_type_pairing_is_checked_when_the_block_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="does not support noise type"):
        solvers.check_solver("euler", "scalar")
    with pytest.raises(ValueError, match="solver must be one of"):
        solvers.check_solver("rk4", NOISE_GENERAL)

    class NoiseOnly(Euler):
        noise_types = (NOISE_GENERAL,)

    monkeypatch.setitem(SOLVERS, "euler", NoiseOnly)
    snodevit.create_model("tiny", **SMALL)  # every block has diffusion: fine
    with pytest.raises(ValueError, match="does not support noise type 'none'"):
        snodevit.create_model("tiny", **{**SMALL, "noise_dim": 0})  # ODE blocks: refused at construction


def test_the_block_only_calls_the_step_of_its_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new solver is a class: registered, the unchanged block integrates with its ``step``."""
    calls: list[int] = []

    class CountingEuler(Euler):
        def step(self, sde, k, x, xi):  # type: ignore[no-untyped-def]
            calls.append(k)
            return super().step(sde, k, x, xi)

    torch.manual_seed(0)
    plain = snodevit.create_model("tiny", **SMALL, num_steps=3).eval()
    monkeypatch.setitem(SOLVERS, "euler", CountingEuler)
    counted = snodevit.create_model("tiny", **SMALL, num_steps=3).eval()
    counted.load_state_dict(plain.state_dict())
    assert all(isinstance(b.solver, CountingEuler) for b in counted.blocks)
    x, noise = torch.randn(2, 1, 28, 28), torch.randn(plain.noise_shape(2, 2))
    assert torch.equal(counted.sample_logits(x, noise=noise), plain.sample_logits(x, noise=noise))
    assert calls == [0, 1, 2] * 2  # K steps in each of the two blocks
    assert "strong order 0.5" in repr(plain.blocks[0])  # the model's repr says what integrates it
