"""The one module that knows transformers' internals.

Everything architecture- or version-specific lives here: which model types are supported, where the config keeps
head counts and RoPE, how attention is hooked (through transformers' own ``AttentionInterface``; no model code is
copied), how the cache argument of ``forward`` is named, and how RoPE cos/sin are computed for given positions.

Hooking. We register two attention implementations, ``polykv_sdpa`` and ``polykv_eager``, that wrap the stock
``sdpa`` / ``eager`` functions (and their mask builders). A polykv cache layer announces itself from its
``update`` (which every supported attention module calls right before its attention function) through
:func:`announce`; the wrapper then hands the call to that layer. Without an announcement the wrapper is exactly
the stock implementation, so a model switched to ``polykv_*`` behaves as before with ordinary caches.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from polykv_learn import onednn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
BASE_ATTENTION = {"sdpa": sdpa_attention_forward, "eager": eager_attention_forward}


@dataclass(frozen=True)
class ModelDims:
    """What a trained router is tied to: the model's name and attention geometry."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_supported(model: PreTrainedModel) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def model_dims(model: PreTrainedModel) -> ModelDims:
    check_supported(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelDims(
        name=str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "polykv_name", "") or cfg.model_type),
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        max_positions=cfg.max_position_embeddings,
    )


def layer_types(model: PreTrainedModel) -> list[str]:
    """Each layer's attention type from the config (``full_attention`` or ``sliding_attention``); models
    without ``layer_types`` (Llama) attend fully everywhere."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * cfg.num_hidden_layers


def sliding_windows(model: PreTrainedModel) -> list[int | None]:
    """Per layer the attention window ``W`` of a sliding-window layer (a query sees itself and the ``W - 1``
    keys before it, transformers' ``sliding_window_overlay``), None for a full-attention layer."""
    window = getattr(model.config, "sliding_window", None)
    return [window if t == "sliding_attention" and window is not None else None for t in layer_types(model)]


def rope_cos_sin(
    model: PreTrainedModel, position_ids: Tensor, dtype: torch.dtype, layer_idx: int = 0
) -> tuple[Tensor, Tensor]:
    """RoPE cos/sin ``(batch, len, head_dim)`` of layer ``layer_idx`` for ``position_ids`` ``(batch, len)`` (Gemma3
    rotates its sliding and its full layers with different bases)."""
    rotary = model.model.rotary_emb
    probe = torch.empty(1, dtype=dtype, device=position_ids.device)
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        cos, sin = rotary(probe, position_ids, layer_types(model)[layer_idx])
    else:
        cos, sin = rotary(probe, position_ids)
    return cos.to(dtype), sin.to(dtype)


# --- the cache argument of forward ------------------------------------------------------------------------------
def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    params = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model: PreTrainedModel, input_ids: Tensor, cache: Any, **kwargs: Any) -> Any:
    """``model(input_ids, <cache kwarg>=cache, use_cache=True, **kwargs)`` for this transformers version."""
    return model(input_ids=input_ids, use_cache=True, **{cache_kwarg(model): cache}, **kwargs)


def forward_decoder(model: PreTrainedModel, input_ids: Tensor, cache: Any, **kwargs: Any) -> Any:
    """The decoder stack alone (``model.model``: no LM head, no logits) with ``cache``, for passes whose attention
    is all that matters (KVzip's reconstruction pass)."""
    return model.model(input_ids=input_ids, use_cache=True, **{cache_kwarg(model): cache}, **kwargs)


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The decoder layers of ``model``'s stack, in order (``model.model.layers``, the ones the forward runs)."""
    layers = getattr(model.model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer list at model.model.layers")
    return list(layers)[: model.config.num_hidden_layers]


# --- the token ids of the running forward ----------------------------------------------------------------------
# A cache layer sees keys and values, never token ids; KVzip's reconstruction pass needs the prefill's ids. A
# forward pre-hook on the decoder stack (``model.model``) records, per thread, the ids each of its forwards gets
# (None for ``inputs_embeds``): during a forward, the record is that forward's own.
_forward_ids = threading.local()


def _remember_ids(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    _forward_ids.value = (weakref.ref(module), ids if isinstance(ids, Tensor) else None)


def track_input_ids(model: PreTrainedModel) -> None:
    """Make :func:`current_input_ids` work for ``model`` (idempotent: one pre-hook on ``model.model`` that keeps a
    reference to the ids of its last forward, per thread)."""
    decoder = model.model
    if not getattr(decoder, "_polykv_tracks_ids", False):
        decoder.register_forward_pre_hook(_remember_ids, with_kwargs=True)
        decoder._polykv_tracks_ids = True


def current_input_ids(model: PreTrainedModel) -> Tensor | None:
    """The token ids ``(batch, len)`` of ``model``'s last (during a forward: the running) decoder forward in this
    thread; None if it got ``inputs_embeds``, if it ran before :func:`track_input_ids`, or if the last forward
    here was another model's."""
    value = getattr(_forward_ids, "value", None)
    if value is None or value[0]() is not model.model:
        return None
    return value[1]


# --- linear layers --------------------------------------------------------------------------------------------
class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose product runs through :func:`polykv_learn.onednn.linear` (same weights, same
    parameters and state dict; float32 rounding may differ from MKL's)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Linear's parameter name)
        return onednn.linear(input, self.weight, self.bias)


def use_onednn_linear(model: PreTrainedModel, enabled: bool = True) -> int:
    """Run every ``nn.Linear`` of ``model`` (projections, MLP, LM head) through oneDNN (``enabled``) or back
    through ``F.linear``; returns how many layers were switched. Nothing is copied: each module changes class
    in place, so tied weights (the LM head) stay tied. Without oneDNN in this PyTorch the model is unchanged."""
    if enabled and not onednn.enabled():
        return 0
    old, new = (torch.nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, torch.nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            switched += 1
    return switched


# --- attention hook ---------------------------------------------------------------------------------------------
@dataclass
class AttentionCall:
    """One call of an attention function, as our cache layers see it. Shapes: query (b, H, q, d) post-RoPE,
    key/value (b, G, kv, d) as returned by the cache update, mask in the base implementation's format."""

    module: torch.nn.Module
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    scaling: float
    base: str
    kwargs: dict[str, Any]

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def position_ids(self) -> Tensor | None:
        return self.kwargs.get("position_ids")

    @property
    def sliding_window(self) -> int | None:
        """The layer's window ``W`` if it is a sliding-window layer (Gemma3 passes it to the attention), else None."""
        return self.kwargs.get("sliding_window")

    def visible(self, kv_length: int) -> Tensor:
        """Boolean visibility ``(b, q, kv_length)`` of the (logical) keys from the mask transformers built."""
        b, _, q, _ = self.query.shape
        mask = self.mask
        if mask is None:  # transformers skipped the mask: plain causal over the logical keys
            q_pos = torch.arange(kv_length - q, kv_length, device=self.query.device)
            vis = torch.arange(kv_length, device=self.query.device)[None, :] <= q_pos[:, None]
            return vis.expand(b, q, kv_length)
        if mask.dtype != torch.bool:  # eager: additive float mask
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask[:, 0, :, :kv_length].expand(b, q, kv_length)

    def run_base(self, query: Tensor, key: Tensor, value: Tensor, visible: Tensor | None) -> Tensor:
        """The stock attention (sdpa or eager) with a boolean ``visible`` mask broadcastable to (b, H, q, kv);
        None keeps the mask transformers built. Returns (b, q, H, d)."""
        mask = self.mask
        if visible is not None:
            mask = visible
            if self.base == "eager":
                mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~visible, torch.finfo(query.dtype).min
                )
        out, _ = BASE_ATTENTION[self.base](
            self.module, query, key, value, mask, dropout=0.0, scaling=self.scaling, **self.kwargs
        )
        return out


class AttentionHandler(Protocol):
    def attend(self, call: AttentionCall) -> Tensor:  # (b, q, H, d)
        ...


_pending = threading.local()


def announce(layer_idx: int, handler: AttentionHandler) -> None:
    """Called from a polykv cache layer's ``update``: the next attention call of ``layer_idx`` goes to ``handler``."""
    _pending.value = (layer_idx, handler)


def _take_announcement(layer_idx: int) -> AttentionHandler | None:
    pending = getattr(_pending, "value", None)
    _pending.value = None
    if pending is None:
        return None
    announced_idx, handler = pending
    if announced_idx != layer_idx:
        raise RuntimeError(f"polykv cache layer {announced_idx} announced itself but layer {layer_idx} attended")
    return handler


def _make_attention(base: str) -> Callable[..., tuple[Tensor, None]]:
    def polykv_attention(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        scaling = module.scaling if scaling is None else scaling
        if kwargs.get("softcap") is not None:  # Gemma2-style logit capping: neither base function applies it
            raise ValueError("attention logit softcapping is not supported (sdpa and eager here attend uncapped)")
        handler = _take_announcement(module.layer_idx)
        call = AttentionCall(module, query, key, value, attention_mask, scaling, base, kwargs)
        if handler is None:
            return call.run_base(query, key, value, None), None
        return handler.attend(call), None

    polykv_attention.__name__ = f"polykv_{base}_attention"
    return polykv_attention


def _register() -> None:
    for base, mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        name = f"polykv_{base}"
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, mask_fn)
    assert "polykv_sdpa" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


_register()


def base_attention(model: PreTrainedModel) -> str:
    impl = model.config._attn_implementation or "sdpa"
    if impl.startswith("polykv_"):
        impl = impl.removeprefix("polykv_")
    if impl not in BASE_ATTENTION:
        raise ValueError(f"attention implementation {impl!r} is not supported; use one of {', '.join(BASE_ATTENTION)}")
    return impl


def install_polykv_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to the polykv wrapper of its current attention (idempotent; harmless for other caches)."""
    check_supported(model)
    name = f"polykv_{base_attention(model)}"
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


@contextlib.contextmanager
def polykv_attention(model: PreTrainedModel) -> Iterator[None]:
    """Temporarily switch ``model`` to the polykv wrapper of its attention."""
    previous = model.config._attn_implementation
    install_polykv_attention(model)
    try:
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
