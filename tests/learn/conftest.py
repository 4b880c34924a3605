"""Fixtures of the fit tests: a tiny corpus and a prefill cache folder, one of each per test module."""

import pytest
from learn_helpers import write_corpus


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """``corpus/{train,validation}.jsonl`` of random facts (:func:`learn_helpers.write_corpus`)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prefill_cache(tmp_path_factory):
    """An empty folder for the prefill store, shared by the tests of one module."""
    return tmp_path_factory.mktemp("prefills")
