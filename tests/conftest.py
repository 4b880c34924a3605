"""Shared fixtures. Triton runs in interpreter mode on machines without CUDA (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from model_helpers import TINY_MODELS  # noqa: E402

from polykv_learn.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """name -> model (sdpa attention), built once per session."""
    return {name: load_model(name, with_tokenizer=False)[0] for name in TINY_MODELS}


@pytest.fixture(scope="session")
def eager_models():
    """name -> tiny model with eager attention, built once per session."""
    return {name: load_model(name, attn_implementation="eager", with_tokenizer=False)[0] for name in TINY_MODELS}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine every multi-threaded op of a
    generate loop can wait a scheduler slice for its second thread: modules that generate a lot use one thread
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything loads a model."""

    def fail(*args, **kwargs):
        pytest.fail("the model was loaded")

    monkeypatch.setattr("polykv_learn.models.load_model", fail)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (converted once to safetensors)."""
    return load_model("smollm2-135m")
