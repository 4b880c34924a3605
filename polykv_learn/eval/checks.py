"""Input checks of ``polykv-learn evaluate`` that need no model: each raises a one-line ``ValueError``,
``FileNotFoundError`` or ``PermissionError`` that names the option at fault, before any heavy work.

- :func:`check_out_dir`: ``--out`` is a folder that exists or can be created (its nearest existing parent is a
  writable folder, not a file);
- :func:`model_config` / :func:`check_router_fits`: the model's configuration, read without its weights, and
  whether a router artifact was trained for its attention geometry;
- :func:`fit_contexts`: every sample fits the model's positions (``max_position_embeddings``), else the run is
  refused with the ``--max-context`` that would cut it to fit;
- :func:`read_results` / :func:`artifact_digest`: a ``--merge`` input is a complete ``results.json``; a digest of an
  artifact's files (recorded by a run, compared on ``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from polykv_learn.deploy.artifact import CONFIG_FILE, WEIGHTS_FILE
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.eval.evaluator import EvalSettings, prompt_pieces

__all__ = [
    "MERGE_KEYS",
    "artifact_digest",
    "check_out_dir",
    "check_router_fits",
    "fit_contexts",
    "model_config",
    "read_results",
]

#: what :func:`~polykv_learn.eval.results.merge_results` and ``replace_methods`` read of each run
MERGE_KEYS = ("config", "samples", "single_policies", "tasks", "timing")
_MERGE_CONFIG_KEYS = ("protocol", "budgets", "methods", "chat", "max_context", "model", "capture")


def check_out_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created; nothing is created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; give a folder path")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{option} {path}: {probe} is a file, so no folder can be made in it; give another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the folder" if probe == out.absolute() else f"its nearest existing parent {probe}"
        raise PermissionError(f"{option} {path}: {what} is not writable; give another {option}")
    return out


def model_config(name_or_path: str) -> PretrainedConfig:
    """The configuration of a model :func:`polykv_learn.models.load_model` can load, without its weights."""
    from polykv_learn.models import KNOWN_MODELS, TINY_CONFIGS

    if name_or_path in TINY_CONFIGS:
        return TINY_CONFIGS[name_or_path]()
    path = KNOWN_MODELS[name_or_path]() if name_or_path in KNOWN_MODELS else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {name_or_path!r} is neither a known model ({', '.join([*KNOWN_MODELS, *TINY_CONFIGS])}) nor a "
            "local Hugging Face model folder with a config.json"
        )
    return AutoConfig.from_pretrained(path)


def check_router_fits(artifact: PolyKV, config: PretrainedConfig, option: str) -> None:
    """Raise if ``artifact`` was trained for another attention geometry than ``config``'s (what
    :meth:`PolyKV.check_model` checks on a loaded model)."""
    heads = config.num_attention_heads
    dims = {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }
    trained = artifact.model_fingerprint
    differ = [f"{k} {trained[k]} (model: {v})" for k, v in dims.items() if trained.get(k) != v]
    if differ:
        raise ValueError(
            f"{option}: this router was trained for {trained.get('name')} with {', '.join(differ)}; give the model it "
            "was trained for (--model)"
        )


def fit_contexts(
    tokenizer: PreTrainedTokenizerBase,
    settings: EvalSettings,
    samples: Sequence[dict[str, Any]],
    max_positions: int,
) -> int:
    """Check that every sample fits ``max_positions`` (prompt, what follows it and the answer room, see
    :attr:`~polykv_learn.eval.evaluator.PromptPieces.positions`); returns how many contexts ``settings.max_context``
    cuts. Raises a ``ValueError`` with the count, the longest sample, the limit and the ``--max-context`` that fits."""
    pieces = [prompt_pieces(tokenizer, settings, s) for s in samples]
    over = [(p.positions, s["id"]) for p, s in zip(pieces, samples, strict=True) if p.positions > max_positions]
    if over:
        longest, sid = max(over)
        # the context room left by the longest non-context part of any sample
        fits = max_positions - max(p.positions - p.context_tokens for p in pieces)
        where = f"with --max-context {settings.max_context}, " if settings.max_context is not None else ""
        fix = (
            f"give --max-context {fits} (or less) to cut contexts in the middle"
            if fits >= 2
            else "their questions and answers alone exceed it; drop them from --data"
        )
        raise ValueError(
            f"{where}{len(over)} of {len(samples)} samples need more positions than the model has "
            f"(max_position_embeddings {max_positions}); the longest, {sid!r}, needs {longest} (prompt, question and "
            f"answer room); {fix}"
        )
    return sum(p.cut_tokens > 0 for p in pieces)


def read_results(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``results.json`` of a finished ``evaluate --out`` folder, checked to hold what merging reads."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"--merge: {path} does not exist (give --out folders of finished evaluate runs)")
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError as err:
        raise PermissionError(f"--merge: {path} cannot be read ({err.strerror})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--merge: {path} cannot be read ({err})") from None
    rerun = f"re-run the evaluation into {folder} with --resume (it rebuilds results.json from its samples.jsonl)"
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not a complete results.json (invalid JSON at line {err.lineno} column {err.colno}: {err.msg}); "
            f"{rerun}"
        ) from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} is not a results.json of polykv-learn evaluate (a JSON {type(results).__name__})")
    missing = [k for k in MERGE_KEYS if k not in results]
    if not missing:
        config, timing = (v if isinstance(v, dict) else {} for v in (results["config"], results["timing"]))
        missing = [f"config.{k}" for k in _MERGE_CONFIG_KEYS if k not in config]
        missing += [f"timing.{k}" for k in ("samples", "seconds") if k not in timing]
    if missing:
        raise ValueError(
            f"{path} is not a results.json of polykv-learn evaluate (it lacks {', '.join(missing)}); {rerun}"
        )
    return results


def artifact_digest(folder: str | os.PathLike[str] | None) -> str | None:
    """SHA-256 over an artifact's config and weights files (None for no artifact)."""
    if folder is None:
        return None
    sha = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        sha.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes() + b"\0")
    return sha.hexdigest()
