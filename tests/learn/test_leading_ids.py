"""A tokenizer's leading special ids (Gemma3's BOS) start every training context once, and name the prefill, so a
prefill tokenised without them is never read for one with them; a tokenizer that adds none (SmolLM2) changes
nothing."""

from types import SimpleNamespace

import pytest
from learn_helpers import write_corpus

from polykv_learn.learn import datamodule as datamodule_module
from polykv_learn.learn.datamodule import PrefillDataModule
from polykv_learn.learn.shared import shared_tokenizer
from polykv_learn.text import leading_special_ids

BOS, EOS = 1, 2


class Marked:
    """SmolLM2's tokenizer, adding ``lead`` before (and ``trail`` after) a text unless ``add_special_tokens=False``."""

    def __init__(self, lead: list[int], trail: list[int] = ()):
        self.inner, self.lead, self.trail = shared_tokenizer("tiny-llama"), lead, list(trail)

    def __call__(self, text: str, add_special_tokens: bool = True, **kw):
        ids = self.inner(text, add_special_tokens=False, **kw).input_ids
        return SimpleNamespace(input_ids=[*self.lead, *ids, *self.trail] if add_special_tokens else ids)


@pytest.mark.parametrize(("lead", "trail"), [([], []), ([BOS], []), ([BOS], [EOS]), ([BOS, 7], [])])
def test_leading_special_ids_are_what_the_tokenizer_puts_first(lead, trail):
    assert leading_special_ids(Marked(lead, trail)) == lead


def test_smollm2s_tokenizer_adds_none():
    assert leading_special_ids(shared_tokenizer("tiny-llama")) == []


def test_a_tokenizer_that_drops_the_text_is_refused():
    class Empty(Marked):
        def __call__(self, text, add_special_tokens=True, **kw):
            return SimpleNamespace(input_ids=[BOS] if add_special_tokens else [5])

    message = r"^cannot find the plain tokens \[5\] of 'x' in the tokenizer's output \[1\]$"
    with pytest.raises(ValueError, match=message):
        leading_special_ids(Empty([]))


def test_training_contexts_start_with_the_leading_ids_once_and_name_them(tmp_path, monkeypatch):
    root = write_corpus(tmp_path)
    dm = PrefillDataModule(
        data_dir=str(root),
        model_name="tiny-llama",
        policies=["snapkv"],
        budgets=[16],
        max_context_tokens=200,
        min_context_tokens=40,
        probe_tokens=8,
    )
    plain = dm._tokenized("train")
    monkeypatch.setattr(datamodule_module, "shared_tokenizer", lambda name: Marked([BOS]))
    marked = dm._tokenized("train")
    assert len(marked) == len(plain) == 8
    for (sid, ctx, probe, _), (plain_sid, plain_ctx, plain_probe, _) in zip(marked, plain, strict=True):
        assert ctx[0].item() == BOS and ctx[1:].tolist() == plain_ctx[: 200 - 1].tolist()  # the cap counts it
        assert probe.tolist() == plain_probe.tolist()  # the probe continues the context: no BOS of its own
        row, n, m = plain_sid.split("|")
        assert sid == f"{row}|{len(ctx)}|{m}|s{BOS}" and sid != plain_sid
