"""One frozen copy of each base LLM per process, shared by the data module (prefills) and the learner (probes), and
the models' configurations read without their weights (for the constructors' checks)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from polykv_learn.adapter import SUPPORTED_MODEL_TYPES
from polykv_learn.models import KNOWN_MODELS, TINY_CONFIGS, WEIGHTS_INSTALLED, load_model, load_tokenizer, polykv_home


@lru_cache(maxsize=2)
def shared_model(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model, _ = load_model(name, dtype=dtype, with_tokenizer=False)
    return model


@lru_cache(maxsize=2)
def shared_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)


@lru_cache(maxsize=8)
def model_config(name: str) -> PretrainedConfig | None:
    """The configuration of a model ``load_model`` accepts, without loading its weights; None for SmolLM2 before
    its one-time conversion (only the conversion reads its configuration). Raises what ``load_model`` would for a
    name that is no model (``FileNotFoundError``) or an unsupported architecture (``ValueError``)."""
    if not isinstance(name, str) or not name:
        known = ", ".join([*KNOWN_MODELS, *TINY_CONFIGS])
        raise ValueError(f"model_name must be one of {known} or a local model folder, got {name!r}")
    if name in TINY_CONFIGS:
        return TINY_CONFIGS[name]()
    if name in KNOWN_MODELS:
        path = polykv_home() / "models" / name
        if not (path / "config.json").exists():
            WEIGHTS_INSTALLED[name]()  # raises when the weights are not installed at all
            return None
    else:
        path = Path(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model_name {name!r} is neither a known model ({', '.join([*KNOWN_MODELS, *TINY_CONFIGS])}) "
            "nor a local Hugging Face model directory with a config.json"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_name {name!r} has the unsupported architecture {config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def max_positions(name: str) -> int | None:
    """``max_position_embeddings`` of the model (None: not known before SmolLM2's conversion)."""
    config = model_config(name)
    return None if config is None else int(config.max_position_embeddings)
