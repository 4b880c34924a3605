"""Routers (design §6): MLP router shapes and gradients; GBDT router's pickle-free export equals sklearn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from polykv_learn.planner.router import GBDTRouter, MLPRouter

POLICIES = ["snapkv", "streaming", "knorm", "tova"]


# ---------------------------------------------------------------- MLP router
def test_mlp_router_shapes_and_probs():
    router = MLPRouter(9, POLICIES)
    f = torch.randn(16, 9, generator=torch.Generator().manual_seed(0))  # (L, F)
    logits = router(f)
    assert logits.shape == (16, 4)
    for temperature in (0.1, 1.0, 5.0):
        p = router.probs(f, temperature)
        assert p.shape == (16, 4) and (p >= 0).all()
        torch.testing.assert_close(p.sum(dim=-1), torch.ones(16))
    choice = router.hard_choice(f)
    assert len(choice) == 16 and set(choice) <= set(POLICIES)
    assert router(torch.randn(2, 16, 9)).shape == (2, 16, 4)  # extra leading dims are fine


def test_mlp_router_gradient_flows():
    router = MLPRouter(9, POLICIES, hidden=8, num_hidden_layers=1)
    f = torch.randn(10, 9, requires_grad=True)
    p = router.probs(f, temperature=0.7)
    loss = (p * torch.arange(4.0)).sum()
    grads = torch.autograd.grad(loss, [f, *router.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_mlp_router_init_bias():
    router = MLPRouter(5, POLICIES, init_bias=[0.0, 0.0, 10.0, 0.0])
    assert router.hard_choice(torch.randn(8, 5) * 0.01) == ["knorm"] * 8
    with pytest.raises(ValueError, match=r"init_bias needs one value per policy \(4"):
        MLPRouter(5, POLICIES, init_bias=[1.0])


def test_mlp_router_errors():
    with pytest.raises(ValueError, match="unknown policy 'nope'; known policies"):
        MLPRouter(5, ["snapkv", "nope"])
    with pytest.raises(ValueError, match="'random' is a control, not routable; routable policies: .*snapkv"):
        MLPRouter(5, ["snapkv", "random"])
    with pytest.raises(ValueError, match="duplicates"):
        MLPRouter(5, ["snapkv", "snapkv"])
    router = MLPRouter(5, POLICIES)
    with pytest.raises(ValueError, match="expects 5 features per layer, got 6"):
        router(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="temperature must be positive"):
        router.probs(torch.zeros(3, 5), 0.0)


# ---------------------------------------------------------------- GBDT router
def labelled(num_classes: int, n: int = 400, num_features: int = 6, seed: int = 0, nan_rate: float = 0.05):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, num_features))
    score = x[:, 0] + 0.5 * x[:, 1] ** 2 - x[:, 2] + 0.3 * rng.normal(size=n)
    bins = np.quantile(score, np.linspace(0, 1, num_classes + 1)[1:-1])
    labels = [POLICIES[i] for i in np.digitize(score, bins)]
    x[rng.random(x.shape) < nan_rate] = np.nan  # missing values take the learned default branch
    return x, labels


def round_trip(router: GBDTRouter) -> GBDTRouter:
    arrays, meta = router.to_state()
    meta = json.loads(json.dumps(meta))  # really JSON
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    return GBDTRouter.from_state({k: a.copy() for k, a in arrays.items()}, meta)


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_gbdt_export_matches_sklearn(num_classes):
    x, labels = labelled(num_classes, seed=num_classes)
    router = GBDTRouter(max_iter=30, max_leaf_nodes=15, random_state=0).fit(x, labels)
    loaded = round_trip(router)
    assert loaded.estimator is None and loaded.classes == sorted(set(labels))
    x_test, _ = labelled(num_classes, n=500, seed=100 + num_classes, nan_rate=0.1)
    expected = router.estimator.predict_proba(x_test)
    np.testing.assert_allclose(loaded.predict_proba(x_test), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(router.predict_proba(x_test), expected, atol=1e-6, rtol=0)
    assert loaded.predict(x_test) == [str(c) for c in router.estimator.predict(x_test)]
    assert loaded.predict_proba(torch.as_tensor(x_test)).shape == (500, num_classes)


def test_gbdt_state_through_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    x, labels = labelled(3, seed=7)
    router = GBDTRouter(max_iter=10).fit(x, labels)
    arrays, meta = router.to_state()
    save_file(arrays, str(tmp_path / "router.safetensors"))
    (tmp_path / "router.json").write_text(json.dumps(meta))
    loaded = GBDTRouter.from_state(
        load_file(str(tmp_path / "router.safetensors")), json.loads((tmp_path / "router.json").read_text())
    )
    np.testing.assert_allclose(loaded.predict_proba(x), router.estimator.predict_proba(x), atol=1e-6, rtol=0)


def test_gbdt_single_class_is_constant():
    x, _ = labelled(2, n=50)
    router = GBDTRouter().fit(x, ["tova"] * 50)
    assert router.loss == "constant" and router.classes == ["tova"] and router.estimator is None
    loaded = round_trip(router)
    assert loaded.predict(x[:7]) == ["tova"] * 7
    np.testing.assert_array_equal(loaded.predict_proba(x[:7]), np.ones((7, 1)))


def test_gbdt_errors():
    x, labels = labelled(2, n=60)
    with pytest.raises(ValueError, match="not fitted"):
        GBDTRouter().predict(x)
    with pytest.raises(ValueError, match="60 feature rows but 59 labels"):
        GBDTRouter().fit(x, labels[:-1])
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        GBDTRouter().fit(x[:2], ["snapkv", "nope"])
    router = GBDTRouter(max_iter=5).fit(x, labels)
    with pytest.raises(ValueError, match="fitted on 6 features, got 5"):
        router.predict(x[:, :5])
    arrays, meta = router.to_state()
    with pytest.raises(ValueError, match="unknown GBDT router format"):
        GBDTRouter.from_state(arrays, {**meta, "format": "pickle"})
    with pytest.raises(ValueError, match="lacks arrays"):
        GBDTRouter.from_state({k: v for k, v in arrays.items() if k != "baseline"}, meta)
