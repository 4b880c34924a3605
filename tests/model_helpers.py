"""Plain helpers of the model tests (test modules import them from here, never from a conftest: pytest loads
several conftest modules, and ``from conftest import`` gets whichever it loaded last)."""

import torch

TINY_MODELS = ("tiny-llama", "tiny-qwen3", "tiny-mistral", "tiny-gemma3")


def model_for(name: str, attn: str, tiny_models: dict, eager_models: dict):
    """The tiny model ``name`` with ``attn`` (``sdpa`` or ``eager``) attention."""
    return tiny_models[name] if attn == "sdpa" else eager_models[name]


def left_pad(prompts: list[torch.Tensor], pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (1, n_i) -> left-padded ids (batch, max n) and their attention mask (pad 2 = SmolLM2's and the
    tiny models' eos)."""
    n = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - p.shape[1] :] = p[0]
        mask[i, n - p.shape[1] :] = 1
    return ids, mask


def random_ids(n: int, seed: int, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def float64_pairs(reference_attention: str) -> dict:
    """name -> (a float64 tiny model, a second copy of the same weights whose attention implementation is
    ``reference_attention``), for every tiny model: the model under test and its reference."""
    from polykv_learn.models import build_tiny_model

    out = {}
    for name in TINY_MODELS:
        ours, ref = (build_tiny_model(name, dtype=torch.float64).eval() for _ in range(2))
        ref.set_attn_implementation(reference_attention)
        out[name] = (ours, ref)
    return out


def left_padded_prefill(name: str, lengths: tuple[int, ...] = (41, 23, 30)):
    """A float32 tiny model and the prefill of a left-padded batch of rows of ``lengths`` real tokens (equal
    lengths: no padding): ``(model, ids, mask, positions, kv)``, ``kv`` each layer's ``(keys, values)`` (the
    reconstruction tests' input)."""
    from polykv_learn import adapter
    from polykv_learn.cache import CompressedCache
    from polykv_learn.capture import CaptureOptions
    from polykv_learn.models import build_tiny_model

    model = build_tiny_model(name, dtype=torch.float32).eval()
    ids, mask = left_pad([random_ids(n, seed=2 + i) for i, n in enumerate(lengths)])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = CompressedCache(model, capture=CaptureOptions())
    with torch.no_grad():
        adapter.forward(model, ids, cache, attention_mask=mask, position_ids=positions)
    return model, ids, mask, positions, [(layer.keys, layer.values) for layer in cache.layers]


def spy_grouped_flash(monkeypatch) -> list[int]:
    """Record the key length of every ``reconstruct.grouped_flash`` call (the mask-free flash calls of the KVzip
    pass), asserting that each takes no mask: the list it returns fills as the pass runs."""
    from polykv_learn import reconstruct

    seen: list[int] = []
    grouped_flash = reconstruct.grouped_flash

    def spy(q, keys, values, scaling, bias=None):
        assert bias is None, "an unpadded batch needs no mask"
        seen.append(keys.shape[2])
        return grouped_flash(q, keys, values, scaling, bias)

    monkeypatch.setattr(reconstruct, "grouped_flash", spy)
    return seen
