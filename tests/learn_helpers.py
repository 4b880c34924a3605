"""Helpers of the training tests: a tiny synthetic corpus and the ``fit`` command line of ``configs/tiny.yaml``."""

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def write_corpus(root: Path, seed: int = 0) -> Path:
    """`root/corpus/{train,validation}.jsonl`: 8 and 3 documents of 40 random facts, each probed on one of them."""
    rng = random.Random(seed)
    for split, count in (("train", 8), ("validation", 3)):
        rows = []
        for i in range(count):
            facts = {f"key{rng.randrange(1000)}": rng.randrange(10_000) for _ in range(40)}
            lines = [f"The value of {k} is {v}." for k, v in facts.items()]
            target = rng.choice(list(facts))
            rows.append(
                {
                    "id": f"{split}-{i}",
                    "context": "Facts follow. " + " ".join(lines),
                    "probe": f" Question: what is {target}? Answer: the value of {target} is {facts[target]}.",
                }
            )
        path = root / "corpus" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def fit_cmd(*extra: str) -> list[str]:
    """``polykv-learn fit --config configs/tiny.yaml EXTRA`` as a subprocess command (through
    :func:`polykv_learn.learn.fitcli.run_fit`)."""
    return [sys.executable, "-m", "polykv_learn.learn.fitcli", "fit", "--config", str(TINY_CONFIG), *extra]
