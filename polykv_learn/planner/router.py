"""Routers: map each layer's signals to an eviction policy (design §6).

- :class:`MLPRouter`: ``pi_l = softmax(MLP(f_l) / temperature)`` over the routed policies, weights shared
  across layers (depth is a feature); trained end to end through the simulator (PolyKV, arXiv:2606.15157).
- :class:`GBDTRouter`: scikit-learn's ``HistGradientBoostingClassifier`` (gradient-boosted trees, Ke et al.
  "LightGBM", NeurIPS 2017) fitted on oracle labels (per layer, the policy whose single-layer swap gives the
  lowest simulated loss). It is exported to plain arrays and JSON (never pickle) and predicts by walking the
  exported nodes in numpy, so a loaded router needs no scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from polykv_learn.planner.allocator import mlp
from polykv_learn.policies import POLICIES, check_policy_name

__all__ = ["GBDTRouter", "MLPRouter"]

GBDT_FORMAT = "polykv-gbdt-v1"
#: node fields exported per tree, with the dtype they are stored in
NODE_FIELDS: dict[str, type] = {
    "feature_idx": np.int64,
    "num_threshold": np.float64,
    "missing_go_to_left": np.uint8,
    "left": np.int64,
    "right": np.int64,
    "is_leaf": np.uint8,
    "value": np.float64,
}


def _check_routable(policies: Sequence[str]) -> tuple[str, ...]:
    if isinstance(policies, str):
        raise ValueError(f"policies must be a sequence of policy names, got {policies!r}")
    names = tuple(check_policy_name(p) for p in policies)
    if len(names) == 0:
        raise ValueError("a router needs at least one policy to route to")
    if len(set(names)) != len(names):
        raise ValueError(f"routed policies have duplicates: {list(names)}; give each policy once")
    for name in names:
        if not POLICIES[name].routable:
            routable = [p for p, cls in POLICIES.items() if cls.routable]
            raise ValueError(f"policy {name!r} is a control, not routable; routable policies: {', '.join(routable)}")
    return names


class MLPRouter(nn.Module):
    """Features ``(..., F)`` -> logits ``(..., P)`` over ``policies`` (an MLP shared across layers)."""

    def __init__(
        self,
        num_features: int,
        policies: Sequence[str],
        hidden: int = 32,
        num_hidden_layers: int = 2,
        init_bias: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.policies: tuple[str, ...] = _check_routable(policies)
        self.num_features = num_features
        self.hidden = hidden
        self.num_hidden_layers = num_hidden_layers
        self.net = mlp(num_features, hidden, num_hidden_layers, len(self.policies))
        if init_bias is not None:
            bias = torch.as_tensor(list(init_bias), dtype=torch.float32)
            if bias.shape != (len(self.policies),):
                raise ValueError(
                    f"init_bias needs one value per policy ({len(self.policies)}: {list(self.policies)}), "
                    f"got {len(bias)}"
                )
            with torch.no_grad():
                self.net[-1].bias.copy_(bias)

    @property
    def num_policies(self) -> int:
        return len(self.policies)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(..., F) -> (..., P)``."""
        if features.shape[-1] != self.num_features:
            raise ValueError(f"router expects {self.num_features} features per layer, got {features.shape[-1]}")
        return self.net(features)

    def probs(self, features: Tensor, temperature: float = 1.0) -> Tensor:
        """Routing distribution ``pi = softmax(logits / temperature)``: ``(..., P)``."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return torch.softmax(self(features) / temperature, dim=-1)

    @torch.no_grad()
    def hard_choice(self, features: Tensor) -> list[str]:
        """The arg-max policy of each layer of ``features`` ``(L, F)``."""
        if features.ndim != 2:
            raise ValueError(f"hard_choice expects features of shape (L, F), got {tuple(features.shape)}")
        return [self.policies[i] for i in self(features).argmax(dim=-1).tolist()]


class GBDTRouter:
    """Gradient-boosted trees on oracle labels, with a portable (pickle-free) export.

    ``classes`` are the policies seen in the labels, sorted (scikit-learn's order); ``predict_proba`` columns
    follow it. With a single class in the labels no trees are fitted and every prediction is that class.
    """

    def __init__(self, **params: Any) -> None:
        #: keyword arguments for ``HistGradientBoostingClassifier``
        self.params: dict[str, Any] = dict(params)
        self.estimator = None  # the fitted scikit-learn model (None after from_state)
        self.classes: list[str] = []
        self.loss: str | None = None  # "binary", "multiclass" or "constant"
        self.num_features: int | None = None
        self._baseline = np.zeros(0)  # (K,) raw baseline prediction
        self._nodes: dict[str, np.ndarray] = {}  # field -> (total nodes,), trees concatenated
        self._tree_offsets = np.zeros(1, dtype=np.int64)  # (num_trees + 1,)
        self._trees_per_iteration = 0

    @property
    def is_fitted(self) -> bool:
        return self.loss is not None

    # ------------------------------------------------------------------ training
    def fit(self, X: np.ndarray | Tensor, labels: Sequence[str], sample_weight: np.ndarray | None = None) -> GBDTRouter:
        """Fit on features ``X`` (N, F) and policy-name labels (N,); returns ``self``."""
        x = _as_matrix(X)
        labels = [check_policy_name(str(lab)) for lab in labels]
        if len(labels) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} feature rows but {len(labels)} labels")
        if x.shape[0] == 0:
            raise ValueError("cannot fit a router on zero examples")
        self.num_features = x.shape[1]
        classes = sorted(set(labels))
        if len(classes) == 1:  # nothing to learn: a constant router
            self.estimator = None
            self._set_constant(classes[0])
            return self

        from sklearn.ensemble import HistGradientBoostingClassifier

        est = HistGradientBoostingClassifier(**self.params)
        est.fit(x, np.asarray(labels), sample_weight=sample_weight)
        self.estimator = est
        self._export(est)
        return self

    def _set_constant(self, label: str) -> None:
        self.classes = [label]
        self.loss = "constant"
        self._baseline = np.zeros(1)
        self._nodes = {field: np.zeros(0, dtype=dtype) for field, dtype in NODE_FIELDS.items()}
        self._tree_offsets = np.zeros(1, dtype=np.int64)
        self._trees_per_iteration = 0

    def _export(self, est) -> None:
        """Copy the fitted trees' node arrays (iteration-major, class-minor) into plain arrays."""
        if getattr(est, "is_categorical_", None) is not None and np.any(est.is_categorical_):
            raise ValueError("categorical features are not supported by the portable export")
        self.classes = [str(c) for c in est.classes_]
        self.loss = "binary" if len(self.classes) == 2 else "multiclass"
        self._trees_per_iteration = int(est.n_trees_per_iteration_)
        self._baseline = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)  # (K,)
        fields: dict[str, list[np.ndarray]] = {field: [] for field in NODE_FIELDS}
        offsets = [0]
        for predictors in est._predictors:  # one list of K trees per boosting iteration
            for predictor in predictors:
                nodes = predictor.nodes
                if np.any(nodes["is_categorical"]):
                    raise ValueError("a tree splits on a categorical feature; the portable export cannot hold it")
                for field, dtype in NODE_FIELDS.items():
                    fields[field].append(nodes[field].astype(dtype))
                offsets.append(offsets[-1] + len(nodes))
        self._nodes = {
            field: np.concatenate(parts) if parts else np.zeros(0, dtype=NODE_FIELDS[field])
            for field, parts in fields.items()
        }
        self._tree_offsets = np.asarray(offsets, dtype=np.int64)

    # ------------------------------------------------------------------ prediction (numpy, no sklearn)
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("GBDTRouter is not fitted; call fit(X, labels) or load it with from_state")

    def raw_predict(self, X: np.ndarray | Tensor) -> np.ndarray:
        """Raw scores ``(N, K)``: baseline plus the sum of the trees' leaf values (K = 1 for binary)."""
        self._check_fitted()
        x = _as_matrix(X)
        if x.shape[1] != self.num_features:
            raise ValueError(f"router was fitted on {self.num_features} features, got {x.shape[1]}")
        k = max(self._trees_per_iteration, 1)
        raw = np.tile(self._baseline[:k], (x.shape[0], 1))  # (N, K)
        num_trees = len(self._tree_offsets) - 1
        for tree in range(num_trees):
            raw[:, tree % k] += self._predict_tree(x, int(self._tree_offsets[tree]))
        return raw

    def _predict_tree(self, x: np.ndarray, offset: int) -> np.ndarray:
        """Leaf value ``(N,)`` of one tree, walking every row down from the root in lockstep."""
        nodes = self._nodes
        rows = np.arange(x.shape[0])
        node = np.full(x.shape[0], offset, dtype=np.int64)  # global node index per row
        active = ~nodes["is_leaf"][node].astype(bool)
        while active.any():
            idx = node[active]
            data = x[rows[active], nodes["feature_idx"][idx]]  # (A,)
            go_left = np.where(
                np.isnan(data),
                nodes["missing_go_to_left"][idx].astype(bool),
                data <= nodes["num_threshold"][idx],
            )
            node[active] = offset + np.where(go_left, nodes["left"][idx], nodes["right"][idx])
            active = ~nodes["is_leaf"][node].astype(bool)
        return nodes["value"][node]

    def predict_proba(self, X: np.ndarray | Tensor) -> np.ndarray:
        """Class probabilities ``(N, len(classes))``, columns in :attr:`classes` order."""
        self._check_fitted()
        if self.loss == "constant":
            x = _as_matrix(X)
            if x.shape[1] != self.num_features:
                raise ValueError(f"router was fitted on {self.num_features} features, got {x.shape[1]}")
            return np.ones((x.shape[0], 1))
        raw = self.raw_predict(X)  # (N, K)
        if self.loss == "binary":
            p1 = 1.0 / (1.0 + np.exp(-raw[:, 0]))  # (N,)
            return np.stack([1.0 - p1, p1], axis=1)
        raw = raw - raw.max(axis=1, keepdims=True)
        e = np.exp(raw)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray | Tensor) -> list[str]:
        """The most probable policy of each row."""
        proba = self.predict_proba(X)
        return [self.classes[i] for i in proba.argmax(axis=1)]

    # ------------------------------------------------------------------ portable export
    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: numeric arrays (safetensors-ready) and a JSON-able dict; no pickle anywhere."""
        self._check_fitted()
        arrays = {f"nodes.{field}": np.ascontiguousarray(arr) for field, arr in self._nodes.items()}
        arrays["tree_offsets"] = np.ascontiguousarray(self._tree_offsets)
        arrays["baseline"] = np.ascontiguousarray(self._baseline)
        meta = {
            "format": GBDT_FORMAT,
            "classes": list(self.classes),
            "loss": self.loss,
            "num_features": self.num_features,
            "trees_per_iteration": self._trees_per_iteration,
            "params": _json_safe(self.params),
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> GBDTRouter:
        """Rebuild a router (predicting without scikit-learn) from :meth:`to_state` output."""
        if meta.get("format") != GBDT_FORMAT:
            raise ValueError(f"unknown GBDT router format {meta.get('format')!r}; expected {GBDT_FORMAT!r}")
        if meta.get("loss") not in ("binary", "multiclass", "constant"):
            raise ValueError(f"unknown loss {meta.get('loss')!r}; expected 'binary', 'multiclass' or 'constant'")
        needed = [f"nodes.{field}" for field in NODE_FIELDS] + ["tree_offsets", "baseline"]
        missing = [key for key in needed if key not in arrays]
        if missing:
            raise ValueError(f"GBDT router state lacks arrays {missing}")
        router = cls(**dict(meta.get("params", {})))
        router.classes = [check_policy_name(str(c)) for c in meta["classes"]]
        router.loss = meta["loss"]
        router.num_features = int(meta["num_features"])
        router._trees_per_iteration = int(meta["trees_per_iteration"])
        router._nodes = {f: np.asarray(arrays[f"nodes.{f}"]).astype(dt) for f, dt in NODE_FIELDS.items()}
        router._tree_offsets = np.asarray(arrays["tree_offsets"]).astype(np.int64)
        router._baseline = np.asarray(arrays["baseline"]).astype(np.float64).reshape(-1)
        expected_classes = {"binary": 2, "constant": 1}.get(router.loss, len(router.classes))
        if len(router.classes) != expected_classes or (router.loss == "multiclass" and len(router.classes) < 3):
            raise ValueError(f"loss {router.loss!r} does not fit {len(router.classes)} classes")
        return router


def _as_matrix(X: np.ndarray | Tensor) -> np.ndarray:
    x = X.detach().cpu().double().numpy() if isinstance(X, Tensor) else np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, F), got {x.shape}")
    return x


def _json_safe(params: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the parameters that JSON can hold (numbers, strings, booleans, None, and lists of them)."""
    ok = (int, float, str, bool, type(None))
    return {
        k: v
        for k, v in params.items()
        if isinstance(v, ok) or (isinstance(v, list | tuple) and all(isinstance(x, ok) for x in v))
    }
