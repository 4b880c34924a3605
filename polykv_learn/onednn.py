"""Matrix products through oneDNN where it is faster than the default BLAS.

PyTorch's CPU wheels run ``torch.nn.functional.linear`` / ``matmul`` in float32 through MKL, which on AMD CPUs
takes its AVX2 code path; oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel TorchInductor emits) uses
AVX-512 on any vendor, which makes SmolLM2's linear layers faster from a few rows up
(``benchmarks/linear_backend.py`` measures both; its results are in ``docs/results.md``); a single row (a
matrix-vector product, bound by reading the weights) is as fast or faster through MKL, so it stays there.

The result is the same product up to float32 rounding (another summation order), so the switch is made per model
(:func:`polykv_learn.adapter.use_onednn_linear`; :func:`polykv_learn.models.load_model` makes it on CPU): one
model object gives one set of numbers. No autograd formula exists for the
oneDNN op, so anything that needs gradients takes ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MIN_ROWS", "available", "enabled", "linear", "set_enabled"]

MIN_ROWS = 2  # below this many rows (one token of one sequence) MKL's matrix-vector product is as fast or faster
_enabled = True


def set_enabled(flag: bool) -> None:
    """Process-wide switch: False makes :func:`linear` always take ``F.linear`` (e.g. ``evaluate --no-onednn``)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    """True when :func:`linear` may use oneDNN: switched on (:func:`set_enabled`) and :func:`available`."""
    return _enabled and available()


@functools.cache
def available() -> bool:
    """True when this PyTorch build has the oneDNN linear op and oneDNN is usable on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False
    try:  # present but unusable (e.g. a CPU without the ISA it was built for): fall back for good
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)))
    except RuntimeError:
        return False


def _eligible(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() >= MIN_ROWS * x.shape[-1] > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and enabled()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in), bias (out,) -> (..., out); through oneDNN
    when it applies (CPU, float32, at least :data:`MIN_ROWS` rows, no gradient needed), else F.linear."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, in)
    out = torch.ops.mkldnn._linear_pointwise(rows, weight.contiguous(), bias, "none", [], "")  # (rows, out)
    return out.reshape(*x.shape[:-1], weight.shape[0])
