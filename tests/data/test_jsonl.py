"""The JSONL sample loader (validation, defaults, line numbers) and the atomic writer."""

import json

import pytest

from polykv_learn.data.jsonl import DEFAULT_MAX_NEW_TOKENS, load_samples, write_jsonl

GOOD = {"context": "c", "question": "q", "answers": ["a"], "metric": "qa_f1"}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_valid_file_defaults_and_blank_lines(tmp_path):
    full = {
        **GOOD,
        "task": "t",
        "id": "x1",
        "answer_prefix": "Answer:",
        "max_new_tokens": 5,
        "all_classes": ["a", "b"],
        "split": "test",
    }
    path = write_lines(tmp_path / "s.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(full)])
    first, second = load_samples(path)
    assert first["task"] == "custom" and first["id"] == "line1" and first["answer_prefix"] == ""
    assert first["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS["qa_f1"]
    assert second == full  # given values kept, unknown keys (split) passed through


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "question"}), "missing required key 'question'"),
        (json.dumps({**GOOD, "context": 3}), "'context' must be a string"),
        (json.dumps({**GOOD, "answers": "a"}), "'answers' must be a non-empty list of strings"),
        (json.dumps({**GOOD, "answers": ["a", 1]}), "'answers' must be a non-empty list of strings"),
        (json.dumps({**GOOD, "answers": []}), "'answers' is empty"),
        (json.dumps({**GOOD, "answers": [""]}), "'answers'[0] is ''; every gold answer must be a non-empty string"),
        (json.dumps({**GOOD, "answers": ["a", " \t"]}), "'answers'[1] is ' \\t'; every gold answer must be"),
        (json.dumps({**GOOD, "metric": "bleu"}), "unknown metric 'bleu'; allowed: string_match, qa_f1"),
        (json.dumps({**GOOD, "max_new_tokens": 0}), "'max_new_tokens' must be a positive integer"),
        (json.dumps({**GOOD, "max_new_tokens": True}), "'max_new_tokens' must be a positive integer"),
        (json.dumps({**GOOD, "task": 1}), "'task' must be a string"),
        (json.dumps({**GOOD, "all_classes": []}), "'all_classes' must be a non-empty list of strings"),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(ValueError) as err:
        load_samples(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_duplicate_ids_rejected(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({**GOOD, "id": "a"}), json.dumps({**GOOD, "id": "a"})])
    with pytest.raises(ValueError, match=r":2: duplicate id 'a' \(first on line 1\)"):
        load_samples(path)


def test_write_jsonl_roundtrip_and_atomicity(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    records = [{**GOOD, "id": f"r{i}", "context": "é ✓"} for i in range(3)]
    assert write_jsonl(records, path) == 3
    assert [s["id"] for s in load_samples(path)] == ["r0", "r1", "r2"]
    before = path.read_text(encoding="utf-8")

    def failing():
        yield records[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert path.read_text(encoding="utf-8") == before  # old file untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]  # no temporary file left


def test_atomic_write_text_is_the_package_helper():
    """data.prepare and the peer benchmarks import ``atomic_write_text`` from here: it is polykv_learn.atomic's."""
    from polykv_learn import atomic
    from polykv_learn.data import jsonl

    assert jsonl.atomic_write_text is atomic.atomic_write_text
