"""How training gets its gradients through the blocks: ``standard``, ``checkpoint`` or ``reversible``.

- ``standard``: autograd keeps every block's activations (memory grows with depth).
- ``checkpoint``: ``torch.utils.checkpoint`` per block keeps only each block's input and recomputes the block in
  backward. The noise is an input of the block, so the recomputation is exact and the gradients equal
  ``standard``'s.
- ``reversible``: the BDIA steps of :mod:`snodevit.nn.reversible` with gamma = +-1/2 drawn per sample and block,
  activations on a fixed-point grid with one side bit per element; backward rebuilds each block's input from the
  states after it. gamma = 0 is the plain step, so a model trained this way is served, exported and calibrated
  like any other.

Each mode is a *runner*: a function with the signature of :meth:`snodevit.model.SNodeViT.integrate` that
:meth:`~snodevit.model.SNodeViT.forward_train` calls in its place; the rest of the forward pass is shared.

References:
    Chen, Xu, Zhang, Guestrin. "Training Deep Nets with Sublinear Memory Cost." arXiv:1604.06174, 2016.
    Zhang, Lewis, Kleijn. "On Exact Bit-level Reversible Transformers Without Changing Architectures."
    arXiv:2407.09093, 2024.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from snodevit.model import ForwardAux, SNodeViT
from snodevit.nn.reversible import DEFAULT_FRAC_BITS, BDIAPlan, bdia_integrate

__all__ = ["BACKPROP_MODES", "BackpropMode", "Runner", "check_backprop", "make_runner"]

BackpropMode = Literal["standard", "checkpoint", "reversible"]
BACKPROP_MODES: tuple[str, ...] = get_args(BackpropMode)

#: What :meth:`SNodeViT.forward_train` calls instead of ``integrate``: (tokens, noise, need_weights) -> (tokens, aux).
Runner = Callable[[Tensor, "Tensor | None", bool], "tuple[Tensor, ForwardAux]"]


def check_backprop(mode: str, model: SNodeViT | None = None) -> None:
    """Refuse a mode that does not exist, or ``reversible`` for a model whose blocks are not deterministic given
    their input and noise (BDIA recomputes them in backward and must get the same numbers).

    Raises:
        ValueError: naming the mode or the model setting that is the problem, and what to use instead.
    """
    if mode not in BACKPROP_MODES:
        raise ValueError(f"backprop must be one of {list(BACKPROP_MODES)}, got {mode!r}")
    if mode != "reversible" or model is None:
        return
    cfg = model.cfg
    if cfg.dropout > 0:
        raise ValueError(f"backprop 'reversible' needs dropout 0 (backward recomputes each block and dropout would draw "
                         f"a new mask), got dropout={cfg.dropout}; use --backprop checkpoint")
    if cfg.attention == "performer":
        raise ValueError("backprop 'reversible' cannot train performer attention: it redraws its random features at "
                         "every training forward, so a block recomputed in backward differs; use --backprop checkpoint")


def make_runner(model: SNodeViT, mode: str, generator: torch.Generator | None = None,
                frac_bits: int = DEFAULT_FRAC_BITS) -> Runner | None:
    """The runner of ``mode`` for ``model`` (None for ``standard``: the model's own ``integrate``).

    Args:
        model: the model being trained.
        mode: one of :data:`BACKPROP_MODES`.
        generator: draws the reversible mode's gamma signs (the training noise's generator; None: the global one).
        frac_bits: l of the reversible mode's grid 2^-l Z.

    Raises:
        ValueError: from :func:`check_backprop`.
    """
    check_backprop(mode, model)
    if mode == "checkpoint":
        return lambda tokens, noise, need_weights: _checkpointed(model, tokens, noise)
    if mode == "reversible":
        plan = BDIAPlan(tuple(model.blocks), model.cfg.first_noise_block, frac_bits)
        return lambda tokens, noise, need_weights: _reversible(model, plan, tokens, noise, generator)
    return None


def _checkpointed(model: SNodeViT, tokens: Tensor, noise: Tensor | None) -> tuple[Tensor, ForwardAux]:
    """``integrate`` one block at a time under ``torch.utils.checkpoint``: only each block's input is kept."""
    reg = tokens.new_zeros(())
    for i in range(len(model.blocks)):
        tokens, aux = checkpoint(model.integrate, tokens, noise, False, start=i, stop=i + 1, final_norm=False,
                                 use_reentrant=False)
        reg = reg + aux.reg
    return model.norm(tokens), ForwardAux(None, reg)


def draw_signs(batch_size: int, depth: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """gamma / (1/2) of every sample and block: (B, depth) int8, +1 or -1 with probability 1/2 each."""
    gen_device = generator.device if generator is not None else device
    bits = torch.randint(0, 2, (batch_size, depth), generator=generator, device=gen_device, dtype=torch.int8)
    return (2 * bits - 1).to(device)


def _reversible(model: SNodeViT, plan: BDIAPlan, tokens: Tensor, noise: Tensor | None,
                generator: torch.Generator | None) -> tuple[Tensor, ForwardAux]:
    """The BDIA steps with fresh gamma signs in training; the plain ``integrate`` in eval (gamma = 0)."""
    if not model.training:
        return model.integrate(tokens, noise)
    signs = draw_signs(tokens.shape[0], len(plan.blocks), generator, tokens.device)
    out, reg = bdia_integrate(plan, tokens, noise, signs)
    return model.norm(out), ForwardAux(None, reg)
