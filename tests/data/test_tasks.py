"""Evaluation task builders on small fixture documents, and ``prepare_data`` end to end (no downloads)."""

import json
import random

import pytest

from polykv_learn.data.corpus import document_split
from polykv_learn.data.jsonl import load_samples, write_jsonl
from polykv_learn.data.prepare import prepare_data
from polykv_learn.data.sources import Document, QAPair, approx_tokens
from polykv_learn.data.tasks import (
    HELD_OUT_SOURCES,
    NEEDLE_TASKS,
    TASK_INTROS,
    TASK_SPECS,
    TASKS,
    TEST_ONLY_TASKS,
    build_tasks,
)
from polykv_learn.eval.metrics import METRICS

LENGTHS = (300, 900)
EXTRACTIVE = (
    "single_doc_qa",
    "multi_doc_qa",
    "passkey",
    "multi_key_needle",
    "multi_query_needle",
    "multi_value_needle",
    "kv_lookup",
    "variable_tracking",
    "book_qa",
)


def prose(rng: random.Random, words: int) -> str:
    sentences, n = [], 0
    while n < words:
        k = rng.randint(6, 14)
        sentences.append(" ".join(f"w{rng.randrange(500)}" for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(sentences)


def fixture_documents() -> dict[str, list[Document]]:
    rng = random.Random(0)
    quoref = []
    for i in range(60):
        text = prose(rng, 100) + f" The keeper of site {i} is Keeper{i}son. " + prose(rng, 60)
        qa = (QAPair(f"Who is the keeper of site {i}?", (f"Keeper{i}son",)),)
        quoref.append(Document(f"quoref/{i:05d}", "quoref", f"p{i}", text, qa=qa))
    xsum = [Document(f"xsum/{i:05d}", "xsum", f"a{i}", prose(rng, 150), summary=prose(rng, 12)) for i in range(60)]
    labels = ["play_music", "get_weather", "rate_book"]
    snips = [
        Document(
            f"snips/{i:05d}",
            "snips",
            "u",
            prose(rng, 8),
            label=labels[i % 3],
            meta={"classes": ",".join(labels), "label_name": "Intent"},
        )
        for i in range(90)
    ]
    austen = [
        Document(f"austen/novel/ch{i:02d}", "austen", f"ch{i}", "\n\n".join(prose(rng, 60) for _ in range(12)))
        for i in range(40)
    ]
    code = "\n".join(f"def f{j}(x):\n    return compute_value(x, {j}) + offset_{j}\n" for j in range(80))
    python = [Document(f"python/m{i}.py", "python", f"m{i}.py", f"# module {i}\n{code}") for i in range(6)]
    wikilingua = [Document(f"wikilingua/{i:05d}", "wikilingua", "w", prose(rng, 200), summary="s") for i in range(10)]
    pydocs = [
        Document(f"pydocs/t{i}", "pydocs", f"t{i}", "\n\n".join(prose(rng, 50) for _ in range(6))) for i in range(8)
    ]
    return {
        "quoref": quoref,
        "xsum": xsum,
        "snips": snips,
        "austen": austen,
        "python": python,
        "wikilingua": wikilingua,
        "pydocs": pydocs,
    }


@pytest.fixture(scope="module")
def documents():
    return fixture_documents()


@pytest.fixture(scope="module")
def records(documents):
    return build_tasks(documents, approx_tokens, LENGTHS, samples_per_task=4, seed=0, with_doc_ids=True)


def test_every_task_built_with_schema(records):
    assert len(TASKS) >= 8 and set(TEST_ONLY_TASKS) <= set(TASKS) and len(TEST_ONLY_TASKS) >= 2
    for split in ("train", "validation", "test"):
        expected = [t for t in TASKS if split == "test" or t not in TEST_ONLY_TASKS]
        if split == "validation":
            expected = [t for t in expected if t in NEEDLE_TASKS]
        got = [r["task"] for r in records if r["split"] == split]
        assert sorted(set(got)) == sorted(expected)
        assert all(got.count(t) == 4 for t in expected)
    for r in records:
        assert r["metric"] in METRICS and r["metric"] == TASK_SPECS[r["task"]].metric
        assert isinstance(r["question"], str) and r["answers"] and all(isinstance(a, str) and a for a in r["answers"])
        assert r["max_new_tokens"] > 0
        if r["task"] in ("multi_key_needle", "multi_query_needle", "multi_value_needle"):  # prefix restates question
            keys = r["question"].split(" for ")[1].split(" mentioned")[0]
            assert keys in r["answer_prefix"] and r["answer_prefix"].endswith(("is", "are"))
        elif TASK_SPECS[r["task"]].source in ("synthetic", "haystack"):
            assert r["answer_prefix"]
        else:
            assert r["answer_prefix"] == TASK_SPECS[r["task"]].answer_prefix
        assert r["context"].startswith(TASK_INTROS[r["task"]] + "\n\n")  # the instruction opens the context
        assert LENGTHS[0] <= approx_tokens(r["context"]) <= LENGTHS[1]
    assert len({r["id"] for r in records}) == len(records)


def test_answers_present_or_derivable(records, documents):
    for r in records:
        if r["task"] in EXTRACTIVE:
            assert all(a in r["context"] for a in r["answers"]), r["id"]
        elif r["task"] == "few_shot_classification":
            assert r["answers"][0] in r["all_classes"] and f"Intent: {r['answers'][0]}" in r["context"]
        elif r["task"] == "code_completion":  # the answer is the line right after the context in its file
            file_text = next(d.text for d in documents["python"] if d.doc_id == r["doc_ids"][0])
            code = r["context"].removeprefix(TASK_INTROS["code_completion"] + "\n\n")
            following = file_text.split(code + "\n", 1)[1].split("\n")[0]
            assert following.strip() == r["answers"][0]
        elif r["task"] == "summarisation":
            assert any(d.summary == r["answers"][0] for d in documents["xsum"] if d.doc_id == r["doc_ids"][0])
    multi = next(r for r in records if r["task"] == "multi_doc_qa")
    number = int(multi["question"].split("Passage ")[1].split(".")[0])
    passage = multi["context"].split(f"Passage {number}:\n")[1].split("\n\nPassage ")[0]
    assert multi["answers"][0] in passage  # the named passage holds the answer


def test_splits_by_document(records):
    for r in records:
        if r["split"] == "train":
            assert all(document_split(d, seed=0) != "test" for d in r["doc_ids"]), r["id"]
        elif r["task"] in NEEDLE_TASKS and r["split"] == "test" and not r["heldout_sources"]:
            assert all(document_split(d, seed=0) == "test" for d in r["doc_ids"]), r["id"]  # training families
        elif r["task"] not in TEST_ONLY_TASKS and r["task"] not in NEEDLE_TASKS and r["doc_ids"]:
            assert document_split(r["doc_ids"][0], seed=0) == "test", r["id"]  # the key document is a test one


def test_deterministic_and_seeded(documents, records):
    again = build_tasks(documents, approx_tokens, LENGTHS, samples_per_task=4, seed=0, with_doc_ids=True)
    assert again == records
    other = build_tasks(documents, approx_tokens, LENGTHS, samples_per_task=4, seed=1)
    assert [r["context"] for r in other] != [r["context"] for r in records]


def test_chat_mode_and_missing_sources(documents):
    chat = build_tasks(
        {"quoref": documents["quoref"]},
        approx_tokens,
        LENGTHS,
        samples_per_task=2,
        chat=True,
        tasks=["single_doc_qa", "passkey", "code_completion"],
    )
    assert {r["task"] for r in chat} == {"single_doc_qa", "passkey"}  # no python documents: skipped
    assert all(r["answer_prefix"] == "" for r in chat)
    with pytest.raises(ValueError, match="unknown tasks"):
        build_tasks(documents, tasks=["nope"])


def test_records_roundtrip_through_loader(records, tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_jsonl(records, path)
    assert load_samples(path) == records


def test_prepare_data_end_to_end(documents, tmp_path):
    manifest = prepare_data(
        tmp_path,
        approx_tokens,
        seed=0,
        documents=documents,
        context_tokens=(200, 700),
        target_tokens=LENGTHS,
        samples_per_task=2,
        synthetic_docs=9,
    )
    corpus = {
        s: [json.loads(x) for x in (tmp_path / "corpus" / f"{s}.jsonl").open()] for s in ("train", "validation", "test")
    }
    tasks = {s: load_samples(tmp_path / "tasks" / f"{s}.jsonl") for s in ("train", "test")}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["tasks"]["test"] == {t: 2 for t in sorted(TASKS)}
    assert set(manifest["tasks"]["train"]) == set(TASKS) - set(TEST_ONLY_TASKS)
    assert {s: sum(c.values()) for s, c in manifest["corpus"].items()} == {s: len(v) for s, v in corpus.items()}
    for split, samples in corpus.items():
        for s in samples:
            assert s["split"] == split and all(document_split(d, seed=0) == split for d in s["doc_ids"])
            assert s["source"] not in HELD_OUT_SOURCES
            assert "variable_tracking" not in s["doc_id"]
    assert {s["source"] for s in corpus["train"]} >= {"quoref", "xsum", "austen", "synthetic"}
    test_docs = {d for s in corpus["test"] for d in s["doc_ids"]}
    assert test_docs and not test_docs & {d for s in corpus["train"] for d in s["doc_ids"]}
    assert all(r["split"] == "train" for r in tasks["train"]) and all(r["split"] == "test" for r in tasks["test"])
