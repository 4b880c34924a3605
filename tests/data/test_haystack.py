"""Needle tasks over natural haystacks: seeded, answers in context, and the held-out families and templates of the
generalisation protocol never reach a training row (task records or the training corpus)."""

import json
import random
from collections import Counter

import pytest
from test_tasks import fixture_documents

from polykv_learn.data import haystack
from polykv_learn.data.prepare import prepare_data
from polykv_learn.data.sources import approx_tokens
from polykv_learn.data.tasks import HELD_OUT_SOURCES, NEEDLE_TASKS, TEST_ONLY_TASKS, build_tasks

RANGE = (400, 900)
HELD_OUT_FAMILIES = {f.name for f in haystack.FAMILIES.values() if f.split != "train"}
HELD_OUT_TEMPLATES = [t for t in haystack.NEEDLES if t.split != "train"]


def _needle_phrase(template: haystack.NeedleTemplate) -> str:
    """The fixed words of a template before its first placeholder (what a record using it must contain)."""
    return template.text.split("{")[0].strip() or template.text.split("}")[1].split("{")[0].strip()


@pytest.fixture(scope="module")
def documents():
    return fixture_documents()


@pytest.fixture(scope="module")
def needles(documents):
    return build_tasks(
        documents, approx_tokens, RANGE, samples_per_task=6, seed=0, tasks=NEEDLE_TASKS, with_doc_ids=True
    )


def test_protocol_tables_are_consistent():
    train = [f for f in haystack.FAMILIES.values() if f.split == "train"]
    assert len(train) >= 5 and {"validation", "test"} <= {f.split for f in haystack.FAMILIES.values()}
    for keyed in (False, True):
        splits = Counter(t.split for t in haystack.NEEDLES if t.keyed == keyed)
        assert splits["train"] >= 3 and splits["validation"] >= 1 and splits["test"] >= 2
    assert len({t.name for t in haystack.NEEDLES}) == len(haystack.NEEDLES)
    assert {s for f in haystack.FAMILIES.values() if f.split != "train" for s in f.sources} <= set(HELD_OUT_SOURCES)


def test_every_answer_in_its_context_and_prefix_restates_the_question(needles):
    assert {r["task"] for r in needles} == set(NEEDLE_TASKS)
    for r in needles:
        assert all(r["context"].count(a) >= 1 for a in r["answers"]), r["id"]
        assert RANGE[0] <= approx_tokens(r["context"]) <= RANGE[1], r["id"]
        if r["task"] == "multi_value_needle":
            assert len(set(r["answers"])) == 3
        if r["task"] == "multi_query_needle":
            assert len(set(r["answers"])) == 2
        if r["task"] == "variable_tracking":  # each chain's assignments in order
            names = r["answers"]
            at = [r["context"].index(f"VAR {n} =") for n in names]
            assert at == sorted(at), r["id"]
        else:
            template = next(t for t in haystack.NEEDLES if t.name == r["template"])
            assert _needle_phrase(template) in r["context"] and template.attribute in r["question"]


def test_seeded_and_deterministic(documents, needles):
    again = build_tasks(
        documents, approx_tokens, RANGE, samples_per_task=6, seed=0, tasks=NEEDLE_TASKS, with_doc_ids=True
    )
    assert again == needles
    other = build_tasks(documents, approx_tokens, RANGE, samples_per_task=6, seed=1, tasks=NEEDLE_TASKS)
    assert [r["context"] for r in other] != [r["context"] for r in needles]


def test_splits_use_only_their_families_and_templates(needles):
    by_name = {t.name: t for t in haystack.NEEDLES}
    for r in needles:
        family = haystack.FAMILIES[r["haystack"]]
        template = by_name.get(r["template"])
        if r["split"] == "train":
            assert family.split == "train" and template.split == "train" and not r["heldout_sources"]
        elif r["split"] == "validation":
            assert family.split == "validation" and template.split == "validation"
        else:
            held = family.split == "test"
            assert r["heldout_sources"] == held
            assert r["task"] == "variable_tracking" or (template.split == "test") == held
    test = [r for r in needles if r["split"] == "test"]
    held = sum(r["heldout_sources"] for r in test)
    assert abs(2 * held - len(test)) <= len(NEEDLE_TASKS)  # about half of the test split is held out
    assert {r["split"] for r in needles if r["task"] in TEST_ONLY_TASKS} == {"test"}


def test_value_kinds_and_families_all_occur(needles):
    train = [r for r in needles if r["split"] == "train"]
    assert {r["value_kind"] for r in needles} == set(haystack.VALUE_KINDS)
    assert len({r["haystack"] for r in train}) >= 4


def test_code_haystack_needles_are_comment_lines(documents):
    rng = random.Random(3)
    family = haystack.FAMILIES["code"]
    template = next(t for t in haystack.NEEDLES if t.name == "keyed/records")
    sample = haystack.make_needle_sample(
        "multi_key_needle", rng, family, template, documents["python"], approx_tokens, 500
    )
    needle_lines = [line for line in sample.context.split("\n") if "was given the serial" in line]
    assert len(needle_lines) == 4 and all(
        line.lstrip().startswith("# According to the records") for line in needle_lines
    )


def test_bad_kind_and_template_rejected(documents):
    family = haystack.FAMILIES["filler"]
    keyed = next(t for t in haystack.NEEDLES if t.keyed)
    with pytest.raises(ValueError, match="unknown needle kind 'nope'; allowed: passkey"):
        haystack.make_needle_sample("nope", random.Random(0), family, keyed, [], approx_tokens, 100)
    with pytest.raises(ValueError, match="does not fit kind 'passkey'"):
        haystack.make_needle_sample("passkey", random.Random(0), family, keyed, [], approx_tokens, 100)


def test_no_held_out_family_or_template_in_any_training_row(documents, tmp_path):
    """prepare_data end to end: the training task records and the training corpus hold no held-out template phrase
    and no document of a held-out source; tasks/heldout.jsonl is exactly the held-out test records."""
    prepare_data(
        tmp_path,
        approx_tokens,
        documents=documents,
        context_tokens=(200, 700),
        target_tokens=RANGE,
        train_target_tokens=RANGE,
        samples_per_task=4,
        synthetic_docs=9,
    )
    read = {
        name: [json.loads(line) for line in path.open()]
        for name, path in {
            "tasks/train": tmp_path / "tasks" / "train.jsonl",
            "tasks/validation": tmp_path / "tasks" / "validation.jsonl",
            "tasks/test": tmp_path / "tasks" / "test.jsonl",
            "tasks/heldout": tmp_path / "tasks" / "heldout.jsonl",
            "corpus/train": tmp_path / "corpus" / "train.jsonl",
        }.items()
    }
    training = read["tasks/train"] + read["corpus/train"]
    assert len(read["tasks/train"]) >= 8 * 4 and read["tasks/validation"]
    held_docs = {d.doc_id for s in HELD_OUT_SOURCES for d in documents.get(s, ())}
    for row in training:
        text = row["context"] + row.get("probe", "") + row.get("question", "")
        for template in HELD_OUT_TEMPLATES:
            assert _needle_phrase(template) not in text, (row["id"], template.name)
        assert not held_docs & set(row.get("doc_ids", [])), row["id"]
        assert row.get("haystack", "novel") not in HELD_OUT_FAMILIES, row["id"]
    assert read["tasks/heldout"] == [r for r in read["tasks/test"] if r["heldout_sources"]]
    assert {r["task"] for r in read["tasks/heldout"]} >= {"passkey", "multi_key_needle", "code_completion"}
