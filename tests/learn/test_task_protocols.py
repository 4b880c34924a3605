"""Task samples in both evaluation protocols (query-agnostic, query-aware) and validation on a separate task file."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from polykv_learn.data.layout import prompt_layout
from polykv_learn.eval.evaluator import EvalSettings, prompt_pieces
from polykv_learn.learn.datamodule import PrefillDataModule, load_task_rows
from polykv_learn.learn.shared import shared_tokenizer
from polykv_learn.learn.task_rows import assign_protocols, task_pieces

MODEL = "tiny-llama"  # SmolLM2's vocabulary and tokenizer


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(i: int, task: str, words: int, split: str = "train", **kw) -> dict:
    return {
        "id": f"{task}/{split}/{i:04d}",
        "task": task,
        "split": split,
        "context": "Read the text. " + " ".join(f"w{j}x{i}" for j in range(words)) + f" The pass key is {4700 + i}.",
        "question": f"What is the pass key number {i}?",
        "answers": [str(4700 + i)],
        "answer_prefix": "The pass key is",
        "max_new_tokens": 8,
        **kw,
    }


@pytest.fixture
def data(tiny_corpus, tmp_path):
    """A data folder: the tiny corpus, no task files yet."""
    root = tmp_path / "data"
    for split in ("train", "validation"):
        (root / "corpus").mkdir(parents=True, exist_ok=True)
        (root / "corpus" / f"{split}.jsonl").write_text((tiny_corpus / "corpus" / f"{split}.jsonl").read_text())
    return root


def _dm(data: Path, **kw) -> PrefillDataModule:
    return PrefillDataModule(
        data_dir=str(data),
        cache_dir=str(data.parent / "cache"),
        model_name=MODEL,
        policies=["streaming", "snapkv", "tova", "knorm"],
        budgets=[16, 32, 64],
        max_context_tokens=400,
        min_context_tokens=40,
        probe_tokens=24,
        task_probe_tokens=64,
        **kw,
    )


def _tasks(samples) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, int]]:
    """Task samples by row id (``task/<id>``): (sample id, context ids, probe ids, answer start)."""
    return {s[0].split("|")[0]: s for s in samples if s[0].startswith("task/")}


TRAIN = [_row(i, "passkey", 30 + i) for i in range(5)] + [_row(i, "summarisation", 40 + i) for i in range(5, 9)]


def test_each_row_is_the_evaluations_prompt_in_its_protocol(data):
    nq = _row(9, "summarisation", 35, question="", answer_prefix="")  # no question: the answer continues the context
    _write(data / "tasks" / "train.jsonl", TRAIN + [nq])
    dm = _dm(data, task_file="tasks/train.jsonl")
    samples = _tasks(dm._tokenized("train"))
    tok = shared_tokenizer(MODEL)
    protocols = {}
    for raw in TRAIN + [nq]:
        sid, ctx, probe, start = samples[f"task/{raw['id']}"]
        aware = sid.endswith("|qa")
        protocols[raw["id"]] = aware
        pieces = prompt_pieces(tok, EvalSettings(query_aware=aware), raw)
        assert ctx.tolist() == pieces.prompt
        assert probe.tolist() == pieces.tail + pieces.answer and start == len(pieces.tail)
        base = f"task/{raw['id']}|{len(pieces.prompt)}|{len(probe)}|a{start}"
        assert sid == base + ("|qa" if aware else "")
    # per task type in file order: agnostic, aware, agnostic, ...; the question-less row stays agnostic
    assert [protocols[r["id"]] for r in TRAIN] == [False, True, False, True, False, False, True, False, True]
    assert protocols[nq["id"]] is False
    # the question moved into the compressed prefix: it ends with the question's own tokens, the probe starts with
    # the footer's
    sid, ctx, probe, start = samples[f"task/{TRAIN[1]['id']}"]
    layout = prompt_layout(TRAIN[1])
    question = tok(layout.question, add_special_tokens=False).input_ids
    footer = tok(layout.footer, add_special_tokens=False).input_ids
    assert ctx[-len(question) :].tolist() == question and probe[:start].tolist() == footer
    # query-agnostic samples are exactly those of an agnostic-only module (their cached prefills stay valid)
    agnostic = _tasks(_dm(data, task_file="tasks/train.jsonl", task_protocols=["query_agnostic"])._tokenized("train"))
    for key, (sid, ctx, probe, start) in samples.items():
        if not sid.endswith("|qa"):
            a_sid, a_ctx, a_probe, a_start = agnostic[key]
            assert (a_sid, a_start) == (sid, start) and torch.equal(a_ctx, ctx) and torch.equal(a_probe, probe)
    # sources: one per task type and protocol, so the round-robin with the corpus keeps both protocols
    rows = dm.task_rows("train")
    assert Counter(r["source"] for r in rows) == {
        "task:passkey": 3,
        "task:passkey:query_aware": 2,
        "task:summarisation": 3,
        "task:summarisation:query_aware": 2,
    }


def test_protocols_are_taken_in_turn_per_task_type_in_the_listed_order(tmp_path):
    rows = load_task_rows(_write(tmp_path / "train.jsonl", TRAIN))
    order = [r["protocol"] for r in assign_protocols(rows, ["query_aware", "query_agnostic"])]
    qa, ag = "query_aware", "query_agnostic"
    assert order == [qa, ag, qa, ag, qa, qa, ag, qa, ag]
    assert [r["protocol"] for r in assign_protocols(rows, ["query_aware"])] == [qa] * 9
    assert [r["protocol"] for r in assign_protocols(rows, ["query_agnostic"])] == [ag] * 9
    nq = load_task_rows(_write(tmp_path / "nq.jsonl", [_row(1, "passkey", 5, question="")]))
    assert [r["protocol"] for r in assign_protocols(nq + rows[:2], ["query_aware"])] == [ag, qa, qa]
    aware = assign_protocols(rows[:1], ["query_aware"])[0]
    context_parts, tail, answer = task_pieces(TRAIN[0], "query_aware")
    assert aware["context_parts"] == context_parts == [TRAIN[0]["context"], "\n\nWhat is the pass key number 0?"]
    assert aware["probe_parts"] == (tail, answer) == (["\nThe pass key is"], " 4700")
    assert aware["id"] == "task/passkey/train/0000" and aware["source"] == "task:passkey:query_aware"


def test_the_length_limit_covers_the_question_and_the_window_sees_it(data):
    tok = shared_tokenizer(MODEL)
    # a row whose context fits max_context_tokens (400) but not with its question
    words = next(
        w
        for w in range(40, 120)
        if len(tok(_row(0, "passkey", w)["context"], add_special_tokens=False).input_ids) in range(391, 401)
    )
    edge = _row(0, "passkey", words)
    assert sum(len(tok(p, add_special_tokens=False).input_ids) for p in task_pieces(edge, "query_aware")[0]) > 400
    _write(data / "tasks" / "train.jsonl", [edge])
    aware = _tasks(_dm(data, task_file="tasks/train.jsonl", task_protocols=["query_aware"])._tokenized("train"))
    agnostic_dm = _dm(data, task_file="tasks/train.jsonl", task_protocols=["query_agnostic"])
    assert set(aware) == set() and set(_tasks(agnostic_dm._tokenized("train"))) == {f"task/{edge['id']}"}

    # query-aware, the observation window (the last 8 positions here) lies in the question: its statistics differ
    short = _row(1, "passkey", 60)
    _write(data / "tasks" / "train.jsonl", [short])
    dm = _dm(data, task_file="tasks/train.jsonl", task_protocols=["query_aware"], window=8)
    sid, ctx, probe, start = _tasks(dm._tokenized("train"))[f"task/{short['id']}"]
    question = tok(prompt_layout(short).question, add_special_tokens=False).input_ids
    assert dm.window <= len(question) and ctx[-len(question) :].tolist() == question
    ag_dm = _dm(data, task_file="tasks/train.jsonl", task_protocols=["query_agnostic"], window=8)
    a_sid, a_ctx, a_probe, a_start = _tasks(ag_dm._tokenized("train"))[f"task/{short['id']}"]
    assert torch.equal(ctx[: len(a_ctx)], a_ctx) and len(ctx) == len(a_ctx) + len(question)
    dm.store.build(sid, ctx, probe, start)
    dm.store.build(a_sid, a_ctx, a_probe, a_start)
    got, base = dm.store.load(sid), dm.store.load(a_sid)
    assert got.context_length == len(ctx) and got.answer_start == start and torch.equal(got.probe_ids, probe)
    assert got.features.shape == base.features.shape and not torch.allclose(got.features, base.features)


def test_validation_rows_come_from_the_task_val_file(data):
    _write(data / "tasks" / "train.jsonl", TRAIN)
    val = [_row(i, "passkey", 20 + i, split="validation") for i in range(4)]
    val += [_row(i, "kv_retrieval", 20 + i, split="validation") for i in range(4, 8)]
    val.insert(2, _row(99, "passkey", 600, split="validation"))  # too long: skipped, the next one is taken
    _write(data / "tasks" / "validation.jsonl", val)
    dm = _dm(data, task_file="tasks/train.jsonl", task_val_file="tasks/validation.jsonl", task_val_samples=5)
    # training: every row of task_file (nothing is held out of it)
    assert set(_tasks(dm._tokenized("train"))) == {f"task/{r['id']}" for r in TRAIN}
    samples = dm._tokenized("validation")
    assert len([s for s in samples if not s[0].startswith("task/")]) == 3  # the corpus validation is all there
    chosen = _tasks(samples)
    assert len(chosen) == 5 and "task/passkey/validation/0099" not in chosen
    # validation rows take the protocols in turn per task type (file order), like the training rows
    by_row = {r["id"]: r["protocol"] for r in dm.task_rows("validation")}
    qa, ag = "query_aware", "query_agnostic"
    assert [by_row[f"task/{r['id']}"] for r in val] == [ag, qa, ag, qa, ag, ag, qa, ag, qa]
    everything = _dm(data, task_file="tasks/train.jsonl", task_val_file="tasks/validation.jsonl", task_val_samples=99)
    assert set(_tasks(everything._tokenized("validation"))) == {f"task/{r['id']}" for r in val if r["id"][-2:] != "99"}
    # the cap: round-robin over task types, then over the protocols of each
    per = Counter((sid.split("/")[1], sid.endswith("|qa")) for sid, *_ in chosen.values())
    assert per == {("kv_retrieval", False): 2, ("kv_retrieval", True): 1, ("passkey", False): 1, ("passkey", True): 1}
    for sid, ctx, probe, start in chosen.values():
        raw = next(r for r in val if sid.startswith(f"task/{r['id']}|"))
        pieces = prompt_pieces(shared_tokenizer(MODEL), EvalSettings(query_aware=sid.endswith("|qa")), raw)
        assert ctx.tolist() == pieces.prompt and probe.tolist() == pieces.tail + pieces.answer
        assert start == len(pieces.tail)
    # without a training task file: corpus training, task validation
    alone = _dm(data, task_val_file="tasks/validation.jsonl", task_val_samples=2)
    assert not _tasks(alone._tokenized("train")) and len(_tasks(alone._tokenized("validation"))) == 2


def test_bad_task_arguments_fail_in_one_line(data):
    _write(data / "tasks" / "train.jsonl", TRAIN)
    val = _write(data / "tasks" / "validation.jsonl", [_row(0, "passkey", 20, split="validation")])
    for protocols, shown in (
        ([], "[]"),
        (["query_aware", "query_aware"], "['query_aware', 'query_aware']"),
        (["query_aware", "chat"], "['query_aware', 'chat']"),
        ("query_aware", "'query_aware'"),
    ):
        with pytest.raises(ValueError) as err:
            _dm(data, task_file="tasks/train.jsonl", task_protocols=protocols)
        assert str(err.value) == (
            f"task_protocols must be a non-empty list of distinct values from query_agnostic, query_aware, got {shown}"
        )
    with pytest.raises(ValueError) as err:
        _dm(data, task_val_file="tasks/validation.jsonl")
    assert str(err.value) == (
        "task_val_samples must be an integer >= 1 with a task_val_file (how many of its rows are validated on), got 0"
    )
    with pytest.raises(FileNotFoundError, match=r"missing data file\(s\): .*tasks/nope.jsonl; create them with"):
        _dm(data, task_val_file="tasks/nope.jsonl", task_val_samples=2)
    with pytest.raises(ValueError, match="task_val_file must be a file path relative to data_dir .or null., got 3"):
        _dm(data, task_val_file=3, task_val_samples=2)
    # a validation file holds validation-split rows of task types that are not test-only (checked before any load)
    for bad, why in (
        (_row(1, "passkey", 10), "split 'train'"),
        (_row(2, "passkey", 10, split="test"), "split 'test'"),
        (_row(3, "code_completion", 10, split="validation"), "task 'code_completion'"),
    ):
        _write(val, [_row(0, "passkey", 20, split="validation"), bad])
        with pytest.raises(ValueError) as err:
            _dm(data, task_file="tasks/train.jsonl", task_val_file="tasks/validation.jsonl", task_val_samples=2)
        message = str(err.value)
        assert message.startswith(f"{val}:2: task sample {bad['id']!r} ") and why in message
        assert "may not be validated on: only the validation split of task types other than" in message
    with pytest.raises(ValueError, match="split must be one of train, validation, got 'test'"):
        load_task_rows(data / "tasks" / "train.jsonl", "test")


def test_fit_rejects_bad_task_settings_before_any_model_load(data, tmp_path, monkeypatch):
    import sys

    from learn_helpers import TINY_CONFIG

    from polykv_learn.learn import datamodule as datamodule_module
    from polykv_learn.learn import module as module_module
    from polykv_learn.learn.fitcli import run_fit

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    for target in (datamodule_module, module_module):
        monkeypatch.setattr(target, "shared_model", refuse)
    monkeypatch.setattr(datamodule_module, "shared_tokenizer", refuse)
    monkeypatch.setattr(sys, "argv", ["polykv-learn"])
    monkeypatch.chdir(tmp_path)
    _write(data / "tasks" / "train.jsonl", TRAIN)
    _write(data / "tasks" / "validation.jsonl", [_row(0, "passkey", 20, split="validation"), TRAIN[0]])
    base = ["fit", "--config", str(TINY_CONFIG), f"--data.data_dir={data}", f"--data.cache_dir={tmp_path / 'c'}"]
    val = ["--data.task_file=tasks/train.jsonl", "--data.task_val_file=tasks/validation.jsonl"]
    for extra, message in (
        (["--data.task_protocols=[query_aware, chat]"], "task_protocols must be a non-empty list of distinct values"),
        ([*val, "--data.task_val_samples=0"], "task_val_samples must be an integer >= 1 with a task_val_file"),
        ([*val, "--data.task_val_samples=4"], f"{data / 'tasks' / 'validation.jsonl'}:2: task sample "),
    ):
        with pytest.raises(ValueError) as err:
            run_fit([*base, *extra])
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "c").exists() and not list(tmp_path.rglob("version_*"))
