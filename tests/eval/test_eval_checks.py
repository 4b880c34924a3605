"""`polykv-learn evaluate` checks its whole input before the model loads: --out, every JSONL row, the options,
the router artifacts, --merge inputs, and every sample's length against the model's positions."""

import json
import os
from pathlib import Path

import pytest
from artifact_helpers import make_artifact
from eval_helpers import WORDS, make_samples, write_jsonl

from polykv_learn.eval.cli import evaluate_main
from polykv_learn.eval.evaluator import EvalSettings, prompt_pieces
from polykv_learn.models import build_tiny_model, load_tokenizer

LIMIT = 8192  # tiny-llama's max_position_embeddings, as SmolLM2's


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", make_samples(3))


def evaluate(data, out, *args):
    return evaluate_main(
        ["--data", str(data), "--out", str(out), "--model", "tiny-llama", "--no-router", "--no-chat"]
        + ["--methods", "snapkv", "--budgets", "32", "--no-progress", *args]
    )


def test_out_under_a_file_is_refused(no_model, data, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(ValueError) as err:
        evaluate(data, blocker / "sub" / "out")
    assert str(err.value) == (
        f"--out {blocker / 'sub' / 'out'}: {blocker} is a file, so no folder can be made in it; give another --out"
    )
    with pytest.raises(ValueError) as err:
        evaluate(data, blocker)
    assert str(err.value) == f"--out {blocker} is a file, not a folder; give a folder path"
    assert blocker.read_text() == "a file"


def test_unwritable_out_is_refused(no_model, data, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: make the check see what another user sees
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
        with pytest.raises(PermissionError) as err:
            evaluate(data, locked / "a" / "b")
        assert str(err.value) == (
            f"--out {locked / 'a' / 'b'}: its nearest existing parent {locked} is not writable; give another --out"
        )
        assert not (locked / "a").exists()
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("answer", ["", "   "])
def test_blank_gold_answer_on_line_3_is_refused_before_any_sample(no_model, tmp_path, answer):
    rows = make_samples(3)
    rows[2]["answers"] = ["31034", answer]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        evaluate(path, tmp_path / "out")
    assert str(err.value) == (
        f"{path}:3: 'answers'[1] is {answer!r}; every gold answer must be a non-empty string (not only whitespace)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--budgets", "32", "0"], ValueError, "--budgets must be >= 1, got 0"),
        (["--max-context", "1"], ValueError, "--max-context must be >= 2, got 1"),
        (["--batch-size", "0"], ValueError, "--batch-size must be >= 1, got 0"),
        (["--limit", "0"], ValueError, "--limit must be >= 1, got 0"),
        (["--methods", "snapkv", "nope"], ValueError, "--methods: unknown method(s) 'nope'; allowed: full, "),
        (["--methods", "polykv"], ValueError, "--methods: method(s) not available: 'polykv' needs --router DIR"),
        (["--tasks", "passkey", "--shard", "1/1"], ValueError, "--shard: shard must be I/K with K >= 1 and 0 <= I"),
    ],
)
def test_bad_options_fail_before_the_model_loads(no_model, data, tmp_path, args, error, message):
    with pytest.raises(error) as err:
        evaluate(data, tmp_path / "out", *args)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_missing_data_file(no_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--data .*nope\.jsonl is not a file \(make the task files with"):
        evaluate(tmp_path / "nope.jsonl", tmp_path / "out")


def test_router_folder_is_read_before_the_model_loads(no_model, data, tmp_path):
    def run(router):
        return evaluate_main(["--data", str(data), "--out", str(tmp_path / "o"), "--router", str(router)])

    with pytest.raises(FileNotFoundError, match=r"^--router: .*missing is not a polykv-learn artifact folder"):
        run(tmp_path / "missing")
    router = make_artifact(tmp_path / "router", build_tiny_model("tiny-llama"))
    (router / "polykv.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"^--router: corrupt artifact .*router: polykv\.json is not valid JSON"):
        run(router)
    # trained for tiny-mistral (1 KV head), evaluated on tiny-llama (2): refused from the configuration alone
    other = make_artifact(tmp_path / "mistral", build_tiny_model("tiny-mistral"))
    with pytest.raises(ValueError) as err:
        evaluate_main(["--data", str(data), "--out", str(tmp_path / "o"), "--router", str(other), "--model",
                       "tiny-llama"])  # fmt: skip
    assert str(err.value) == (
        "--router: this router was trained for tiny-mistral with num_kv_heads 1 (model: 2); give the model it was "
        "trained for (--model)"
    )


def test_truncated_or_foreign_merge_input_is_refused(no_model, tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    (part / "results.json").write_text('{"config": {"protocol": "query-agn')
    with pytest.raises(ValueError) as err:
        evaluate_main(["--merge", str(part), str(part), "--out", str(tmp_path / "merged")])
    assert str(err.value) == (
        f"{part / 'results.json'} is not a complete results.json (invalid JSON at line 1 column 25: Unterminated "
        f"string starting at); re-run the evaluation into {part} with --resume (it rebuilds results.json from its "
        "samples.jsonl)"
    )
    (part / "results.json").write_text(json.dumps({"config": {}, "samples": [], "tasks": []}))
    with pytest.raises(ValueError, match=r"^.*results\.json is not a results\.json of polykv-learn evaluate \(it "
                       r"lacks single_policies, timing\); re-run"):  # fmt: skip
        evaluate_main(["--merge", str(part), str(part), "--out", str(tmp_path / "merged")])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^--out .*file is a file, not a folder"):
        evaluate_main(["--merge", str(part), "--out", str(blocker)])
    assert not (tmp_path / "merged").exists()


# --- context length -------------------------------------------------------------------------------------------------
def long_samples(tmp_path):
    """Two samples a little longer than the tiny model's positions (about 8.3K tokens), one short one."""
    rows = make_samples(3)
    for row, words in zip(rows[:2], (6250, 6200), strict=True):
        noise = " ".join(WORDS[i % len(WORDS)] for i in range(words))
        row["context"] = f"{noise} {row['context']}"
    return rows, write_jsonl(tmp_path / "long.jsonl", rows)


def test_over_length_samples_are_refused_with_the_cut_that_fits(no_model, tmp_path):
    rows, path = long_samples(tmp_path)
    pieces = [prompt_pieces(load_tokenizer("tiny-llama"), EvalSettings(), r) for r in rows]
    assert [p.positions > LIMIT for p in pieces] == [True, True, False]
    fits = LIMIT - max(p.positions - p.context_tokens for p in pieces)
    with pytest.raises(ValueError) as err:
        evaluate(path, tmp_path / "out")
    assert str(err.value) == (
        f"2 of 3 samples need more positions than the model has (max_position_embeddings {LIMIT}); the longest, "
        f"'s0', needs {pieces[0].positions} (prompt, question and answer room); give --max-context {fits} (or less) "
        "to cut contexts in the middle"
    )
    with pytest.raises(ValueError, match=rf"^with --max-context {fits + 1}, 2 of 3 samples need more positions"):
        evaluate(path, tmp_path / "out", "--max-context", str(fits + 1))
    assert not (tmp_path / "out").exists()


def test_max_context_cuts_the_over_length_samples_and_says_how_many(tmp_path, capsys):
    rows, path = long_samples(tmp_path)
    pieces = [prompt_pieces(load_tokenizer("tiny-llama"), EvalSettings(), r) for r in rows]
    fits = LIMIT - max(p.positions - p.context_tokens for p in pieces)
    assert pieces[2].context_tokens < fits
    results = evaluate(path, tmp_path / "out", "--max-context", str(fits))
    assert f"--max-context {fits}: 2 of 3 samples have their context cut in the middle" in capsys.readouterr().out
    full = {r["id"]: r["context_tokens"] for r in results["samples"] if r["method"] == "full"}
    assert full == {"s0": fits, "s1": fits, "s2": pieces[2].context_tokens}
