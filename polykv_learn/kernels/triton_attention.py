"""Fused Triton kernels for :func:`polykv_learn.kernels.context_attention`, forward and backward (q, bias).

Layout trick (GQA without copies): ``q`` is contiguous ``(P, H, m, d)`` = ``(P, G, R, m, d)`` with
``R = H // G``, and all ``R`` query heads of KV group ``g`` read the same ``k[g]``, ``v[g]`` and
``bias[p, g]``. So for each ``(p, g)`` the kernels see one block of ``R * m`` query rows against ``n`` keys:
a query tile mixes heads of one group and every K/V tile loaded from memory serves all of them. ``out`` and
``lse`` share that row layout.

- forward: grid ``(cdiv(R*m, BLOCK_M), G*P)``; online softmax over ``n`` in ``BLOCK_N`` blocks, fp32
  accumulation, the running max guarded so a fully masked row gives ``out = 0``, ``lse = -inf`` and no NaN.
- backward: ``delta = rowsum(dO * O) - dlse`` (torch, O(P H m d)); then a dQ kernel per (query block, p*g)
  and a d(bias) kernel per (key block, p*g) that loops over the group's query rows (deterministic, no
  atomics). Both recompute ``P = exp(s - lse)`` and use ``dS = P * (dO V^T - delta)``;
  ``dq = scaling * dS K``, ``dbias[p, g, j] = sum_rows dS[:, j]``.

Limits: ``k`` and ``v`` are constants (the frozen model's context): asking for their gradient raises.
float64 inputs are delegated to the torch reference (``tl.dot`` has no fp64 on GPU; float64 is the
exact-check path anyway). fp32 inputs use IEEE fp32 dots (no TF32), bf16/fp16 dot natively with fp32
accumulation. Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) every tile is upcast to fp32 right
after loading, because the interpreter's bf16 arithmetic is not faithful.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from polykv_learn.kernels.reference import context_attention_reference

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    B,
    O,
    L,
    scaling,
    G,
    n,
    d,
    rows,  # R * m query rows per (p, g)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_pg = tl.program_id(1)  # = g * P + p: neighbouring programs share K/V (L2 reuse)
    num_p = tl.num_programs(1) // G
    g = pid_pg // num_p
    p = pid_pg % num_p
    pg = p * G + g  # index of the (p, g) block in q / out / lse / bias

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    d_ok = offs_d < d

    q_ptrs = Q + (pg * rows + offs_m[:, None]).to(tl.int64) * d + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    k_base = K + g.to(tl.int64) * n * d
    v_base = V + g.to(tl.int64) * n * d
    b_base = B + pg.to(tl.int64) * n

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        kv_off = offs_n[:, None].to(tl.int64) * d + offs_d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        bias = tl.load(b_base + offs_n, mask=n_ok, other=float("-inf")).to(tl.float32)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scaling + bias[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far masked: avoid -inf - -inf
        alpha = tl.exp(m_i - m_safe)  # m_i = -inf -> 0
        prob = tl.exp(s - m_safe[:, None])  # masked -> 0
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(has_keys[:, None], out, 0.0)
    lse = tl.where(has_keys, m_i + tl.log(l_safe), float("-inf"))

    o_ptrs = O + (pg * rows + offs_m[:, None]).to(tl.int64) * d + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(L + pg.to(tl.int64) * rows + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    B,
    DO,
    L,
    DELTA,
    DQ,
    scaling,
    G,
    n,
    d,
    rows,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_pg = tl.program_id(1)
    num_p = tl.num_programs(1) // G
    g = pid_pg // num_p
    p = pid_pg % num_p
    pg = p * G + g

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    d_ok = offs_d < d
    qd_mask = row_ok[:, None] & d_ok[None, :]

    row_off = (pg * rows + offs_m[:, None]).to(tl.int64) * d + offs_d[None, :]
    q = tl.load(Q + row_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + row_off, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(L + pg.to(tl.int64) * rows + offs_m, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + pg.to(tl.int64) * rows + offs_m, mask=row_ok, other=0.0)
    live = lse > float("-inf")  # fully masked (or padding) rows get P = 0
    lse_safe = tl.where(live, lse, 0.0)

    k_base = K + g.to(tl.int64) * n * d
    v_base = V + g.to(tl.int64) * n * d
    b_base = B + pg.to(tl.int64) * n

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        kv_off = offs_n[:, None].to(tl.int64) * d + offs_d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        bias = tl.load(b_base + offs_n, mask=n_ok, other=float("-inf")).to(tl.float32)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scaling + bias[None, :]
        prob = tl.exp(s - lse_safe[:, None])
        prob = tl.where(live[:, None] & n_ok[None, :], prob, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = prob * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq = dq * scaling
    tl.store(DQ + row_off, dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dbias_kernel(
    Q,
    K,
    V,
    B,
    DO,
    L,
    DELTA,
    DB,
    scaling,
    G,
    n,
    d,
    rows,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_pg = tl.program_id(1)
    num_p = tl.num_programs(1) // G
    g = pid_pg // num_p
    p = pid_pg % num_p
    pg = p * G + g

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n
    d_ok = offs_d < d
    kv_off = offs_n[:, None].to(tl.int64) * d + offs_d[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + g.to(tl.int64) * n * d + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + g.to(tl.int64) * n * d + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    b_ptrs = B + pg.to(tl.int64) * n + offs_n
    bias = tl.load(b_ptrs, mask=n_ok, other=float("-inf")).to(tl.float32)

    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, rows, BLOCK_M):  # all R heads x m queries of the group
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < rows
        qd_mask = row_ok[:, None] & d_ok[None, :]
        row_off = (pg * rows + offs_m[:, None]).to(tl.int64) * d + offs_d[None, :]
        q = tl.load(Q + row_off, mask=qd_mask, other=0.0)
        do = tl.load(DO + row_off, mask=qd_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(L + pg.to(tl.int64) * rows + offs_m, mask=row_ok, other=float("-inf"))
        delta = tl.load(DELTA + pg.to(tl.int64) * rows + offs_m, mask=row_ok, other=0.0)
        live = lse > float("-inf")
        lse_safe = tl.where(live, lse, 0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scaling + bias[None, :]
        prob = tl.exp(s - lse_safe[:, None])
        prob = tl.where(live[:, None] & n_ok[None, :], prob, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = prob * (dp - delta[:, None])
        db += tl.sum(ds, axis=0)

    tl.store(DB + pg.to(tl.int64) * n + offs_n, db.to(DB.dtype.element_ty), mask=n_ok)


def _interpreting(device: torch.device) -> bool:
    """CPU tensors only run under the interpreter; TRITON_INTERPRET=1 also interprets CUDA launches."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(rows: int, n: int, d: int, interpret: bool) -> dict:
    """Block sizes (all >= 16, powers of two: legal for ``tl.dot`` on GPU) and launch options."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpret:  # few, large numpy steps
        block_m = max(16, min(128, triton.next_power_of_2(rows)))
        block_n = max(16, min(128, triton.next_power_of_2(n)))
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d}
    block_m = max(16, min(128 if block_d <= 64 else 64, triton.next_power_of_2(rows)))
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 2}


def _flags(dtype: torch.dtype, interpret: bool) -> dict:
    # fp32 inputs: exact fp32 dots (TF32 would cost ~1e-3 relative error); the interpreter upcasts every tile.
    # For bf16/fp16 operands the precision flag is ignored (native tensor-core dots, fp32 accumulation).
    upcast = interpret
    prec = "ieee" if (upcast or dtype == torch.float32) else "tf32"
    return {"UPCAST": upcast, "DOT_PREC": prec}


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    p, h, m, d = q.shape
    g, n, _ = k.shape
    rows = (h // g) * m
    out = torch.empty_like(q)
    lse = torch.empty((p, h, m), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    interpret = _interpreting(q.device)
    cfg = _config(rows, n, d, interpret)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), p * g)
    _fwd_kernel[grid](q, k, v, bias, out, lse, float(scaling), g, n, d, rows, **cfg, **_flags(q.dtype, interpret))
    return out, lse


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    scaling: float,
    need_dq: bool,
    need_dbias: bool,
) -> tuple[Tensor | None, Tensor | None]:
    p, h, m, d = q.shape
    g, n, _ = k.shape
    rows = (h // g) * m
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)  # (P, H, m)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = dbias = None
    if q.numel() == 0 or n == 0:  # nothing to launch: every gradient is 0
        return (torch.zeros_like(q) if need_dq else None), (torch.zeros_like(bias) if need_dbias else None)
    interpret = _interpreting(q.device)
    cfg = _config(rows, n, d, interpret)
    flags = _flags(q.dtype, interpret)
    if need_dq:
        dq = torch.empty_like(q)
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]), p * g)
        _bwd_dq_kernel[grid](q, k, v, bias, dout, lse, delta, dq, float(scaling), g, n, d, rows, **cfg, **flags)
    if need_dbias:
        dbias = torch.empty_like(bias)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), p * g)
        _bwd_dbias_kernel[grid](q, k, v, bias, dout, lse, delta, dbias, float(scaling), g, n, d, rows, **cfg, **flags)
    return dq, dbias


class _ContextAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float):
        out, lse = _forward(q, k, v, bias, scaling)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scaling = scaling
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, bias, out, lse = ctx.saved_tensors
        need_dq, _, _, need_dbias, _ = ctx.needs_input_grad
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dbias = _backward(q, k, v, bias, out, lse, dout, dlse, ctx.scaling, need_dq, need_dbias)
        return dq, None, None, dbias, None


def triton_context_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Fused ``context_attention`` (see :mod:`polykv_learn.kernels`), differentiable w.r.t. ``q``, ``bias``.

    ``k``/``v`` must not require grad while autograd records (raises ``ValueError``: detach them). float64
    inputs go to the torch reference. Other dtypes: float32, bfloat16, float16 (``k``/``v`` in q's dtype,
    ``bias`` any floating dtype).
    """
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        raise ValueError(
            "triton_context_attention differentiates w.r.t. q and bias only; k and v are constants: pass them detached"
        )
    if q.dtype == torch.float64:
        return context_attention_reference(q, k, v, bias, scaling)
    if q.dtype not in _SUPPORTED:
        raise TypeError(
            f"triton_context_attention supports float32/bfloat16/float16 (and float64 via torch), got {q.dtype}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}; got k {k.dtype}, v {v.dtype}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
    return _ContextAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous(), float(scaling))


__all__ = ["triton_context_attention"]
