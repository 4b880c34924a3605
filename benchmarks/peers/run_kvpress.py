"""Run NVIDIA kvpress presses on the same JSONL, model weights and average budgets as `polykv-learn evaluate`.

kvpress pins ``transformers<5.3`` while polykv-learn needs 5.24, so this script keeps kvpress in its own virtual
environment (``benchmarks/peers/.venv-kvpress``, made on first use with ``torch==2.13.0`` pinned) and re-runs
itself there. Inside it, only the pure-Python parts of polykv-learn are imported (the JSONL loader and the
metrics), through a package stub that skips ``polykv_learn/__init__.py``.

    python benchmarks/peers/run_kvpress.py --out out/eval --limit 1 --tasks passkey kv_lookup

writes ``peers.json`` (same ``summary`` layout as ``results.json``: press -> budget -> task -> mean score, plus
``"average"``; ``full_cache``; ``samples``) and ``peers.md`` into ``--out``, next to our results. See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV = HERE / ".venv-kvpress"
STAMP = VENV / ".polykv-installed"
REQUIREMENTS = ("torch==2.13.0", "kvpress==0.5.5")
PRESSES = (
    "snapkv",
    "streaming",
    "tova",
    "knorm",
    "expected_attention",
    "pyramidkv",
    "adakv_snapkv",
    "keydiff",
    "kvzip",
    "kvzip_global",
)
DEFAULT_BUDGETS = (128, 256, 512, 1024)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="kvpress presses on a polykv-learn JSONL at the same average budgets (own venv)",
        epilog=f"presses: {', '.join(PRESSES)} (full cache always runs)",
    )
    p.add_argument("--data", default=str(REPO / "data/polykv/tasks/test.jsonl"), help="JSONL samples")
    p.add_argument("--out", required=True, help="folder for peers.json and peers.md (e.g. the evaluate --out)")
    p.add_argument(
        "--model-dir",
        default=None,
        help="Hugging Face model folder (default: the converted SmolLM2 of polykv_learn.models.smollm2_dir())",
    )
    p.add_argument("--budgets", nargs="+", type=int, default=list(DEFAULT_BUDGETS))
    p.add_argument("--presses", nargs="+", default=list(PRESSES), help="subset of the presses")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per task")
    p.add_argument("--max-context", type=int, default=None, help="cut longer contexts in the middle (tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="plain prompt (as `polykv-learn evaluate --no-chat`): kvpress then prepends the BOS token to the "
        "context, the only token that differs from ours",
    )
    p.add_argument("--venv", default=str(VENV), help="where kvpress's virtual environment lives")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [x for x in args.presses if x not in PRESSES]
    if unknown:
        p.error(f"unknown press(es) {unknown}; allowed: {', '.join(PRESSES)}")
    if any(b < 1 for b in args.budgets):
        p.error("budgets must be positive")
    return args


# --- outside: make the venv, find the model, re-run inside ------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    stamp = venv / STAMP.name
    if stamp.exists() and stamp.read_text().split() == list(REQUIREMENTS):
        return python
    print(f"creating {venv} with {' '.join(REQUIREMENTS)} (a few minutes, once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    check = "import kvpress, transformers, torch; print(transformers.__version__, torch.__version__)"
    subprocess.run([str(python), "-c", check], check=True)
    stamp.write_text(" ".join(REQUIREMENTS) + "\n")
    return python


def outside(args: argparse.Namespace, argv: list[str]) -> None:
    python = ensure_venv(Path(args.venv))
    extra = []
    if args.model_dir is None:
        try:
            from polykv_learn.models import smollm2_dir
        except ImportError as err:
            raise SystemExit(f"--model-dir is needed when polykv_learn is not importable here ({err})") from None
        extra = ["--model-dir", str(smollm2_dir())]
    cmd = [str(python), str(Path(__file__).resolve()), *argv, *extra, "--inside"]
    os.execv(str(python), cmd)


# --- inside kvpress's venv --------------------------------------------------------------------------------------
def import_polykv_pure():
    """polykv_learn.eval.{jsonl,metrics} without polykv_learn/__init__.py (which needs transformers 5.24)."""
    pkg = types.ModuleType("polykv_learn")
    pkg.__path__ = [str(REPO / "polykv_learn")]
    sys.modules.setdefault("polykv_learn", pkg)
    from polykv_learn.data import jsonl
    from polykv_learn.eval import metrics

    return jsonl, metrics


def make_press(name: str):
    from kvpress import (
        AdaKVPress,
        ExpectedAttentionPress,
        KeyDiffPress,
        KnormPress,
        KVzipPress,
        PyramidKVPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )

    return {
        "snapkv": SnapKVPress,
        "streaming": StreamingLLMPress,
        "tova": TOVAPress,
        "knorm": KnormPress,
        "expected_attention": ExpectedAttentionPress,
        "pyramidkv": PyramidKVPress,
        "adakv_snapkv": lambda: AdaKVPress(SnapKVPress()),
        "keydiff": KeyDiffPress,
        # KVzip (arXiv:2505.23416): layerwise=True keeps each layer's share (pruned across its KV heads),
        # layerwise=False (kvpress's default) one top-k over every layer and head
        "kvzip": lambda: KVzipPress(layerwise=True),
        "kvzip_global": KVzipPress,
    }[name]()


def align_masks_per_layer() -> None:
    """Let layers of different cache lengths (PyramidKV) share transformers' one attention mask.

    transformers builds one mask from layer 0's cache length; with kvpress 0.5.5 on transformers 5.2 a layer
    whose cache is shorter or longer then fails in sdpa ("size of tensor a ... must match"). For one sequence
    without padding every cached context key is visible, so each layer's mask is the shared one aligned on the
    right (cut on the left, or extended with visible columns): exact here, where batches are single prompts."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_right_aligned(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            extra = key.shape[-2] - attention_mask.shape[-1]
            if extra < 0:
                attention_mask = attention_mask[..., -key.shape[-2] :]
            else:
                visible = True if attention_mask.dtype == torch.bool else 0.0
                pad = attention_mask.new_full((*attention_mask.shape[:-1], extra), visible)
                attention_mask = torch.cat([pad, attention_mask], dim=-1)
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_right_aligned


def ratio_for(budget: int, n: int) -> float:
    """kvpress keeps ``int(n * (1 - ratio))`` positions: ``1 - (B + 0.5) / n`` makes that exactly ``B``."""
    return 0.0 if n <= budget else 1.0 - (budget + 0.5) / n


def cut_middle(tokenizer, context: str, limit: int | None) -> str:
    if limit is None:
        return context
    ids = tokenizer.encode(context, add_special_tokens=False)
    if len(ids) <= limit:
        return context
    head = limit // 2
    return tokenizer.decode(ids[:head]) + tokenizer.decode(ids[len(ids) - (limit - head) :])


def select(samples: list[dict], tasks: list[str] | None, limit: int | None) -> list[dict]:
    counts: dict[str, int] = {}
    out = []
    for s in samples:
        if (tasks and s["task"] not in tasks) or (limit is not None and counts.get(s["task"], 0) >= limit):
            continue
        counts[s["task"]] = counts.get(s["task"], 0) + 1
        out.append(s)
    return out


def inside(args: argparse.Namespace) -> None:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    align_masks_per_layer()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    jsonl, metrics = import_polykv_pure()
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = select(jsonl.load_samples(args.data), args.tasks, args.limit)
    if not samples:
        raise SystemExit("no samples (check --data, --tasks, --limit)")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.no_chat:
        tokenizer.chat_template = None  # kvpress's pipeline then formats `bos + context`, `question\n + prefix`
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)

    records, seconds = [], []
    for sample in tqdm(samples, desc="kvpress", unit="sample"):
        start = time.perf_counter()
        context = cut_middle(tokenizer, sample["context"], args.max_context)
        # kvpress puts context + question in one user turn (chat template) with nothing in between; our prompt has
        # "\n\n" there, so the question carries it: the token sequences are the same.
        question = "\n\n" + sample["question"] if sample["question"] else ""
        kw = dict(question=question, answer_prefix=sample.get("answer_prefix", ""))
        n = pipe.preprocess(context, questions=[question], answer_prefix=kw["answer_prefix"], max_context_length=10**9)[
            "context_ids"
        ].shape[1]
        max_new = int(sample["max_new_tokens"])

        def run(press, budget, name, sample=sample, context=context, kw=kw, n=n, max_new=max_new):
            with torch.no_grad():
                answer = pipe(context, press=press, max_new_tokens=max_new, **kw)["answer"].strip()
            value = metrics.score(sample["metric"], answer, sample["answers"], all_classes=sample.get("all_classes"))
            records.append(
                {
                    "id": sample["id"],
                    "task": sample["task"],
                    "method": name,
                    "budget": budget,
                    "prediction": answer,
                    "score": value,
                    "context_tokens": n,
                    "compression_ratio": None if press is None else press.compression_ratio,
                }
            )

        run(None, None, "full")
        for name in args.presses:
            for budget in args.budgets:
                press = make_press(name)
                press.compression_ratio = ratio_for(budget, n)
                run(press, budget, name)
        seconds.append(time.perf_counter() - start)

    tasks = sorted({r["task"] for r in records})

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    summary = {}
    for name in ["full", *args.presses]:
        summary[name] = {}
        for budget in args.budgets:
            b = None if name == "full" else budget
            row = {
                t: mean(r["score"] for r in records if r["method"] == name and r["budget"] == b and r["task"] == t)
                for t in tasks
            }
            row["average"] = mean(row[t] for t in tasks)
            summary[name][str(budget)] = row
    results = {
        "config": {
            "data": args.data,
            "model_dir": args.model_dir,
            "budgets": args.budgets,
            "presses": args.presses,
            "protocol": "query-agnostic (kvpress pipeline: compress the context, then the question)",
            "kvpress": _version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "max_context": args.max_context,
        },
        "tasks": tasks,
        "summary": summary,
        "full_cache": dict(summary["full"][str(args.budgets[0])]),
        "timing": {"samples": len(seconds), "seconds": sum(seconds), "seconds_per_sample": mean(seconds)},
        "samples": records,
    }
    out = Path(args.out)
    jsonl.atomic_write_text(out / "peers.json", [json.dumps(results, indent=1, ensure_ascii=False), "\n"])
    jsonl.atomic_write_text(out / "peers.md", [markdown(results)])
    print(markdown(results))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def markdown(results: dict) -> str:
    budgets = [str(b) for b in results["config"]["budgets"]]

    def fmt(v):
        return "–" if v is None else f"{v:.3f}"

    lines = [
        f"# kvpress {results['config']['kvpress']} on the same data ({results['timing']['samples']} samples)",
        "",
        "| press | " + " | ".join(f"B={b}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name, row in results["summary"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(row[b]["average"]) for b in budgets) + " |")
    lines += ["", "| task | full cache |", "|---|---:|"]
    lines += [f"| {t} | {fmt(results['full_cache'][t])} |" for t in results["tasks"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.inside:
        inside(args)
    else:
        outside(args, argv)


if __name__ == "__main__":
    main()
