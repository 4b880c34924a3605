"""Small evaluation inputs shared by the evaluation tests: pass-key samples and a JSONL writer."""

import json
import random

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu river stone cloud".split()


def make_samples(count=2, seed=0):
    """``count`` pass-key samples alternating between ``passkey`` and the test-only ``variable_tracking``."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        key = str(31000 + 17 * i)
        noise = " ".join(rng.choice(WORDS) for _ in range(160))
        rows.append(
            {
                "id": f"s{i}",
                "task": ("passkey", "variable_tracking")[i % 2],  # the second is a test-only task type
                "context": f"{noise} The pass key is {key}. {noise}",
                "question": "What is the pass key?",
                "answers": [key],
                "metric": "string_match",
                "answer_prefix": "The pass key is",
                "max_new_tokens": 5,
            }
        )
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
