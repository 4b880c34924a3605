"""One frozen copy of each base LLM per process, shared by the data module (prefills) and the learner (probes)."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from polykv_learn.models import load_model, load_tokenizer


@lru_cache(maxsize=2)
def shared_model(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model, _ = load_model(name, dtype=dtype, with_tokenizer=False)
    return model


@lru_cache(maxsize=2)
def shared_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)
