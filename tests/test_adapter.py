"""``adapter``: the one module that knows transformers' internals (geometry, RoPE, cache kwarg, attention hook)."""

import pytest
import torch
from model_helpers import TINY_MODELS, random_ids
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from polykv_learn import adapter


@pytest.mark.parametrize("name", TINY_MODELS)
def test_model_dims_read_the_config(tiny_models, name):
    model = tiny_models[name]
    cfg = model.config
    dims = adapter.model_dims(model)
    assert (dims.num_layers, dims.num_heads, dims.num_kv_heads) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    assert dims.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert dims.max_positions == cfg.max_position_embeddings
    assert dims.to_dict()["num_layers"] == dims.num_layers


def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2' \(GPT2LMHeadModel\); supported: llama, "):
        adapter.model_dims(model)
    with pytest.raises(ValueError, match="unsupported architecture"):
        adapter.install_polykv_attention(model)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_rope_cos_sin_is_the_models_own_rotation(tiny_models, name):
    model = tiny_models[name]
    positions = torch.tensor([[0, 1, 5, 17, 300]])
    cos, sin = adapter.rope_cos_sin(model, positions, torch.float32)
    layer_type = () if name != "tiny-gemma3" else ("sliding_attention",)  # Gemma3's rotary takes the layer's type
    ref_cos, ref_sin = model.model.rotary_emb(torch.empty(1), positions, *layer_type)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    d = adapter.model_dims(model).head_dim
    q = torch.randn(1, 2, 5, d)
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps norms


def test_gemma3_layers_rotate_with_their_own_base(tiny_models):
    """Un-rotating a layer's captured window queries with its ``rope_cos_sin`` gives back what its q-norm produced
    (Gemma3 normalises q and k before RoPE, with base 1e4 on sliding layers and 1e6 on the full one)."""
    from transformers.models.llama.modeling_llama import rotate_half

    from polykv_learn.simulator import Simulator

    model = tiny_models["tiny-gemma3"]
    assert adapter.sliding_windows(model) == [16, 16, 16, None]
    normed = {}
    hooks = [
        layer.self_attn.q_norm.register_forward_hook(lambda mod, args, out, i=i: normed.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        capture = Simulator(model).capture(random_ids(40, seed=5, vocab=model.config.vocab_size))
    finally:
        for hook in hooks:
            hook.remove()
    for i, stats in enumerate(capture.stats):
        q = stats.window_queries  # (1, H, w, d) post-RoPE
        cos, sin = stats.window_cos[:, None], stats.window_sin[:, None]  # (1, 1, w, d)
        unrotated = q * cos - rotate_half(q) * sin  # the inverse rotation
        assert torch.allclose(unrotated, normed[i][:, :, -q.shape[2] :], atol=1e-5), f"layer {i}"
        assert stats.sliding_window == adapter.sliding_windows(model)[i]
    local, _ = adapter.rope_cos_sin(model, torch.tensor([[7]]), torch.float32, layer_idx=0)
    global_, _ = adapter.rope_cos_sin(model, torch.tensor([[7]]), torch.float32, layer_idx=3)
    assert not torch.allclose(local, global_), "the sliding and the full layers must use different bases"


def test_forward_uses_this_versions_cache_kwarg(tiny_models):
    model = tiny_models["tiny-llama"]
    assert adapter.cache_kwarg(model) in ("cache", "past_key_values")
    cache = DynamicCache(config=model.config)
    ids = random_ids(9, seed=1, vocab=model.config.vocab_size)
    out = adapter.forward(model, ids, cache)
    assert cache.get_seq_length() == 9
    assert torch.allclose(out.logits, model(ids).logits, atol=1e-5)


def test_polykv_attention_is_the_base_attention_without_a_polykv_cache(tiny_models):
    """The wrapper changes nothing for caches that announce no handler, and it is undone on exit."""
    model = tiny_models["tiny-qwen3"]
    ids = random_ids(12, seed=2, vocab=model.config.vocab_size)
    before = model.config._attn_implementation
    ref = model(ids).logits
    with adapter.polykv_attention(model):
        assert model.config._attn_implementation == f"polykv_{adapter.base_attention(model)}"
        assert torch.allclose(model(ids).logits, ref, atol=1e-6)
    assert model.config._attn_implementation == before


def test_base_attention_refuses_other_implementations(tiny_models):
    model = tiny_models["tiny-llama"]
    previous = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="'flash_attention_2' is not supported; use one of sdpa, eager"):
            adapter.base_attention(model)
    finally:
        model.config._attn_implementation = previous


def test_onednn_switch_is_reversible_and_keeps_tied_weights(tiny_models):
    model = tiny_models["tiny-mistral"]
    ids = random_ids(10, seed=3, vocab=model.config.vocab_size)
    adapter.use_onednn_linear(model, enabled=False)
    ref = model(ids).logits
    switched = adapter.use_onednn_linear(model, enabled=True)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if switched:  # oneDNN present in this PyTorch
        assert switched == len(linears) and all(type(m) is adapter.OneDNNLinear for m in linears)
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)
    assert adapter.use_onednn_linear(model, enabled=False) == switched
    assert all(type(m) is torch.nn.Linear for m in linears)
    assert torch.equal(model(ids).logits, ref)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
