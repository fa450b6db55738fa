"""The memory-saving backprop modes of training (snodevit.training.backprop, snodevit.nn.reversible).

References the tests hold them to:
- ``reversible``: plain autograd through the same quantised BDIA forward (straight-through rounding), written
  here from the update rule alone, in float64;
- the reconstruction: every state of a 24-block forward, rebuilt backwards bit for bit;
- ``checkpoint``: the gradients of ``standard`` with the same noise.
"""

from __future__ import annotations

import pytest
import torch

from snodevit.model import create_model
from snodevit.nn.reversible import BDIAPlan, bdia_integrate, dequantise, pack_bits, quantise, unpack_bits
from snodevit.training.backprop import BACKPROP_MODES, check_backprop, draw_signs, make_runner
from snodevit.training.train import TrainConfig

L_BITS = 20


def _small(**overrides):
    base = dict(image_size=8, in_channels=1, patch_size=4, dim=24, num_heads=2, rank=2, depth=4, num_steps=2,
                noise_dim=4, time_embed_dim=8, time_hidden_dim=16, mlp_ratio=2.0)
    return create_model("tiny", **{**base, **overrides})


def _reference(model, tokens, noise, signs, l_bits):
    """The quantised BDIA forward with plain autograd: Q(v) = v + (round(v 2^l) 2^-l - v).detach()."""
    def q(v):
        return v + (torch.round(v * 2.0**l_bits) * 2.0**-l_bits - v).detach()

    first = model.cfg.first_noise_block
    x_prev, x, reg = None, q(tokens), tokens.new_zeros(())
    j = 0
    for i, block in enumerate(model.blocks):
        tp = block.time_params(tokens.dtype)
        for k in range(block.num_steps):
            xi = None if (noise is None or i < first) else noise[:, i - first, k]
            h, r = block.increment(x, xi, k, tp)
            reg = reg + (r if r is not None else 0.0)
            if j == 0:
                nxt = q(x + h)
            else:
                g = 0.5 * signs[:, i].to(tokens.dtype).view(-1, 1, 1)
                s = torch.remainder(torch.round(x_prev.detach() * 2.0**l_bits), 2)  # the parity bit
                nxt = g * x_prev + s * 2.0 ** -(l_bits + 1) + q((1 - g) * x + (1 + g) * h)
            x_prev, x = x, nxt
            j += 1
    return x, reg


def _grads(model, fn, tokens, noise):
    model.zero_grad(set_to_none=True)
    tokens = tokens.detach().requires_grad_(True)
    noise = noise.detach().requires_grad_(True) if noise is not None else None
    out, reg = fn(tokens, noise)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * weights).sum() + 3.0 * reg).backward()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), tokens.grad, (noise.grad if noise is not None else None), params


@pytest.mark.parametrize("solver,attention,noise_blocks", [("euler", "ksvd", 0), ("heun", "softmax", 2)])
def test_reversible_gradients_equal_autograd_through_the_same_quantised_forward(solver, attention, noise_blocks):
    torch.manual_seed(0)
    model = _small(solver=solver, attention=attention, noise_blocks=noise_blocks).double().train()
    b, n = 3, model.cfg.num_tokens
    tokens = torch.randn(b, n, model.cfg.dim, dtype=torch.float64)
    noise = torch.randn(b, model.cfg.num_noise_blocks, model.cfg.num_steps, n, model.cfg.noise_dim,
                        dtype=torch.float64)
    signs = draw_signs(b, model.cfg.depth, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert (signs == 1).any() and (signs == -1).any()
    plan = BDIAPlan(tuple(model.blocks), model.cfg.first_noise_block, L_BITS)
    rev = _grads(model, lambda t, z: bdia_integrate(plan, t, z, signs), tokens, noise)
    ref = _grads(model, lambda t, z: _reference(model, t, z, signs, L_BITS), tokens, noise)
    assert torch.equal(rev[0], ref[0])  # the same grid values, bit for bit
    for got, want in ((rev[1], ref[1]), (rev[2], ref[2])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert rev[3].keys() == ref[3].keys() and len(rev[3]) == len(list(model.blocks.parameters()))
    for name in ref[3]:
        torch.testing.assert_close(rev[3][name], ref[3][name], rtol=1e-10, atol=1e-12, msg=name)


def test_reconstruction_is_bit_exact_over_many_blocks():
    """Rebuild all 24 states of a float32 forward backwards from the last two, the side bits and the noise."""
    torch.manual_seed(0)
    model = _small(depth=24, num_steps=1, noise_dim=4, diffusion_scale=2.0).train()
    b, l_bits = 4, 16
    tokens = 3.0 * torch.randn(b, model.cfg.num_tokens, model.cfg.dim)
    noise = torch.randn(model.noise_shape(b)[1:])
    signs = draw_signs(b, 24, torch.Generator().manual_seed(2), torch.device("cpu"))
    states = [quantise(tokens, l_bits)]  # the forward, state by state, in grid integers
    with torch.no_grad():
        for depth in range(1, 25):
            plan = BDIAPlan(tuple(model.blocks[:depth]), 0, l_bits)
            out, _ = bdia_integrate(plan, tokens, noise[:, :depth], signs[:, :depth])
            states.append(quantise(out, l_bits))
        n_next, n_here = states[24], states[23]
        for j in range(23, 0, -1):  # x_{j-1} = sign (2 (x_{j+1} - Q(v_j)) - s_{j-1}), integers
            block, xi = model.blocks[j], noise[:, j, 0]
            x = dequantise(n_here, l_bits, torch.float32)
            h, _ = block.increment(x, xi, 0, block.time_params(torch.float32))
            g = 0.5 * signs[:, j].float().view(-1, 1, 1)
            s = unpack_bits(pack_bits(states[j - 1] & 1), n_here.shape)
            sign = signs[:, j].view(-1, 1, 1).long()
            n_before = sign * (2 * (n_next - quantise((1 - g) * x + (1 + g) * h, l_bits)) - s)
            assert torch.equal(n_before, states[j - 1]), f"state {j - 1}"
            n_next, n_here = n_here, n_before
    # and the autograd function's own backward gets back to the input (it raises if not)
    plan = BDIAPlan(tuple(model.blocks), 0, l_bits)
    out, reg = bdia_integrate(plan, tokens.requires_grad_(True), noise, signs)
    (out.sum() + reg).backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0


def test_pack_bits_round_trip():
    bits = torch.randint(0, 2, (3, 5, 7))
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (bits.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, bits.shape).long(), bits)


def test_checkpoint_gradients_equal_standard():
    model = _small(noise_blocks=3).train()
    images = torch.randn(4, 1, 8, 8)
    grads = {}
    for mode in ("standard", "checkpoint"):
        model.zero_grad(set_to_none=True)
        logits, reg = model.forward_train(images, torch.Generator().manual_seed(5), runner=make_runner(model, mode))
        (logits.square().sum() + reg).backward()
        grads[mode] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None})
    assert torch.equal(grads["standard"][0], grads["checkpoint"][0])
    assert grads["standard"][1].keys() == grads["checkpoint"][1].keys()
    for name, g in grads["standard"][1].items():
        torch.testing.assert_close(grads["checkpoint"][1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_reversible_training_step_and_eval_path():
    """A reversible model trains (every parameter gets a gradient) and evaluates like any other (gamma = 0)."""
    torch.manual_seed(0)
    model = _small()
    images = torch.randn(4, 1, 8, 8)
    runner = make_runner(model, "reversible", torch.Generator().manual_seed(3))
    logits, reg = model.train().forward_train(images, torch.Generator().manual_seed(4), runner=runner)
    (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + reg).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("diffusion_head")]
    assert missing == []
    model.eval()
    with torch.no_grad():
        plain = model.forward_train(images, torch.Generator().manual_seed(4))[0]
        via_runner = model.forward_train(images, torch.Generator().manual_seed(4), runner=runner)[0]
    assert torch.equal(plain, via_runner)


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="backprop must be one of"):
        TrainConfig(backprop="revnet")
    assert TrainConfig().backprop == "standard" and set(BACKPROP_MODES) == {"standard", "checkpoint", "reversible"}
    with pytest.raises(ValueError, match="dropout"):
        check_backprop("reversible", _small(dropout=0.1))
    with pytest.raises(ValueError, match="performer"):
        make_runner(_small(attention="performer"), "reversible")
    plan = BDIAPlan(tuple(_small().blocks), 0)
    with pytest.raises(ValueError, match="signs must be"):
        bdia_integrate(plan, torch.zeros(2, 5, 24), None, torch.zeros(2, 4, dtype=torch.int8))


def _write_folder(root, n_per_class=8):
    """Two separable classes of 16x16 RGB images: bright left half, bright right half."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 40, size=(16, 16, 3), dtype=np.uint8)
            img[:, 8 * c:8 * c + 8] += 200
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_cli_trains_reversibly_records_it_and_serves_the_model_like_any_other(tmp_path, capsys):
    import json
    import shlex

    from snodevit.checkpoint import load_model
    from snodevit.cli.main import main

    data, out = _write_folder(tmp_path / "data"), tmp_path / "model"
    code = main(["train", "--data", f"imagefolder:{data}", "--image-size", "16", "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--noise-dim", "4", "--backprop", "reversible", "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["train_config"]["backprop"] == "reversible"
    meta = json.loads((out / "meta.json").read_text())
    argv = shlex.split(meta["provenance"]["command"])
    assert argv[argv.index("--backprop") + 1] == "reversible"
    model, _ = load_model(out)  # an ordinary checkpoint: inference is the plain step (gamma = 0)
    images = torch.randn(2, 3, 16, 16)
    noise = model.draw_noise(2, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.sample_logits(images, noise=noise)
    assert logits.shape == (3, 2, model.cfg.num_classes) and torch.isfinite(logits).all()
    with pytest.raises(SystemExit) as exit_info:  # argparse names the allowed choices
        main(["train", "--data", f"imagefolder:{data}", "--out", str(out), "--backprop", "revnet"])
    assert exit_info.value.code == 2 and "invalid choice: 'revnet'" in capsys.readouterr().err
