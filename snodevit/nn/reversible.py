"""Exact bit-level reversible integration of the SDE blocks (BDIA), so that training keeps no activations.

The blocks' solver steps, over all blocks in order, form one sequence x_0, x_1, ..., x_J (J = depth * K) with
increments h_j(x_j) = X_{j+1} - X_j of the block's solver step (Euler-Maruyama: f dt + G dW with the noise an
input; Heun: its trapezoidal increment, equally a deterministic function of x_j and the noise). BDIA (the
bidirectional integration approximation) replaces the step x_{j+1} = x_j + h_j(x_j) of training by

    x_{j+1} = gamma x_{j-1} + (1 - gamma) x_j + (1 + gamma) h_j(x_j),   gamma in {+1/2, -1/2},

with gamma drawn per sample and per block (the K steps of a block share it); gamma = 0, the expectation, is the
plain step, so inference, export and calibration are unchanged. On a fixed-point grid 2^-l Z, with one side bit
per element, it is inverted exactly:

    x_1     = Q(x_0 + h_0(x_0))                                          (x_0 = Q(tokens) is saved)
    x_{j+1} = gamma x_{j-1} + s_{j-1} 2^-(l+1) + Q((1 - gamma) x_j + (1 + gamma) h_j(x_j)),   j >= 1

where Q rounds to the grid and s_{j-1} in {0, 1} is the parity of x_{j-1} 2^l: it makes
``gamma x_{j-1} + s 2^-(l+1)`` a grid point (the "binary quantisation loss" of halving x_{j-1}). The states are
held as integers n = x 2^l (int64), so the arithmetic is exact whatever the float type of the blocks; backward
recomputes h_j(x_j) with gradients enabled, which also gives back x_{j-1} = (x_{j+1} - Q(...) - s 2^-(l+1)) / gamma
bit for bit. What stays in memory is the first input, the last two states, one bit per element and step (packed
eight to a byte), the noise (an input, N m numbers per step against N D of a state) and one sign per sample and
block. Gradients pass through Q unchanged (straight-through), which is also what the reference in
``tests/test_backprop.py`` differentiates.

References:
    Zhang, Lewis, Kleijn. "On Exact Bit-level Reversible Transformers Without Changing Architectures."
    arXiv:2407.09093, 2024 (the BDIA-transformer: gamma in {0.5, -0.5} per sample and block in training,
    E[gamma] = 0 at inference, activation quantisation with lightweight side information).
    Zhang, Lewis, Kleijn. "Exact Diffusion Inversion via Bi-directional Integration Approximation." 2023 (BDIA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from snodevit.nn.sde import SDEBlock

__all__ = ["DEFAULT_FRAC_BITS", "BDIAPlan", "bdia_integrate", "dequantise", "pack_bits", "quantise", "unpack_bits"]

#: l: fractional bits of the fixed-point grid 2^-l Z of the states (a step of 1.5e-5).
DEFAULT_FRAC_BITS = 16
_BIT_WEIGHTS = tuple(1 << b for b in range(8))


def quantise(x: Tensor, frac_bits: int) -> Tensor:
    """x on the grid 2^-l Z as integers: round(x 2^l), int64 (round half to even; the scaling is exact)."""
    return torch.round(x * float(2**frac_bits)).to(torch.int64)


def dequantise(n: Tensor, frac_bits: int, dtype: torch.dtype) -> Tensor:
    """The grid integers n as floats n 2^-l of ``dtype``."""
    return n.to(dtype) * float(2.0**-frac_bits)


def pack_bits(bits: Tensor) -> Tensor:
    """A tensor of 0/1 integers as uint8 bytes, eight bits a byte (flattened, zero-padded to a multiple of 8)."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The 0/1 int64 tensor of ``shape`` that :func:`pack_bits` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1  # (bytes, 8)
    count = 1
    for size in shape:
        count *= size
    return bits.reshape(-1)[:count].to(torch.int64).reshape(shape)


@dataclass(frozen=True)
class BDIAPlan:
    """What the reversible integration runs: the blocks, where their noise is, the grid."""

    blocks: Sequence[SDEBlock]  # the blocks in order, each integrated over its K steps
    first_noise_block: int  # block i >= this one takes noise[:, i - first_noise_block]; the earlier ones are ODEs
    frac_bits: int = DEFAULT_FRAC_BITS  # l of the grid 2^-l Z

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(block, step within the block) of every step, in order."""
        return [(i, k) for i, block in enumerate(self.blocks) for k in range(block.num_steps)]

    def xi(self, noise: Tensor | None, i: int, k: int) -> Tensor | None:
        """The standard normals (B, N, m) of step k of block i, or None for an ODE step."""
        if noise is None or i < self.first_noise_block:
            return None
        return noise[:, i - self.first_noise_block, k]


def _combine(x: Tensor, h: Tensor, gamma: Tensor | None) -> Tensor:
    """What is rounded to the grid: x + h for the first step, (1 - gamma) x + (1 + gamma) h after it."""
    if gamma is None:
        return x + h
    return (1.0 - gamma) * x + (1.0 + gamma) * h


def _half_step(n_prev: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """gamma x_{j-1} + s 2^-(l+1) in grid integers, (sign n + s) / 2 (exact: n + s is even), and the side bit s."""
    s = n_prev & 1  # parity; the same for n and -n
    return torch.div(sign * n_prev + s, 2, rounding_mode="floor"), s


def _forward_states(plan: BDIAPlan, x0: Tensor, noise: Tensor | None, signs: Tensor
                    ) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
    """Run the BDIA steps without gradients: the last two states (grid integers), packed side bits, regulariser."""
    l, dtype = plan.frac_bits, x0.dtype
    gammas = 0.5 * signs.to(dtype)  # (B, depth)
    n_prev, n_cur = None, quantise(x0, l)
    side: list[Tensor] = []
    reg: Tensor | None = None
    tp = None
    for j, (i, k) in enumerate(plan.steps):
        if k == 0:
            tp = plan.blocks[i].time_params(dtype)
        h, r = plan.blocks[i].increment(dequantise(n_cur, l, dtype), plan.xi(noise, i, k), k, tp)
        reg = r if reg is None else (reg if r is None else reg + r)
        gamma = None if j == 0 else gammas[:, i].view(-1, 1, 1)
        q = quantise(_combine(dequantise(n_cur, l, dtype), h, gamma), l)
        if n_prev is not None:
            half, s = _half_step(n_prev, signs[:, i].view(-1, 1, 1).to(torch.int64))
            side.append(pack_bits(s))
            q = q + half
        n_prev, n_cur = n_cur, q
    return n_prev, n_cur, side, reg


class _BDIAFunction(torch.autograd.Function):
    """x_0 -> (x_J, summed regulariser) through the BDIA steps, with the activations rebuilt in backward."""

    @staticmethod
    def forward(ctx: Any, x0: Tensor, noise: Tensor | None, signs: Tensor, plan: BDIAPlan,
                *params: Tensor) -> tuple[Tensor, Tensor]:
        n_prev, n_cur, side, reg = _forward_states(plan, x0, noise, signs)
        if n_prev is None:
            raise ValueError("reversible integration needs at least two solver steps in all (depth * num_steps >= 2)")
        ctx.plan, ctx.side, ctx.params = plan, side, params  # parameters are leaves: no reference cycle
        ctx.has_noise, ctx.has_reg = noise is not None, reg is not None
        ctx.autocast = (x0.device.type, torch.is_autocast_enabled(x0.device.type),
                        torch.get_autocast_dtype(x0.device.type))
        ctx.save_for_backward(x0, noise if noise is not None else x0.new_empty(0), signs, n_prev, n_cur)
        ctx.mark_non_differentiable(signs)
        out = dequantise(n_cur, plan.frac_bits, x0.dtype)
        return out, (reg if reg is not None else x0.new_zeros(())).detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_reg: Tensor) -> tuple[Tensor | None, ...]:
        x0, noise, signs, n_prev, n_cur = ctx.saved_tensors
        return _backward(ctx, grad_out, grad_reg, x0, noise if ctx.has_noise else None, signs, n_prev, n_cur,
                         list(ctx.params))


def _recompute(plan: BDIAPlan, j: int, n_cur: Tensor, noise: Tensor | None, gammas: Tensor,
               needs_noise_grad: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Step j again from its input state, with gradients: the input leaf, the noise leaf, the value rounded to
    the grid (before rounding) and the step's regulariser."""
    i, k = plan.steps[j]
    x = dequantise(n_cur, plan.frac_bits, dtype).requires_grad_(True)
    xi = plan.xi(noise, i, k)
    if xi is not None and needs_noise_grad:
        xi = xi.detach().requires_grad_(True)
    with torch.enable_grad():
        tp = plan.blocks[i].time_params(dtype)
        h, reg = plan.blocks[i].increment(x, xi, k, tp)
        v = _combine(x, h, None if j == 0 else gammas[:, i].view(-1, 1, 1))
    return x, xi, v, reg


def _backward(ctx: Any, grad_out: Tensor, grad_reg: Tensor, x0: Tensor, noise: Tensor | None, signs: Tensor,
              n_prev: Tensor, n_cur: Tensor, params: list[Tensor]) -> tuple[Tensor | None, ...]:
    """Walk the steps backwards: rebuild each step's input from the two states after it, recompute the step with
    gradients, and accumulate the adjoints of the states (x_{j+1} = gamma x_{j-1} + F_j(x_j)) and the parameters."""
    plan: BDIAPlan = ctx.plan
    l, dtype = plan.frac_bits, x0.dtype
    gammas = 0.5 * signs.to(dtype)
    needs_noise = noise is not None and ctx.needs_input_grad[1]
    noise_grad = torch.zeros_like(noise) if needs_noise else None
    param_grads: list[Tensor | None] = [None] * len(params)
    adj_next, adj_cur = grad_out, torch.zeros_like(grad_out)  # adjoints of x_{j+1} (complete) and x_j (partial)
    n_next, n_here = n_cur, n_prev  # states j + 1 and j
    device_type, autocast_on, autocast_dtype = ctx.autocast
    for j in range(len(plan.steps) - 1, -1, -1):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            x, xi, v, reg = _recompute(plan, j, n_here, noise, gammas, needs_noise, dtype)
        n_before = None
        if j > 0:  # x_{j-1} = (x_{j+1} - Q(v) - s 2^-(l+1)) / gamma, in grid integers
            i = plan.steps[j][0]
            s = unpack_bits(ctx.side[j - 1], n_here.shape)
            n_before = signs[:, i].view(-1, 1, 1).to(torch.int64) * (2 * (n_next - quantise(v.detach(), l)) - s)
        inputs = [x] + ([xi] if xi is not None and needs_noise else []) + list(params)
        outs, grads_out = [v], [adj_next]
        if reg is not None and ctx.has_reg:
            outs.append(reg)
            grads_out.append(grad_reg)
        grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
        adj_here = adj_cur + grads[0]
        offset = 1
        if xi is not None and needs_noise:
            i, k = plan.steps[j]
            noise_grad[:, i - plan.first_noise_block, k] += grads[1]
            offset = 2
        for p, g in enumerate(grads[offset:]):
            if g is not None:
                param_grads[p] = g if param_grads[p] is None else param_grads[p] + g
        adj_cur = (gammas[:, plan.steps[j][0]].view(-1, 1, 1) * adj_next) if j > 0 else None
        adj_next = adj_here
        n_next, n_here = n_here, n_before
        del x, xi, v, reg, grads
    if n_next is not None and not torch.equal(n_next, quantise(x0, l)):
        raise RuntimeError("BDIA reconstruction is not exact: a block gave different numbers when recomputed in "
                           "backward (random features, dropout or a non-deterministic kernel?)")
    return (adj_next, noise_grad, None, None, *param_grads)


def bdia_integrate(plan: BDIAPlan, tokens: Tensor, noise: Tensor | None, signs: Tensor) -> tuple[Tensor, Tensor]:
    """Integrate the plan's blocks with the exactly reversible BDIA steps.

    Args:
        plan: the blocks, where their noise is, the grid.
        tokens: (B, N, D) input tokens x_0 (rounded to the grid; gradients pass straight through).
        noise: (B, L, K, N, m) standard normals of the blocks with diffusion, or None for the ODE.
        signs: (B, depth) integers +1 / -1: gamma = signs / 2 of each sample and block.

    Returns:
        The tokens after the last block (B, N, D), on the grid, and the attention regulariser summed over all
        drift evaluations (a scalar; 0 when the blocks have none).

    Raises:
        ValueError: ``signs`` not (B, depth) of +-1, or fewer than two steps in all.
    """
    b, depth = tokens.shape[0], len(plan.blocks)
    if signs.shape != (b, depth) or not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"signs must be a ({b}, {depth}) tensor of +1 / -1, got shape {tuple(signs.shape)}")
    params = [p for block in plan.blocks for p in block.parameters() if p.requires_grad]
    return _BDIAFunction.apply(tokens, noise, signs, plan, *params)
