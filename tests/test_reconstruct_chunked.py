"""KVzip's chunk-local scores (polykv_learn.reconstruct_chunked, CaptureOptions(reconstruct_scope="chunk")) against
a naive float64 reference written from the definition (per chunk a full forward of [context, repeat input] from
scratch, the restricted softmax from the recorded post-RoPE queries/keys), left-padded rows equal to each row
alone, the fused float32 path equal to the explicit one, and the one-line refusals."""

import math

import pytest
import torch
from model_helpers import (
    TINY_MODELS,
    float64_pairs,
    left_pad,
    left_padded_prefill,
    random_ids,
    spy_grouped_flash,
)
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from polykv_learn import adapter
from polykv_learn.cache import CompressedCache, row_stats
from polykv_learn.capture import CaptureOptions
from polykv_learn.reconstruct_chunked import (
    PREV_TOKENS,
    chunk_prompt_ids,
    chunked_reconstruction_attention,
    repeat_chunks,
)

SIZE, SINKS = 8, 4  # small chunks: a 37-token context spans 5 of them
_RECORD: dict[int, tuple] = {}


def _record64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain attention in the model's dtype (float64 here, softmax included), recording each layer's post-RoPE
    queries/keys, its scaling and window."""
    _RECORD[module.layer_idx] = (query, key, scaling, kwargs.get("sliding_window"))
    r = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(r, 1), value.repeat_interleave(r, 1)
    s = query @ k.transpose(-1, -2) * scaling
    if attention_mask is not None:
        s = s + attention_mask[..., : k.shape[2]]
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).contiguous(), None


AttentionInterface.register("record64", _record64)
AttentionMaskInterface.register("record64", eager_mask)


@pytest.fixture(scope="module")
def f64_models():
    """name -> (model for the pass, the same weights with the recording float64 attention), float64."""
    return float64_pairs("record64")


@torch.no_grad()
def naive_chunk_scores(ref, context, prompts, size=SIZE, sinks=SINKS):
    """Per layer (G, n) from the definition: for each chunk its repeat input, a forward of [context, input] from
    scratch, then per query of the input the softmax over the first min(sinks, chunk start) keys, the chunk's keys
    and the input's keys up to the query (within a sliding layer's window), max over the group and the queries
    on the chunk's keys; the first `sinks` positions then 1."""
    x = context[0].tolist()
    n, g = len(x), ref.config.num_key_value_heads
    out = [torch.zeros(g, n, dtype=torch.float64) for _ in range(ref.config.num_hidden_layers)]
    for i in range(math.ceil(n / size)):
        lo, hi = i * size, min((i + 1) * size, n)
        prev = [] if i == 0 else x[(i - 1) * size : i * size][-PREV_TOKENS:]
        rep = [*(prompts.first if i == 0 else prompts.later), *prev, *prompts.suffix, *x[lo:hi]]
        _RECORD.clear()
        ref(torch.tensor([x + rep]))
        m = len(rep)
        q_pos = torch.arange(n, n + m)[:, None]  # (m, 1)
        k_pos = torch.arange(n + m)[None, :]  # (1, n + m)
        allowed = (k_pos < min(sinks, lo)) | ((k_pos >= lo) & (k_pos < hi)) | ((k_pos >= n) & (k_pos <= q_pos))
        for layer, (q, k, scaling, window) in _RECORD.items():
            seen = allowed & (k_pos > q_pos - window) if window is not None else allowed  # (m, n + m)
            r = q.shape[1] // g
            s = q[0, :, n:] @ k[0].repeat_interleave(r, 0).transpose(-1, -2) * scaling  # (H, m, n + m)
            probs = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1)
            best = probs[:, :, lo:hi].reshape(g, r * m, hi - lo).amax(dim=1)  # (G, hi - lo)
            out[layer][:, lo:hi] = best
    for o in out:
        o[:, :sinks] = 1.0
    return out


def chunk_options(**kw):
    return CaptureOptions(
        reconstruct=True, reconstruct_scope="chunk", reconstruct_context_chunk=SIZE, reconstruct_sinks=SINKS, **kw
    )


def captured(model, ids, mask=None, **options):
    cache = CompressedCache(model, capture=chunk_options(**options))
    kwargs = {}
    if mask is not None:
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}
    with torch.no_grad():
        adapter.forward(model, ids, cache, logits_to_keep=1, **kwargs)
    return cache.layer_stats


@pytest.mark.parametrize("name", TINY_MODELS)
def test_chunk_scores_equal_the_naive_float64_reference(f64_models, name):
    ours, ref = f64_models[name]
    context = random_ids(37, seed=1)
    expected = naive_chunk_scores(ref, context, chunk_prompt_ids(ours))
    small = captured(ours, context, reconstruct_chunk=7)  # each repeat input in several forwards
    whole = captured(ours, context, reconstruct_chunk=512)
    for layer, (a, b, e) in enumerate(zip(small, whole, expected, strict=True)):
        assert a.reconstruct_attn.shape == (1, ours.config.num_key_value_heads, 37)
        assert torch.allclose(a.reconstruct_attn, b.reconstruct_attn, rtol=0, atol=1e-13)
        diff = (a.reconstruct_attn[0] - e).abs().max().item()
        assert diff < 1e-12, f"{name} layer {layer}: {diff}"
    assert max(float(e[:, SINKS:].max()) for e in expected) > 0.2, "the reference must have peaky attention"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_left_padded_row_scores_as_it_would_alone(f64_models, name):
    ours, _ = f64_models[name]
    prompts = [random_ids(41, seed=2), random_ids(23, seed=3), random_ids(30, seed=4)]  # 6, 3 and 4 chunks
    ids, mask = left_pad(prompts)
    batch = captured(ours, ids, mask, reconstruct_chunk=16)
    for r, prompt in enumerate(prompts):
        alone = captured(ours, prompt)
        pad = ids.shape[1] - prompt.shape[1]
        for b, a in zip(batch, alone, strict=True):
            assert torch.allclose(row_stats(b, r).reconstruct_attn, a.reconstruct_attn, rtol=0, atol=1e-12)
            assert not b.reconstruct_attn[r, :, :pad].any()  # padding positions score 0


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_fused_float32_chunk_scores_equal_the_explicit_probabilities(name):
    model, ids, mask, positions, kv = left_padded_prefill(name)
    args = (model, ids, kv, mask.bool(), positions, chunk_prompt_ids(model), SIZE, SINKS, 16)
    fused = chunked_reconstruction_attention(*args)
    explicit = chunked_reconstruction_attention(*args, fused=False)
    for layer, (f, e) in enumerate(zip(fused, explicit, strict=True)):
        assert f.dtype == e.dtype == torch.float32 and f.shape == e.shape == (3, model.config.num_key_value_heads, 41)
        rel = ((f - e).abs().max() / e.abs().max()).item()
        assert rel <= (1e-6 if layer == 0 else 3e-6), f"{name} layer {layer}: {rel}"
        assert not f[1, :, :18].any() and not f[2, :, :11].any()  # padding positions score 0
        assert (f[0, :, :SINKS] == 1).all() and (f[1, :, 18 : 18 + SINKS] == 1).all()  # each row's first real ones


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_unpadded_fused_chunk_scores_equal_the_explicit_probabilities(name, monkeypatch):
    """Without padding the fused chunk pass takes its mask-free calls (the context parts, the repeat input's earlier
    keys and its causal block): the same scores as the explicit softmax. Forwards of 8 tokens split every repeat
    input, so the earlier-keys call (``reconstruct.grouped_flash`` from the parent's own-keys step) runs."""
    earlier = spy_grouped_flash(monkeypatch)
    model, ids, mask, positions, kv = left_padded_prefill(name, lengths=(41, 41))
    assert mask.all()
    args = (model, ids, kv, mask.bool(), positions, chunk_prompt_ids(model), SIZE, SINKS, 8)
    fused = chunked_reconstruction_attention(*args)
    explicit = chunked_reconstruction_attention(*args, fused=False)
    for layer, (f, e) in enumerate(zip(fused, explicit, strict=True)):
        assert f.shape == e.shape == (2, model.config.num_key_value_heads, 41)
        rel = ((f - e).abs().max() / e.abs().max()).item()
        assert rel <= (1e-6 if layer == 0 else 3e-6), f"{name} layer {layer}: {rel}"
    assert earlier and min(earlier) == 8  # the repeat inputs' earlier keys, one forward of 8 tokens at least


def test_each_chunk_repeats_kvpress_prompt_and_the_previous_chunks_last_tokens():
    from polykv_learn.reconstruct_chunked import ChunkPrompts

    prompts = ChunkPrompts(first=(900,), later=(901, 902), suffix=(903,))
    ids, mask = left_pad([torch.arange(100, 120)[None], torch.arange(200, 210)[None]])  # 20 and 10 tokens
    chunks = repeat_chunks(ids, mask.bool(), prompts, size=9, sinks=2)
    assert len(chunks) == 3  # the longer row's 3 chunks; the shorter has 2
    row0 = [ch.ids[0][ch.valid[0]].tolist() for ch in chunks]
    assert row0 == [
        [900, 903, *range(100, 109)],
        [901, 902, *range(101, 109), 903, *range(109, 118)],
        [901, 902, *range(110, 118), 903, 118, 119],
    ]
    assert chunks[1].ids[1][chunks[1].valid[1]].tolist() == [901, 902, *range(201, 209), 903, 209]
    assert not chunks[2].valid[1].any()
    # row 1 is left-padded by 10: its chunk 1 scores its own tokens 9.. (padded 19) beside its 2 sinks
    sel = chunks[1].select[1][chunks[1].select_valid[1]].tolist()
    assert sel == [10, 11, 19]
    assert chunks[0].select[0][chunks[0].select_valid[0]].tolist() == list(range(9))  # chunk 0: no sinks
    assert chunks[0].sinks == 0 and chunks[1].sinks == 2 and chunks[1].select.shape == (2, 2 + 9)
    assert chunks[1].rest[1][chunks[1].rest_valid[1]].tolist() == list(range(12, 19))  # its other real keys
    assert chunks[1].rest[0][chunks[1].rest_valid[0]].tolist() == [2, 3, 4, 5, 6, 7, 8, 18, 19]


def test_capture_options_validate_the_scope_in_one_line():
    assert CaptureOptions().reconstruct_scope == "full"  # the default keeps stored prefills' meaning
    with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_scope must be one of 'full', 'chunk', got 'x'$"):
        CaptureOptions(reconstruct_scope="x")
    with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_context_chunk must be >= 1, got 0$"):
        CaptureOptions(reconstruct_context_chunk=0)
    with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_sinks must be >= 0, got -1$"):
        CaptureOptions(reconstruct_sinks=-1)
    with pytest.raises(ValueError, match=r"^CaptureOptions.reconstruct_prompt is for reconstruct_scope 'full' only"):
        CaptureOptions(reconstruct_scope="chunk", reconstruct_prompt=(1, 2))
