"""TimeNet(cfg): built from the model's config (nanoGPT's ``Block(config)``), at the identity of a pre-norm block."""

from __future__ import annotations

import torch

from snodevit import MNIST_OVERRIDES, get_config
from snodevit.nn.timenet import TimeNet


def test_timenet_takes_the_config_and_sizes_its_outputs_from_it() -> None:
    cfg = get_config("tiny", **MNIST_OVERRIDES, rank_mode="adaptive")
    t = torch.linspace(0, 1, cfg.num_steps + 1)
    sde, ode = TimeNet(cfg).eval(), TimeNet(cfg, stochastic=False).eval()
    names = {k: tuple(v.shape) for k, v in sde.state_dict().items()}
    assert names == {"net.0.weight": (cfg.time_hidden_dim, cfg.time_embed_dim), "net.0.bias": (cfg.time_hidden_dim,),
                     "net.2.weight": (6 * cfg.dim + cfg.num_heads * cfg.effective_rank + cfg.noise_dim,
                                      cfg.time_hidden_dim),
                     "net.2.bias": (6 * cfg.dim + cfg.num_heads * cfg.effective_rank + cfg.noise_dim,)}
    tp, tp_ode = sde(t), ode(t)
    assert tp.lam.shape == (len(t), cfg.num_heads, cfg.effective_rank) and tp.sigma.shape == (len(t), cfg.noise_dim)
    assert tp_ode.sigma.shape == (len(t), 0)  # an ODE block has no diffusion gate
    # it starts as a plain pre-norm block: no modulation, unit gates, lambda = 1, sigma = diffusion_scale / 2
    assert torch.equal(tp.shift1, torch.zeros_like(tp.shift1)) and torch.equal(tp.gate2, torch.ones_like(tp.gate2))
    torch.testing.assert_close(tp.lam, torch.full_like(tp.lam, 1.0 + 1e-4))
    torch.testing.assert_close(tp.sigma, torch.full_like(tp.sigma, cfg.diffusion_scale / 2))
    assert TimeNet(get_config("tiny", noise_dim=0)).noise_dim == 0
