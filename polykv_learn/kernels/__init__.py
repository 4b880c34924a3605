"""The simulator's hot op: probe queries x shared context keys under a per-(plan, KV head, position) bias.

``context_attention(q, k, v, bias, scaling) -> (out, lse)``

- ``q``: ``(P, H, m, d)`` probe queries of ``P`` plans; ``k``, ``v``: ``(G, n, d)`` context keys/values shared by all
  plans (GQA: query head ``h`` reads KV head ``h // (H // G)``; K/V are never repeated);
- ``bias``: ``(P, G, n)`` additive key bias (a hard keep mask is 0 / -inf; the soft keep weights of training are
  ``log(w + eps)``);
- ``out``: ``(P, H, m, d)`` in q's dtype; ``lse``: ``(P, H, m)`` float32 log-sum-exp of the scaled, biased scores.
  A row whose keys are all masked gives ``out = 0`` and ``lse = -inf``; :func:`merge_attention` handles it.

Backends: ``torch`` (the reference, float64-checkable, the CPU path and the test oracle; without autograd and
with a hard 0 / -inf bias it attends to each plan's kept keys only, :mod:`polykv_learn.kernels.gathered`) and
``triton`` (fused, online softmax, blocked over ``n``). ``POLYKV_BACKEND=auto|torch|triton`` picks one; ``auto``
uses Triton for CUDA tensors when Triton imports, else torch. The Triton path runs on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from polykv_learn.kernels import gathered
from polykv_learn.kernels.reference import context_attention_reference, merge_attention

BACKENDS = ("auto", "torch", "triton")


def backend_name(device: torch.device) -> str:
    """The backend that :func:`context_attention` uses for tensors on ``device``."""
    choice = os.environ.get("POLYKV_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"POLYKV_BACKEND={choice!r} is not allowed; use one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return choice


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def context_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Dispatch to the backend chosen by :func:`backend_name` (see the module docstring for shapes)."""
    check_context_attention_inputs(q, k, v, bias)
    if backend_name(q.device) == "triton":
        from polykv_learn.kernels.triton_attention import triton_context_attention

        return triton_context_attention(q, k, v, bias, scaling)
    if gathered.applies(q, k, v, bias):  # no autograd, hard keep masks: attend to the kept keys only
        return gathered.gathered_context_attention(q, k, v, bias, scaling)
    return context_attention_reference(q, k, v, bias, scaling)


def check_context_attention_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 3 or v.ndim != 3 or bias.ndim != 3:
        raise ValueError(
            "context_attention expects q (P, H, m, d), k/v (G, n, d), bias (P, G, n); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, bias {tuple(bias.shape)}"
        )
    p, h, _, d = q.shape
    g, n, dk = k.shape
    if dk != d or v.shape[:2] != (g, n) or h % g != 0 or tuple(bias.shape) != (p, g, n):
        raise ValueError(
            "context_attention shape mismatch: need q (P, H, m, d), k/v (G, n, d) with H % G == 0, bias (P, G, n); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, bias {tuple(bias.shape)}"
        )


__all__ = ["BACKENDS", "backend_name", "context_attention", "context_attention_reference", "merge_attention"]
