"""`snodevit info VARIANT`: parameter counts and shapes of a named variant."""

from __future__ import annotations

import argparse
import math

from snodevit.config import ATTENTION_TYPES, MNIST_OVERRIDES, get_config, list_variants
from snodevit.model import SNodeViT, count_parameters
from snodevit.nn.solvers import SOLVERS
from snodevit.cli._common import add_json_flag, emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts of a model variant", description=__doc__)
    p.add_argument("variant", choices=list_variants())
    p.add_argument("--attention", default="ksvd", choices=ATTENTION_TYPES)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = {}
    for label, overrides in (("224px RGB, patch 16", dict(image_size=224, in_channels=3, patch_size=16)),
                             ("32px RGB, patch 4", dict(image_size=32, in_channels=3, patch_size=4, stem="conv")),
                             ("28px gray (MNIST), conv stem", MNIST_OVERRIDES)):
        cfg = get_config(args.variant, attention=args.attention, **overrides)
        m = SNodeViT(cfg)
        rows[label] = {"parameters": count_parameters(m), "tokens": cfg.num_tokens,
                       "noise_per_sample": math.prod(cfg.noise_shape(1, 1))}
    cfg = get_config(args.variant, attention=args.attention)
    solver = SOLVERS[cfg.solver]
    evals = solver.drift_evals_per_step
    lines = [f"{args.variant}: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.num_heads}, rank {cfg.rank}, "
             f"attention {cfg.attention}, solver {cfg.solver} x {cfg.num_steps} steps ({solver.sde_type}, strong "
             f"order {solver.strong_order:g}, {evals} drift evaluation{'s' if evals > 1 else ''} per step), "
             f"noise dim {cfg.noise_dim}"]
    for label, r in rows.items():
        lines.append(f"  {label:32s} {r['parameters'] / 1e6:7.2f}M parameters, {r['tokens']} tokens, "
                     f"{r['noise_per_sample']} noise values per sample")
    solver_info = {"name": solver.name, "sde_type": solver.sde_type, "strong_order": solver.strong_order,
                   "drift_evals_per_step": solver.drift_evals_per_step}
    emit(args, {"variant": args.variant, "config": cfg.to_dict(), "solver": solver_info, "inputs": rows},
         "\n".join(lines))
    return 0
