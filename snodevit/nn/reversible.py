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
    """The 0/1 tensor of ``shape`` that :func:`pack_bits` packed, as uint8 (arithmetic with int64 promotes)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1  # (bytes, 8)
    count = 1
    for size in shape:
        count *= size
    return bits.reshape(-1)[:count].reshape(shape)


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


def _combine(x: Tensor, h: Tensor, gamma: Tensor | None) -> Tensor:
    """What is rounded to the grid: x + h for the first step, (1 - gamma) x + (1 + gamma) h after it."""
    if gamma is None:
        return x + h
    return (1.0 - gamma) * x + (1.0 + gamma) * h


def _half_step(n_prev: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """gamma x_{j-1} + s 2^-(l+1) in grid integers, (sign n + s) / 2 (exact: n + s is even), and the side bit s."""
    s = n_prev & 1  # parity; the same for n and -n
    half = sign * n_prev
    half += s
    half >>= 1  # an exact halving, in place: the shift is cheaper than an integer division
    return half, s


class _Tape:
    """The two newest states in grid integers, shared along the chain of block functions: forward moves them
    down the blocks, backward rebuilds them back up (block i's backward leaves the states block i - 1 ended on)."""

    def __init__(self, n_cur: Tensor) -> None:
        self.n_prev: Tensor | None = None  # x_{j-1} 2^l
        self.n_cur = n_cur  # x_j 2^l
        self.step = 0  # j: the steps taken so far


def _forward_block(plan: BDIAPlan, i: int, tape: _Tape, xi: Tensor | None, sign: Tensor,
                   dtype: torch.dtype) -> tuple[list[Tensor], Tensor | None]:
    """Block i's K BDIA steps without gradients, moving the tape on: the packed side bits and the regulariser."""
    block, l = plan.blocks[i], plan.frac_bits
    tp = block.time_params(dtype)
    side: list[Tensor] = []
    reg: Tensor | None = None
    for k in range(block.num_steps):
        x = dequantise(tape.n_cur, l, dtype)
        h, r = block.increment(x, None if xi is None else xi[:, k], k, tp)
        reg = r if reg is None else (reg if r is None else reg + r)
        q = quantise(_combine(x, h, None if tape.n_prev is None else 0.5 * sign.to(dtype)), l)
        if tape.n_prev is not None:
            half, s = _half_step(tape.n_prev, sign.to(torch.int64))
            side.append(pack_bits(s))
            q += half
        tape.n_prev, tape.n_cur, tape.step = tape.n_cur, q, tape.step + 1
    return side, reg


class _BDIABlock(torch.autograd.Function):
    """One block's BDIA steps: (x_{j-1}, x_j) -> (x_{j+K-1}, x_{j+K}, regulariser), keeping no activations.

    The float states in and out only carry gradients; the values live on the tape. Backward rebuilds the block's
    input states from its output states and recomputes each step with gradients. One function per block, so
    autograd accumulates each block's parameter gradients as soon as its backward is done.
    """

    @staticmethod
    def forward(ctx: Any, x_prev: Tensor | None, x_cur: Tensor, xi: Tensor | None, sign: Tensor, tape: _Tape,
                plan: BDIAPlan, i: int, *params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.first_step, ctx.first_is_start = tape.step, tape.n_prev is None
        ctx.side, reg = _forward_block(plan, i, tape, xi, sign, x_cur.dtype)
        ctx.tape, ctx.plan, ctx.i, ctx.params, ctx.has_xi = tape, plan, i, params, xi is not None
        device = x_cur.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # the input itself only where nothing comes before it: the final check that x_0 came back bit for bit
        ctx.save_for_backward(sign, x_cur if ctx.first_is_start else None, xi)
        assert tape.n_prev is not None
        out_prev = dequantise(tape.n_prev, plan.frac_bits, x_cur.dtype)
        out_cur = dequantise(tape.n_cur, plan.frac_bits, x_cur.dtype)
        return out_prev, out_cur, (reg if reg is not None else x_cur.new_zeros(())).detach()

    @staticmethod
    def backward(ctx: Any, grad_prev: Tensor, grad_cur: Tensor, grad_reg: Tensor) -> tuple[Tensor | None, ...]:
        sign, x0, xi = ctx.saved_tensors
        tape, plan = ctx.tape, ctx.plan
        if tape.step != ctx.first_step + plan.blocks[ctx.i].num_steps:
            raise RuntimeError("BDIA backward ran out of order (each forward can be backpropagated once)")
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            grads = _backward_block(ctx, tape, grad_cur, grad_prev, grad_reg, sign, xi)
        if ctx.first_is_start and not torch.equal(tape.n_cur, quantise(x0, plan.frac_bits)):
            raise RuntimeError("BDIA reconstruction is not exact: a block gave different numbers when recomputed "
                               "in backward (random features, dropout or a non-deterministic kernel?)")
        adj_prev, adj_cur, grad_xi, param_grads = grads
        return (adj_prev, adj_cur, grad_xi, None, None, None, None, *param_grads)


def _recompute(plan: BDIAPlan, i: int, k: int, n_cur: Tensor, xi: Tensor | None, gamma: Tensor | None,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """Step k of block i again from its input state, with gradients: the input leaf, the value rounded to the
    grid (before rounding) and the step's regulariser. ``xi``: the block's noise (B, K, N, m) or None."""
    block = plan.blocks[i]
    x = dequantise(n_cur, plan.frac_bits, dtype).requires_grad_(True)
    with torch.enable_grad():  # backward runs without grad mode: the noise's slice must be taken in here too
        h, reg = block.increment(x, None if xi is None else xi[:, k], k, block.time_params(dtype))
        v = _combine(x, h, gamma)
    return x, v, reg


def _backward_block(ctx: Any, tape: _Tape, adj_next: Tensor, adj_cur: Tensor, grad_reg: Tensor, sign: Tensor,
                    xi_all: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor | None, list[Tensor | None]]:
    """Walk the block's steps backwards: rebuild each step's input from the two states after it, recompute the
    step with gradients, and accumulate the adjoints of the states (x_{j+1} = gamma x_{j-1} + F_j(x_j)).

    Returns:
        The adjoints of the block's two input states (None for a missing x_{j-1}), the gradient of its noise and
        of its parameters.
    """
    plan, i, params = ctx.plan, ctx.i, list(ctx.params)
    l, dtype = plan.frac_bits, adj_next.dtype
    needs_xi = ctx.has_xi and ctx.needs_input_grad[2]
    xi_leaf = xi_all.detach().requires_grad_(True) if needs_xi else xi_all
    param_grads: list[Tensor | None] = [None] * len(params)
    gamma = 0.5 * sign.to(dtype)
    n_next, n_here = tape.n_cur, tape.n_prev
    for k in range(plan.blocks[i].num_steps - 1, -1, -1):
        first_of_all = ctx.first_is_start and k == 0
        x, v, reg = _recompute(plan, i, k, n_here, xi_leaf, None if first_of_all else gamma, dtype)
        n_before = None
        if not first_of_all:  # x_{j-1} = (x_{j+1} - Q(v) - s 2^-(l+1)) / gamma, in grid integers
            s = unpack_bits(ctx.side[k - 1 if ctx.first_is_start else k], n_here.shape)
            n_before = quantise(v.detach(), l)  # then, in place: sign (2 (n_next - Q(v)) - s)
            n_before.neg_().add_(n_next).mul_(2).sub_(s).mul_(sign.to(torch.int64))
        inputs = [x] + ([xi_leaf] if needs_xi else []) + params
        outs, grads_out = [v], [adj_next]
        if reg is not None:
            outs.append(reg)
            grads_out.append(grad_reg)
        grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
        adj_next, adj_cur = adj_cur + grads[0], (gamma * adj_next if not first_of_all else None)
        for p, g in enumerate(grads[2 if needs_xi else 1:]):
            if g is not None:
                param_grads[p] = g if param_grads[p] is None else param_grads[p] + g
        if needs_xi:
            xi_grad = grads[1] if k == plan.blocks[i].num_steps - 1 else xi_grad + grads[1]
        n_next, n_here = n_here, n_before
    tape.n_cur, tape.n_prev, tape.step = n_next, n_here, ctx.first_step
    return adj_cur, adj_next, (xi_grad if needs_xi else None), param_grads


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
        ValueError: ``signs`` not (B, depth) of +-1.
    """
    b, depth = tokens.shape[0], len(plan.blocks)
    if signs.shape != (b, depth) or not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"signs must be a ({b}, {depth}) tensor of +1 / -1, got shape {tuple(signs.shape)}")
    tape = _Tape(quantise(tokens.detach(), plan.frac_bits))
    x_prev, x_cur, reg = None, tokens, tokens.new_zeros(())
    for i, block in enumerate(plan.blocks):
        xi = None if (noise is None or i < plan.first_noise_block) else noise[:, i - plan.first_noise_block]
        params = [p for p in block.parameters() if p.requires_grad]
        sign = signs[:, i].view(-1, 1, 1)
        x_prev, x_cur, r = _BDIABlock.apply(x_prev, x_cur, xi, sign, tape, plan, i, *params)
        reg = reg + r
    return x_cur, reg
