"""The fused Triton ``context_attention`` (forward + backward) against the float64 torch reference.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set below before triton is imported when
there is no CUDA), or on a GPU when there is one.
"""

from __future__ import annotations

import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import polykv_learn.kernels as kernels  # noqa: E402
from polykv_learn.kernels import triton_attention  # noqa: E402
from polykv_learn.kernels.reference import context_attention_reference  # noqa: E402
from polykv_learn.kernels.triton_attention import triton_context_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEG_INF = float("-inf")

# (R = H // G, m, n, d): the full product (fast enough under the interpreter with its large blocks).
GRID = list(itertools.product((1, 3, 4), (1, 7, 32), (33, 128, 300), (16, 64)))


# Cases re-run with 16 x 16 tiles, so the query-block grid, the key-block loop and the d(bias) kernel's loop
# over query blocks all take several iterations (the interpreter's default tiles cover these shapes in one).
SMALL_TILE_GRID = [(1, 1, 33, 16), (3, 7, 300, 64), (4, 32, 128, 16), (1, 32, 300, 64), (3, 1, 128, 64)]
CASES = [(*case, "default") for case in GRID] + [(*case, "small") for case in SMALL_TILE_GRID]


def use_tiles(tiles: str, monkeypatch) -> None:
    if tiles == "small":
        real = triton_attention._config

        def small(rows, n, d, interpret):
            return {**real(rows, n, d, interpret), "BLOCK_M": 16, "BLOCK_N": 16}

        monkeypatch.setattr(triton_attention, "_config", small)


def make_inputs(r: int, m: int, n: int, d: int, dtype=torch.float32, seed: int = 0, p: int = 2, g: int = 2):
    """Random q/k/v and a bias with the interesting (p, g) patterns.

    (0, 0): soft log weights plus extreme entries (+30, -30, -1e4); (0, 1): fully masked (every key -inf);
    (1, 0): half the keys hard-masked, the rest 0; (1, 1): soft, a few -1e4 and -inf keys (never all).
    """
    gen = torch.Generator().manual_seed(seed)
    h = r * g
    q = torch.randn(p, h, m, d, generator=gen)
    k = torch.randn(g, n, d, generator=gen)
    v = torch.randn(g, n, d, generator=gen)
    bias = torch.randn(p, g, n, generator=gen) * 2.0
    idx = torch.randperm(n, generator=gen)
    bias[0, 0, idx[:1]] = 30.0
    bias[0, 0, idx[1:3]] = -30.0
    bias[0, 0, idx[3:5]] = -1e4
    bias[0, 1] = NEG_INF
    half = torch.zeros(n)
    half[idx[: n // 2]] = NEG_INF
    bias[1, 0] = half
    bias[1, 1, idx[: n // 4]] = -1e4
    bias[1, 1, idx[n // 4 : n // 2]] = NEG_INF
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v)) + (bias.to(DEVICE),)


MASKED_PG = (0, 1)  # the fully masked (plan, KV group) of make_inputs


def head_slice(r: int) -> slice:
    g = MASKED_PG[1]
    return slice(g * r, (g + 1) * r)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def reference_grads(q, k, v, bias, scaling, dout, dlse):
    """float64 reference gradients of sum(out * dout) + sum(lse * dlse) w.r.t. q and bias.

    The reference's logsumexp backward gives NaN on fully masked rows (exp(-inf - -inf)); the true gradient
    there is 0 (out and lse do not depend on q or a -inf bias), so those entries are zeroed here.
    """
    q64 = q.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    out, lse = context_attention_reference(q64, k.double(), v.double(), b64, scaling)
    finite = torch.isfinite(lse)
    loss = (out * dout.double()).sum() + (torch.where(finite, lse, 0.0) * dlse.double()).sum()
    dq, db = torch.autograd.grad(loss, (q64, b64))
    return torch.nan_to_num(dq, nan=0.0), torch.nan_to_num(db, nan=0.0)


@pytest.mark.parametrize(("r", "m", "n", "d", "tiles"), CASES)
def test_forward_matches_float64_reference(r, m, n, d, tiles, monkeypatch):
    use_tiles(tiles, monkeypatch)
    q, k, v, bias = make_inputs(r, m, n, d, seed=r * 1000 + m * 10 + n + d)
    scaling = d**-0.5
    out, lse = triton_context_attention(q, k, v, bias, scaling)
    ref_out, ref_lse = context_attention_reference(q.double(), k.double(), v.double(), bias.double(), scaling)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert rel_err(out, ref_out) <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite]) <= 1e-5
    assert torch.isneginf(lse[~finite]).all()
    assert not out.isnan().any()


@pytest.mark.parametrize(("r", "m", "n", "d", "tiles"), CASES)
def test_backward_matches_float64_reference(r, m, n, d, tiles, monkeypatch):
    use_tiles(tiles, monkeypatch)
    q, k, v, bias = make_inputs(r, m, n, d, seed=7 + r * 1000 + m * 10 + n + d)
    scaling = d**-0.5
    gen = torch.Generator().manual_seed(r + m + n + d)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    dlse = torch.randn(q.shape[:3], generator=gen).to(DEVICE)
    qg = q.clone().requires_grad_()
    bg = bias.clone().requires_grad_()
    out, lse = triton_context_attention(qg, k, v, bg, scaling)
    dq, db = torch.autograd.grad((out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum(), (qg, bg))
    ref_dq, ref_db = reference_grads(q, k, v, bias, scaling, dout, dlse)
    assert dq.dtype == q.dtype and db.dtype == bias.dtype
    assert torch.isfinite(dq).all() and torch.isfinite(db).all()
    assert rel_err(dq, ref_dq) <= 1e-4
    assert rel_err(db, ref_db) <= 1e-4
    p, g = MASKED_PG
    assert (dq[p, head_slice(r)] == 0).all()
    assert (db[p, g] == 0).all()


def test_gradients_of_lse_alone():
    r, m, n, d = 3, 7, 128, 16
    q, k, v, bias = make_inputs(r, m, n, d, seed=3)
    dlse = torch.randn(q.shape[:3]).to(DEVICE)
    qg = q.clone().requires_grad_()
    bg = bias.clone().requires_grad_()
    _, lse = triton_context_attention(qg, k, v, bg, 0.25)
    dq, db = torch.autograd.grad((lse.nan_to_num(neginf=0.0) * dlse).sum(), (qg, bg))
    ref_dq, ref_db = reference_grads(q, k, v, bias, 0.25, torch.zeros_like(q), dlse)
    assert rel_err(dq, ref_dq) <= 1e-4 and rel_err(db, ref_db) <= 1e-4


def test_gradcheck_reference_then_compare_triton():
    """gradcheck the float64 reference (finite differences), then hold the fp32 Triton gradients to it."""
    r, m, n, d = 2, 3, 40, 16
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2 * r, m, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, 2, n, generator=gen, dtype=torch.float64)
    bias[0, 1, ::3] = NEG_INF  # hard-masked keys (never a whole row: the reference's gradient is NaN there)
    bias[1, 0, :4] = -30.0
    bias[1, 1, :2] = 30.0
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(q.shape[:3], generator=gen, dtype=torch.float64)
    scaling = d**-0.5

    def loss(q_, b_):
        out, lse = context_attention_reference(q_, k, v, b_, scaling)
        return (out * dout).sum() + (lse * dlse).sum()

    q64 = q.clone().requires_grad_()
    b64 = bias.clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (q64, b64), eps=1e-6, atol=1e-6, rtol=1e-5)
    ref_dq, ref_db = torch.autograd.grad(loss(q64, b64), (q64, b64))

    qf = q.float().to(DEVICE).requires_grad_()
    bf = bias.float().to(DEVICE).requires_grad_()
    out, lse = triton_context_attention(qf, k.float().to(DEVICE), v.float().to(DEVICE), bf, scaling)
    dq, db = torch.autograd.grad(
        (out * dout.float().to(DEVICE)).sum() + (lse * dlse.float().to(DEVICE)).sum(), (qf, bf)
    )
    assert rel_err(dq, ref_dq) <= 1e-4
    assert rel_err(db, ref_db) <= 1e-4


def test_fully_masked_rows_give_zero_out_neg_inf_lse_zero_grads():
    r, m, n, d = 4, 7, 33, 16
    q, k, v, bias = make_inputs(r, m, n, d, seed=5)
    bias[1, 0] = NEG_INF  # a second fully masked group, besides MASKED_PG
    qg = q.clone().requires_grad_()
    bg = bias.clone().requires_grad_()
    out, lse = triton_context_attention(qg, k, v, bg, 0.3)
    for p, g in (MASKED_PG, (1, 0)):
        heads = slice(g * r, (g + 1) * r)
        assert (out[p, heads] == 0).all()
        assert torch.isneginf(lse[p, heads]).all()
    assert not out.isnan().any() and not lse.isnan().any()
    loss = out.sum() + lse.nan_to_num(neginf=0.0).sum()
    dq, db = torch.autograd.grad(loss, (qg, bg))
    assert torch.isfinite(dq).all() and torch.isfinite(db).all()
    for p, g in (MASKED_PG, (1, 0)):
        assert (dq[p, g * r : (g + 1) * r] == 0).all()
        assert (db[p, g] == 0).all()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_low_precision_forward_and_backward(dtype, tol):
    r, m, n, d = 4, 7, 300, 64
    q, k, v, bias = make_inputs(r, m, n, d, dtype=dtype, seed=9)
    scaling = d**-0.5
    qg = q.clone().requires_grad_()
    out, lse = triton_context_attention(qg, k, v, bias, scaling)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = context_attention_reference(q.double(), k.double(), v.double(), bias.double(), scaling)
    assert rel_err(out, ref_out) <= tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite]) <= tol
    dout = torch.randn(q.shape).to(DEVICE)
    (dq,) = torch.autograd.grad((out.float() * dout).sum(), (qg,))
    ref_dq, _ = reference_grads(q, k, v, bias, scaling, dout, torch.zeros(q.shape[:3], device=DEVICE))
    assert dq.dtype == dtype and torch.isfinite(dq).all()
    assert rel_err(dq, ref_dq) <= 5 * tol


def test_non_contiguous_inputs():
    r, m, n, d = 3, 7, 33, 16
    q, k, v, bias = make_inputs(r, m, n, d, seed=13)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    bt = bias.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (qt.is_contiguous() or kt.is_contiguous() or bt.is_contiguous())
    out, lse = triton_context_attention(qt, kt, v, bt, 0.5)
    out2, lse2 = triton_context_attention(q, k, v, bias, 0.5)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(lse, lse2)


def test_kv_requiring_grad_is_rejected():
    q, k, v, bias = make_inputs(1, 1, 33, 16)
    with pytest.raises(ValueError, match="k and v are constants"):
        triton_context_attention(q, k.requires_grad_(), v, bias, 1.0)
    with torch.no_grad():  # nothing is recorded: fine
        triton_context_attention(q, k, v, bias, 1.0)


def test_dispatch_to_triton_backend_matches_torch(monkeypatch):
    q, k, v, bias = make_inputs(3, 7, 128, 16, seed=21)
    calls = []
    real = triton_attention.triton_context_attention

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(triton_attention, "triton_context_attention", spy)
    monkeypatch.setenv("POLYKV_BACKEND", "triton")
    assert kernels.backend_name(q.device) == "triton"
    out, lse = kernels.context_attention(q, k, v, bias, 0.25)
    assert len(calls) == 1
    monkeypatch.setenv("POLYKV_BACKEND", "torch")
    assert kernels.backend_name(q.device) == "torch"
    ref_out, ref_lse = kernels.context_attention(q, k, v, bias, 0.25)
    assert len(calls) == 1
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_bogus_backend_raises(monkeypatch):
    q, k, v, bias = make_inputs(1, 1, 33, 16)
    monkeypatch.setenv("POLYKV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus") as info:
        kernels.context_attention(q, k, v, bias, 1.0)
    for name in kernels.BACKENDS:
        assert name in str(info.value)
