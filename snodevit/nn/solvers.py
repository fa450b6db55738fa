"""Fixed-step SDE solvers as classes that say what they support and write only their ``step``.

As in torchsde (``_core/base_solver.py``, ``_core/methods/euler.py``), a solver class declares its name, the
interpretation of the stochastic integral it converges to, the noise types it handles and its strong order; the
base class holds that contract and checks the noise-type pairing once, when the solver is built. A solver sees
the SDE only through :class:`SDEFunctions` (the drift, the diffusion times the Brownian increment, and what the
two share at one point), so adding a solver adds a class here and a name to ``SolverType`` in
:mod:`snodevit.config`; the block that calls ``step`` does not change.

Unlike torchsde's base class, this one owns no integration loop: the blocks' time grid is fixed (K steps over
t in [0, 1]) and the block runs the K steps itself, collecting what each drift evaluation applied.

References:
    Kloeden & Platen. "Numerical Solution of Stochastic Differential Equations." Springer, 1992
    (Euler-Maruyama; the Stratonovich Heun scheme).
    Li, Wong, Chen, Duvenaud. "Scalable Gradients for Stochastic Differential Equations." AISTATS 2020 (torchsde).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import Tensor

# Noise types and SDE interpretations, named as in torchsde.
NOISE_GENERAL = "general"
NOISE_NONE = "none"
SDE_ITO = "ito"
SDE_STRATONOVICH = "stratonovich"


class SDEFunctions(Protocol):
    """The SDE ``dX = f(X, t) dt + G(X, t) dW`` on a fixed grid t_k = k dt, as a solver sees it."""

    dt: float  # the step size

    def prepare(self, x: Tensor) -> Tensor:
        """What the drift and the diffusion at ``x`` share, computed once per point (a block: its pre-norm)."""
        ...

    def drift(self, x: Tensor, prepared: Tensor, k: int) -> Tensor:
        """f(x, t_k), the shape of ``x``."""
        ...

    def diffusion(self, prepared: Tensor, k: int, xi: Tensor) -> Tensor:
        """G(x, t_k) dW with dW = sqrt(dt) xi, the shape of ``x``; ``xi`` holds standard normals."""
        ...


class Solver:
    """The contract of a fixed-step solver: what it supports, checked at construction, and one ``step``.

    Class attributes (declared by every solver):
        name: the ``SNodeViTConfig.solver`` value that selects it.
        sde_type: the interpretation of the stochastic integral it converges to (``ito`` or ``stratonovich``).
        noise_types: the noise structures it handles (``general``; ``none`` for the ODE of a block without
            diffusion).
        strong_order: its strong order of convergence for general (non-commutative) noise.
        drift_evals_per_step: its cost, in drift evaluations per step.
    """

    name: ClassVar[str]
    sde_type: ClassVar[str]
    noise_types: ClassVar[tuple[str, ...]]
    strong_order: ClassVar[float]
    drift_evals_per_step: ClassVar[int]

    def __init__(self, noise_type: str) -> None:
        """Build the solver for one noise type.

        Raises:
            ValueError: the solver cannot integrate ``noise_type``.
        """
        if noise_type not in self.noise_types:
            raise ValueError(f"solver {self.name!r} does not support noise type {noise_type!r}; "
                             f"it supports {self.noise_types}")
        self.noise_type = noise_type

    def step(self, sde: SDEFunctions, k: int, x: Tensor, xi: Tensor | None) -> Tensor:
        """Advance ``x`` from t_k to t_{k+1}.

        Args:
            sde: the drift and diffusion to integrate.
            k: index of the step's start on the time grid.
            x: the state at t_k.
            xi: the standard normals of this step's Brownian increment (dW = sqrt(dt) xi); None integrates the ODE.

        Returns:
            The state at t_{k+1}, the shape of ``x``.
        """
        raise NotImplementedError

    def increment(self, sde: SDEFunctions, k: int, x: Tensor, xi: Tensor | None) -> Tensor:
        """The step's increment h_k(x) = X_{k+1} - X_k as one term, for integrators that combine it with other
        states (BDIA, :mod:`snodevit.nn.reversible`); ``step`` keeps its own order of additions.

        Args and shapes as :meth:`step`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.sde_type}, strong order {self.strong_order:g}, "
                f"noise {self.noise_type!r})")


def euler_maruyama(sde: SDEFunctions, k: int, x: Tensor,
                   xi: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One Euler-Maruyama step ``x + f dt (+ G dW)``, with what it evaluated (Heun's predictor reuses them).

    Returns:
        The new state, the drift f(x, t_k), the diffusion G(x, t_k) dW (None without noise) and ``prepare(x)``.
    """
    prepared = sde.prepare(x)  # shared by the drift and the diffusion at (x, t_k)
    f = sde.drift(x, prepared, k)
    g = sde.diffusion(prepared, k, xi) if xi is not None else None
    x_next = torch.add(x, f, alpha=sde.dt)
    if g is not None:
        x_next = x_next + g
    return x_next, f, g, prepared


class Euler(Solver):
    """Euler-Maruyama: one drift evaluation per step, converging to the Ito solution."""

    name = "euler"
    sde_type = SDE_ITO
    noise_types = (NOISE_GENERAL, NOISE_NONE)
    strong_order = 0.5
    drift_evals_per_step = 1

    def step(self, sde: SDEFunctions, k: int, x: Tensor, xi: Tensor | None) -> Tensor:
        return euler_maruyama(sde, k, x, xi)[0]

    def increment(self, sde: SDEFunctions, k: int, x: Tensor, xi: Tensor | None) -> Tensor:
        """f(x, t_k) dt (+ G(x, t_k) dW)."""
        _, f, g, _ = euler_maruyama(sde, k, x, xi)
        h = f * sde.dt
        return h if g is None else h + g


class Heun(Solver):
    """Stratonovich Heun: the Euler-Maruyama predictor, then a trapezoidal corrector for drift and diffusion."""

    name = "heun"
    sde_type = SDE_STRATONOVICH
    noise_types = (NOISE_GENERAL, NOISE_NONE)
    strong_order = 0.5
    drift_evals_per_step = 2

    def step(self, sde: SDEFunctions, k: int, x: Tensor, xi: Tensor | None) -> Tensor:
        x_pred, f0, g0, _ = euler_maruyama(sde, k, x, xi)
        pred_prepared = sde.prepare(x_pred)
        f1 = sde.drift(x_pred, pred_prepared, k + 1)
        x_next = torch.add(x, f0 + f1, alpha=0.5 * sde.dt)
        if g0 is not None and xi is not None:  # g0 exists only with noise
            x_next = x_next + 0.5 * (g0 + sde.diffusion(pred_prepared, k + 1, xi))
        return x_next

    def increment(self, sde: SDEFunctions, k: int, x: Tensor, xi: Tensor | None) -> Tensor:
        """(f(x) + f(x_pred)) dt / 2 (+ (G(x) + G(x_pred)) dW / 2): a deterministic function of x and the noise,
        so BDIA inverts it exactly like an Euler step."""
        x_pred, f0, g0, _ = euler_maruyama(sde, k, x, xi)
        pred_prepared = sde.prepare(x_pred)
        h = (f0 + sde.drift(x_pred, pred_prepared, k + 1)) * (0.5 * sde.dt)
        if g0 is not None and xi is not None:
            h = h + 0.5 * (g0 + sde.diffusion(pred_prepared, k + 1, xi))
        return h


#: The solvers by name: the registry ``SNodeViTConfig.solver`` selects from.
SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (Euler, Heun)}


def check_solver(solver: str, noise_type: str) -> Solver:
    """The solver of this name built for ``noise_type``: the one place a block's solver is chosen and checked.

    Raises:
        ValueError: the solver is unknown, or cannot integrate this noise type.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver](noise_type)


#: The name of the contract from when solvers were specs beside an ``if`` in the block; ``SOLVERS`` values are
#: its subclasses now (``SOLVERS["heun"].strong_order`` reads as before).
SolverSpec = Solver
