"""oneDNN matrix products: the same linear map as F.linear (to float32 rounding), the fallbacks, and the model
switch (every linear layer, tied weights kept, reversible)."""

import pytest
import torch
import torch.nn.functional as F

from polykv_learn import adapter, onednn
from polykv_learn.models import build_tiny_model, load_model

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no usable oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (3, 1, 24)])
def test_linear_equals_f_linear(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    out = onednn.linear(x, w, b)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn.linear(x.transpose(0, -2), w), F.linear(x.transpose(0, -2), w))  # strided


def test_linear_falls_back_where_onednn_does_not_apply():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 6, generator=gen)
    one_row = torch.randn(1, 1, 6, generator=gen)  # a matrix-vector product: F.linear, bit for bit
    assert torch.equal(onednn.linear(one_row, w), F.linear(one_row, w))
    for dtype in (torch.float64, torch.bfloat16):  # only float32 is routed (and measured)
        x = torch.randn(4, 6, generator=gen).to(dtype)
        assert torch.equal(onednn.linear(x, w.to(dtype)), F.linear(x, w.to(dtype)))
    x = torch.randn(4, 6, generator=gen, requires_grad=True)  # gradients need F.linear's autograd formula
    out = onednn.linear(x, w)
    assert torch.equal(out, F.linear(x, w))
    out.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(dim=0).expand(4, -1))


@needs_onednn
def test_use_onednn_linear_switches_every_linear_and_back():
    model = build_tiny_model("tiny-llama")
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        assert adapter.use_onednn_linear(model) == linears > 0
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied
        fast = model(ids).logits
        assert adapter.use_onednn_linear(model) == 0  # already switched
        torch.testing.assert_close(fast, before, rtol=1e-4, atol=1e-4)
        assert adapter.use_onednn_linear(model, enabled=False) == linears
        assert torch.equal(model(ids).logits, before)  # back to F.linear: the very same numbers


@needs_onednn
def test_load_model_uses_onednn_on_cpu_unless_asked_not_to():
    model, _ = load_model("tiny-qwen3", with_tokenizer=False)
    assert isinstance(model.lm_head, adapter.OneDNNLinear)
    plain, _ = load_model("tiny-qwen3", with_tokenizer=False, onednn_linear=False)
    assert type(plain.lm_head) is torch.nn.Linear


@needs_onednn
def test_switched_off_means_f_linear_everywhere():
    model = build_tiny_model("tiny-llama")
    x, w = torch.randn(6, 24), torch.randn(40, 24)
    try:
        onednn.set_enabled(False)
        assert not onednn.enabled()
        assert torch.equal(onednn.linear(x, w), F.linear(x, w))
        assert adapter.use_onednn_linear(model) == 0  # nothing switched while off
    finally:
        onednn.set_enabled(True)
    assert onednn.enabled() and adapter.use_onednn_linear(model) > 0
