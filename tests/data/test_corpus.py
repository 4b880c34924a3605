"""Training corpus: chunk lengths, probes, determinism, and the document-level split."""

import random

import pytest

from polykv_learn.data.corpus import build_corpus, document_split, split_by_document
from polykv_learn.data.sources import Document, QAPair, approx_tokens

VOCAB = [f"w{i}" for i in range(300)]


def prose(rng: random.Random, words: int) -> str:
    sentences, n = [], 0
    while n < words:
        k = rng.randint(6, 14)
        sentences.append(" ".join(rng.choice(VOCAB) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(sentences)


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(0)
    text_docs = [Document(f"book/ch{i:02d}", "book", f"ch {i}", prose(rng, 900)) for i in range(12)]
    qa_docs = []
    for i in range(30):
        passage = prose(rng, 120) + f" The secret of passage {i} is KEY{i}X."
        qa = (QAPair(f"What is the secret of passage {i}?", (f"KEY{i}X",)),)
        qa_docs.append(Document(f"qa/{i:03d}", "qa", f"p {i}", passage, qa=qa))
    return text_docs + qa_docs


def test_document_split_stable_and_proportional():
    ids = [f"doc{i}" for i in range(5000)]
    splits = [document_split(d, seed=3) for d in ids]
    assert splits == [document_split(d, seed=3) for d in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.03) and share["test"] == pytest.approx(0.1, abs=0.02)
    assert splits != [document_split(d, seed=4) for d in ids]  # the seed reshuffles
    assert document_split("x", {"a": 0.0, "b": 1.0}) == "b"
    with pytest.raises(ValueError, match="sum to 1"):
        document_split("x", {"train": 0.5, "test": 0.1})


def test_continuation_samples(docs):
    text_docs = [d for d in docs if d.source == "book"]
    samples = build_corpus(text_docs, approx_tokens, context_tokens=(200, 500), probe_tokens=20, seed=1)
    assert len(samples) >= 10
    stream = "\n\n".join(d.text for d in text_docs)
    last_end = -1
    for s in samples:
        assert set(s) >= {"id", "doc_id", "doc_ids", "source", "context", "probe", "kind"}
        assert s["kind"] == "continuation" and s["source"] == "book"
        assert 200 <= approx_tokens(s["context"]) <= 500 and s["context_tokens"] == approx_tokens(s["context"])
        assert 10 <= approx_tokens(s["probe"]) <= 40
        start = stream.find(s["context"] + s["probe"])
        assert start > last_end  # an exact, non-overlapping substring of the stream, in order
        last_end = start + len(s["context"])
        assert s["doc_id"] in s["doc_ids"]
        owner = next(d for d in text_docs if d.doc_id == s["doc_id"])
        assert s["probe"].split()[0] in owner.text
    assert samples == build_corpus(text_docs, approx_tokens, context_tokens=(200, 500), probe_tokens=20, seed=1)
    assert samples != build_corpus(text_docs, approx_tokens, context_tokens=(200, 500), probe_tokens=20, seed=2)


def test_qa_samples_pack_distractors(docs):
    qa_docs = {d.doc_id: d for d in docs if d.source == "qa"}
    samples = build_corpus(list(qa_docs.values()), approx_tokens, context_tokens=(400, 700), seed=0)
    assert len(samples) >= 25
    for s in samples:
        doc = qa_docs[s["doc_id"]]
        assert s["kind"] == "qa" and 400 <= approx_tokens(s["context"]) <= 700
        assert doc.text in s["context"] and len(s["doc_ids"]) > 1
        answer = doc.qa[0].answers[0]
        assert s["probe"] == f"\n\nQuestion: {doc.qa[0].question}\nAnswer: {answer}" and answer in s["context"]


def test_split_by_document_is_disjoint(docs):
    samples = build_corpus(docs, approx_tokens, context_tokens=(200, 600), seed=0)
    parts = split_by_document(samples, seed=0)
    assert set(parts) == {"train", "validation", "test"}
    seen: dict[str, str] = {}
    for split, chosen in parts.items():
        for s in chosen:
            for doc_id in s["doc_ids"]:
                assert seen.setdefault(doc_id, split) == split
                assert document_split(doc_id, seed=0) == split
    assert sum(map(len, parts.values())) <= len(samples)  # cross-split samples are dropped


def test_bad_ranges_rejected(docs):
    with pytest.raises(ValueError, match="context_tokens"):
        build_corpus(docs, approx_tokens, context_tokens=(500, 100))
