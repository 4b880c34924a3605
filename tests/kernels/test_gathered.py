"""The no-grad gathered path (kept keys only) equals the float64 reference on hard keep masks."""

import pytest
import torch

from polykv_learn.kernels import context_attention, gathered
from polykv_learn.kernels.reference import context_attention_reference


def hard_inputs(p: int, g: int, r: int, m: int, n: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(p, g * r, m, d, generator=gen)
    k = torch.randn(g, n, d, generator=gen)
    v = torch.randn(g, n, d, generator=gen)
    # per (plan, head) a different keep count: none, a few, about half, everything
    counts = torch.randint(0, n + 1, (p, g), generator=gen)
    counts[0, 0], counts[-1, -1] = 0, n
    ranks = torch.argsort(torch.rand(p, g, n, generator=gen), dim=-1).argsort(dim=-1)
    bias = torch.where(ranks < counts[..., None], 0.0, float("-inf"))
    return q, k, v, bias


@pytest.mark.parametrize(("p", "g", "r", "m", "n"), [(5, 3, 3, 7, 300), (8, 1, 4, 1, 64), (3, 2, 1, 32, 33)])
def test_gathered_equals_float64_reference(p, g, r, m, n):
    q, k, v, bias = hard_inputs(p, g, r, m, n, 16, seed=p * n)
    out, lse = gathered.gathered_context_attention(q, k, v, bias, 0.25)
    ref_out, ref_lse = context_attention_reference(q.double(), k.double(), v.double(), bias.double(), 0.25)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max().item() <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "fully masked rows must give lse = -inf, only they"
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() <= 1e-5
    assert torch.all(out[~finite] == 0)


def test_dispatch_uses_gathered_only_for_hard_no_grad_inputs(monkeypatch):
    monkeypatch.setenv("POLYKV_BACKEND", "torch")
    q, k, v, bias = hard_inputs(4, 3, 3, 5, 120, 8, seed=7)
    calls = []
    real = gathered.gathered_context_attention
    monkeypatch.setattr(gathered, "gathered_context_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out, _ = context_attention(q, k, v, bias, 0.3)
    assert calls == [1]
    ref, _ = context_attention_reference(q, k, v, bias, 0.3)
    assert (out - ref).abs().max().item() <= 1e-5
    soft = torch.log(torch.rand(bias.shape, generator=torch.Generator().manual_seed(1)) + 1e-3)
    with torch.no_grad():
        context_attention(q, k, v, soft, 0.3)  # soft keep weights: reference
    context_attention(q.requires_grad_(), k, v, bias, 0.3)  # gradients needed: reference
    context_attention(q.detach().double(), k.double(), v.double(), bias.double(), 0.3)  # float64: reference
    assert calls == [1]
    assert not gathered.is_hard_bias(soft) and gathered.is_hard_bias(bias)
