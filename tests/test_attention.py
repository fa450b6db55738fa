"""The fused KSVD inference path against the explicit one, and folded sampling in passes against one pass."""

from __future__ import annotations

import pytest
import torch

import snodevit
from snodevit.nn.attention import KSVDAttention
from snodevit.inference.passes import sample_in_passes

SMALL = dict(snodevit.MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize("variant", ["tiny", "small"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_ksvd_equals_the_explicit_path(variant: str, batch: int) -> None:
    cfg = snodevit.get_config(variant, **snodevit.MNIST_OVERRIDES)
    torch.manual_seed(0)
    attn = _perturbed(KSVDAttention(cfg)).double().eval()
    x = torch.randn(batch, cfg.num_tokens, cfg.dim, dtype=torch.float64)
    lam = torch.rand(cfg.num_heads, cfg.effective_rank, dtype=torch.float64) + 0.5
    for lam_ in (lam, None):
        fused = attn(x, lam_).out
        attn.fused = False
        explicit = attn(x, lam_).out
        attn.fused = True
        torch.testing.assert_close(fused, explicit, atol=1e-12, rtol=1e-12)  # the same algebra, float64


def test_fused_model_matches_explicit_and_training_takes_the_explicit_path() -> None:
    torch.manual_seed(0)
    model = _perturbed(snodevit.create_model("tiny", **snodevit.MNIST_OVERRIDES)).eval()
    x = torch.randn(2, 1, 28, 28)
    noise = model.draw_noise(2, 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = model.sample_logits(x, noise=noise)
        for blk in model.blocks:
            blk.attn.fused = False
        explicit = model.sample_logits(x, noise=noise)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    attn = model.blocks[0].attn
    attn.fused = True
    attn.train()
    out = attn(torch.randn(2, 50, 96))
    assert out.reg is not None  # the regulariser needs the raw scores: only the explicit path has them
    assert attn(torch.randn(2, 50, 96), need_weights=True).weights is not None


@pytest.mark.parametrize("b, s, max_rows", [(3, 5, 4), (3, 5, 10), (1, 9, 4), (4, 2, 1), (2, 3, 100)])
def test_passes_give_the_one_pass_answer(b: int, s: int, max_rows: int) -> None:
    torch.manual_seed(0)
    model = _perturbed(snodevit.create_model("tiny", **SMALL)).double().eval()
    x = torch.randn(b, 1, 28, 28, dtype=torch.float64)
    noise = torch.randn(model.noise_shape(b, s), dtype=torch.float64)
    with torch.no_grad():
        one, one_attn = model.sample_logits(x, noise=noise, return_attention=True)
        logits, attn = sample_in_passes(model, x, noise, attention=True, max_rows=max_rows)
        only = sample_in_passes(model, x, noise, max_rows=max_rows)
    torch.testing.assert_close(logits, one, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attn, one_attn, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(only, logits, atol=1e-12, rtol=1e-12)  # attention maps take the explicit path
    with pytest.raises(ValueError, match="max_rows"):
        sample_in_passes(model, x, noise, max_rows=0)
