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


def batched_equals_single(method_names, capture, budgets):
    """Evaluate one tiny-llama sample with ``method_names`` twice, as one fork batch (64 forks, groups of 8) and one
    fork at a time; assert every record agrees (prediction, NLL within 1e-4, bytes) and return the batched result."""
    import pytest

    from polykv_learn.eval.evaluator import EvalSettings, Evaluator
    from polykv_learn.eval.methods import available_methods, resolve_methods
    from polykv_learn.models import load_model

    model, tok = load_model("tiny-llama")
    sample = {**make_samples(1)[0], "max_new_tokens": 6}
    methods = resolve_methods(list(method_names), available_methods())

    def run(batch_size, group_size):
        settings = EvalSettings(budgets=tuple(budgets), batch_size=batch_size, group_size=group_size)
        return Evaluator(model, tok, methods, settings, capture).evaluate_sample(sample)

    batched, single = run(64, 8), run(1, 1)
    assert [r["prediction"] for r in batched.records] == [r["prediction"] for r in single.records]
    for a, b in zip(batched.records, single.records, strict=True):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-4, abs=1e-5)
        assert a["kv_bytes"] == b["kv_bytes"]
    return batched
