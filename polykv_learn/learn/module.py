"""``PolyKVLearner``: trains the router and the budget allocator through the simulator (design §4-6).

The base LLM stays frozen and outside the LightningModule's parameters (it is shared, never checkpointed). Each
training step takes one cached prefill, samples ``budgets_per_step`` average budgets, turns the router's policy
distribution and the allocator's real budgets into soft key biases, runs the simulator's probe pass for all of
them at once (one row per budget) and minimises the KL of the probe's next-token distributions to the full cache.
Softness (``tau``) and the routing temperature are annealed so that the trained model behaves like its hard plan.

Validation evaluates the **hard** (deployable) plan against every uniform single policy and PyramidKV (SnapKV
scores) at each of ``val_budgets`` on held-out documents.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from polykv_learn.features import DEFAULT_OVERLAP_POLICIES, FeatureScaler, feature_names
from polykv_learn.kvzip_global import check_allocation_prior
from polykv_learn.learn import checks, export, heads
from polykv_learn.learn.oracle import oracle_labels
from polykv_learn.learn.shared import max_positions, shared_model
from polykv_learn.learn.soft_plan import annealed, soft_key_bias
from polykv_learn.learn.store import StoredPrefill
from polykv_learn.plan import Plan
from polykv_learn.planner import BudgetAllocator, GBDTRouter, LearnedPlanner, MLPRouter
from polykv_learn.simulator import Simulator

DEFAULT_POLICIES = ("streaming", "snapkv", "h2o", "tova", "knorm", "expected_attention")
ROUTERS = ("mlp", "gbdt")


class PolyKVLearner(L.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m",
        policies: list[str] = list(DEFAULT_POLICIES),
        overlap_policies: list[str] = list(DEFAULT_OVERLAP_POLICIES),
        router: str = "mlp",
        hidden: int = 32,
        budget_min: int = 64,
        budget_max: int = 1024,
        budgets_per_step: int = 4,
        val_budgets: list[int] = [128, 256, 512, 1024],
        b_min: int = 4,
        tau_start: float = 0.25,
        tau_end: float = 0.01,
        temperature_start: float = 1.0,
        temperature_end: float = 0.05,
        anneal_steps: int = 1000,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        gbdt_docs: int = 8,
        gbdt_budgets: list[int] = [128, 256],
        answer_share: float | None = None,
        allocation_prior: str | None = None,
        train_allocator: bool = True,
        head_allocation: str = "none",
        export_dir: str | None = None,
        seed: int = 0,
    ):
        """
        Args:
            model_name: the frozen LLM (``smollm2-135m``, ``tiny-llama``/``tiny-qwen3``/``tiny-mistral`` or a local
                Hugging Face directory); the data module must prefill with the same one.
            policies: the routed policies (registry names; ``random`` is a control and cannot be routed).
            overlap_policies: policies whose pairwise keep-set overlaps are layer features.
            router: ``mlp`` (trained end to end) or ``gbdt`` (gradient-boosted trees on oracle labels; then only
                the allocator is trained end to end).
            hidden: hidden width of the router and allocator MLPs.
            budget_min: smallest average budget sampled in training (from the prefill grid).
            budget_max: largest average budget sampled in training (also capped below each context length).
            budgets_per_step: average budgets (rows of the probe batch) per training step.
            val_budgets: budgets of the validation table (must be in the data module's budget grid).
            b_min: smallest per-layer budget the allocator may give.
            tau_start: initial softness of the keep weights, as a fraction of the average budget.
            tau_end: final softness (fraction of the budget) reached after ``anneal_steps``.
            temperature_start: initial routing softmax temperature.
            temperature_end: final routing temperature reached after ``anneal_steps``.
            anneal_steps: steps of the geometric annealing of ``tau`` and the routing temperature.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            gbdt_docs: training documents used for the oracle labels of the ``gbdt`` router.
            gbdt_budgets: budgets at which oracle labels are computed.
            answer_share: share of a task sample's loss (training and validation KL) carried by its gold-answer
                tokens, the rest by the question and answer prefix before them (each part a mean over its tokens);
                what a task is scored on is the answer. None: every probe token weighs the same (also for corpus
                samples, which have no answer).
            allocation_prior: a layer signal computed across layers that the allocator follows from the start and
                learns a gain on (``kvzip_global``: KVzip's global top-k allocation, arXiv:2505.23416; needs
                ``kvzip`` among the data's policies); None: none (the allocator starts uniform).
            train_allocator: False: the allocator keeps its initial allocation (the prior's, or uniform without one)
                and only the router is trained (``router: mlp``), e.g. to route policies on KVzip's allocation.
            head_allocation: how each layer's budget is shared among its KV heads: ``none`` (every head keeps the
                layer budget), ``learned`` (a head allocator on per-KV-head signals, trained end to end with the
                router and allocator and exported in the artifact; the prefills store per-head signals), or
                ``adakv`` (AdaKV's split at deployment, arXiv:2407.11550; nothing more is trained, the artifact
                records it).
            export_dir: where the frozen artifact is written at the end of fit (None: not written).
            seed: seed of the budget sampling.
        """
        super().__init__()
        self.save_hyperparameters()
        check_learner_args(self.hparams)
        self.policies = list(policies)
        self.feature_names = feature_names(overlap_policies, allocation_prior)
        num_features = len(self.feature_names)
        prior = self.feature_names.index(allocation_prior) if allocation_prior else None
        self.router = MLPRouter(num_features, self.policies, hidden=hidden)
        self.allocator = BudgetAllocator(num_features, hidden=hidden, prior=prior)
        self.allocator.requires_grad_(train_allocator)
        heads.add_head_allocator(self, hidden)  # learned: the head allocator and its feature statistics
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.gbdt: GBDTRouter | None = None
        self.validation_table: dict[int, dict[str, float]] = {}
        # the global step the table was measured at: a step-triggered checkpoint can be saved before that step's
        # validation runs, so it may hold an earlier step's table; the artifact says which step it is
        self.validated_at_step: int | None = None
        self._val_sums: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._simulator: Simulator | None = None
        self.fit_started_at = time.time()  # wall time of a fit counts from here (prefills included)
        self.wall_time_before = 0.0  # wall time of the earlier parts of a resumed fit (from the checkpoint)
        self.resumed = 0  # how many times this training was resumed from a checkpoint
        self.selected_step: int | None = None  # the step of the exported weights, when selected on validation

    # --- wiring --------------------------------------------------------------------------------------------------
    @property
    def simulator(self) -> Simulator:
        if self._simulator is None:
            self._simulator = Simulator(shared_model(self.hparams.model_name))
        return self._simulator

    def setup(self, stage: str) -> None:
        self.simulator.model.to(self.device)  # the frozen LLM follows the learner (e.g. onto a GPU)
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None:
            return
        self.check_data(dm)
        # known only now when SmolLM2 was converted after the constructor ran
        checks.within_context("val_budgets", self.hparams.val_budgets, self.simulator.dims.max_positions,
                              self.hparams.model_name)  # fmt: skip
        if stage == "fit" and not self._scaler_fitted():
            mean, std = dm.feature_statistics()
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std.clamp_min(1e-6))
            if self.allocator.prior is not None:
                self.allocator.set_prior_scale(float(self.feature_std[self.allocator.prior]))
        if stage == "fit":
            heads.fit_head_scaler(self, dm)

    def check_data(self, datamodule: Any) -> None:
        """Check that ``datamodule`` (a :class:`~polykv_learn.learn.datamodule.PrefillDataModule`) prefills what this
        learner trains on: the same model, its policies and overlap policies, and grid budgets for ``val_budgets``,
        the training range ``[budget_min, budget_max]`` and (GBDT router) ``gbdt_budgets``. Cheap: run before any
        prefill (by ``polykv-learn fit`` right after the constructors, and by the data module's ``prepare_data``)."""
        hp = self.hparams
        if datamodule.model_name != hp.model_name:
            raise ValueError(
                f"data.model_name {datamodule.model_name!r} must be the learner's model_name {hp.model_name!r}"
            )
        missing = [p for p in self.policies if p not in datamodule.policies]
        if missing:
            raise ValueError(
                f"data.policies {datamodule.policies} must hold every routed policy (model.policies), missing {missing}"
            )
        if datamodule.allocation_prior != hp.allocation_prior:
            raise ValueError(
                f"data.allocation_prior {datamodule.allocation_prior!r} must equal model.allocation_prior "
                f"{hp.allocation_prior!r} (it is a feature column)"
            )
        if datamodule.head_allocation != hp.head_allocation:
            raise ValueError(
                f"data.head_allocation {datamodule.head_allocation!r} must equal model.head_allocation "
                f"{hp.head_allocation!r} (learned needs the per-head signals in the prefills)"
            )
        if list(datamodule.overlap_policies) != list(hp.overlap_policies):
            raise ValueError(
                f"data.overlap_policies {datamodule.overlap_policies} must equal model.overlap_policies "
                f"{list(hp.overlap_policies)} (they define the feature columns)"
            )
        grid = list(datamodule.budgets)
        checks.in_grid("val_budgets", hp.val_budgets, grid)
        if not [b for b in grid if hp.budget_min <= b <= hp.budget_max]:
            raise ValueError(
                f"budget_min..budget_max ({hp.budget_min}..{hp.budget_max}) holds no budget of the data module's grid "
                f"(data.budgets), so no step could train; allowed: a range holding one of {', '.join(map(str, grid))}"
            )
        if hp.router == "gbdt":
            checks.in_grid("gbdt_budgets", hp.gbdt_budgets, grid)

    def _scaler_fitted(self) -> bool:
        return bool((self.feature_mean != 0).any() or (self.feature_std != 1).any())

    def scale(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    def configure_optimizers(self):
        params = list(self.allocator.parameters()) if self.hparams.train_allocator else []
        if self.hparams.router == "mlp":
            params += list(self.router.parameters())
        if self.head_allocator is not None:
            params += list(self.head_allocator.parameters())
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_fit_start(self) -> None:
        if self.hparams.router == "gbdt" and self.gbdt is None:
            dm = self.trainer.datamodule
            docs = [dm.store.load(sid) for sid in dm.train_ids[: self.hparams.gbdt_docs]]
            x, y = oracle_labels(self.simulator, docs, self.policies, self.hparams.gbdt_budgets, self.scale)
            self.gbdt = GBDTRouter(max_iter=100, max_depth=3, random_state=0).fit(x, y)

    # --- the soft plan -------------------------------------------------------------------------------------------
    def progress(self) -> float:
        return self.global_step / self.hparams.anneal_steps

    def routing(self, features: Tensor, temperature: float) -> Tensor:
        """Policy distribution (R, L, Pol) of scaled features (R, L, F)."""
        if self.gbdt is not None:
            r, layers, f = features.shape
            proba = self.gbdt.predict_proba(features.reshape(-1, f).detach().cpu().numpy())
            probs = torch.zeros(r * layers, len(self.policies))
            for j, name in enumerate(self.gbdt.classes):
                probs[:, self.policies.index(name)] = torch.as_tensor(proba[:, j], dtype=torch.float32)
            hard = F.one_hot(probs.argmax(-1), len(self.policies)).float()
            return hard.reshape(r, layers, -1).to(features.device)
        return self.router.probs(features, temperature)

    def learned_planner(self) -> LearnedPlanner:
        """The deployable planner over this learner's live router, allocator and feature statistics: validation
        measures exactly the plans that ``PolyKV`` makes from the exported artifact."""
        scaler = FeatureScaler(mean=self.feature_mean, std=self.feature_std)
        return LearnedPlanner(self.policies, scaler, self.router, self.allocator, self.hparams.b_min, self.gbdt,
                              self.head_allocator, heads.head_scaler(self))  # fmt: skip

    def sample_budgets(self, prefill: StoredPrefill) -> list[int]:
        n = prefill.context_length
        lo, hi = self.hparams.budget_min, self.hparams.budget_max
        grid = [b for b in prefill.budgets.tolist() if lo <= b <= hi and b < n]
        if not grid:
            return []
        gen = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        picks = torch.randint(0, len(grid), (self.hparams.budgets_per_step,), generator=gen)
        return [grid[i] for i in picks.tolist()]  # the grid is log-spaced, so this is ~log-uniform

    # --- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: list[StoredPrefill], batch_idx: int) -> Tensor | None:
        losses = [loss for prefill in batch if (loss := self._soft_loss(prefill)) is not None]
        if not losses:
            return None
        loss = torch.stack(losses).mean()
        self.log("train/kl", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log("train/tau", annealed(self.hparams.tau_start, self.hparams.tau_end, self.progress()))
        return loss

    def _soft_loss(self, prefill: StoredPrefill) -> Tensor | None:
        budgets = self.sample_budgets(prefill)
        if not budgets:
            return None
        n = prefill.context_length
        feats = self.scale(torch.stack([prefill.features_at(b) for b in budgets]).to(self.device))  # (R, L, F)
        progress = self.progress()
        temperature = annealed(self.hparams.temperature_start, self.hparams.temperature_end, progress)
        tau = torch.tensor(budgets, dtype=torch.float32, device=self.device) * annealed(
            self.hparams.tau_start, self.hparams.tau_end, progress
        )  # (R,) in rank units
        probs = self.routing(feats, temperature)  # (R, L, Pol)
        layer_budgets = torch.stack(
            [self.allocator(feats[r], budgets[r], n, self.hparams.b_min) for r in range(len(budgets))]
        )  # (R, L)
        head_budgets = heads.soft_head_budgets(self, prefill, budgets, layer_budgets)  # (R, L, G) or None
        capture = prefill.to_capture(device=self.device)
        biases = []
        for layer in range(capture.num_layers):
            ranks = torch.stack([capture.ranks(layer, p) for p in self.policies])  # (Pol, G, n)
            b = layer_budgets[:, layer] if head_budgets is None else head_budgets[:, layer]  # (R,) or (R, G)
            biases.append(soft_key_bias(ranks, probs[:, layer], b, tau))  # (R, G, n)
        logits = self.simulator.probe_logits(capture, prefill.probe_ids.to(self.device), biases)  # (R, m, V)
        return self.probe_kl(prefill, logits).mean()

    def probe_weights(self, prefill: StoredPrefill) -> Tensor:
        """Weights (m,) summing to 1 of the probe positions in the KL (see ``answer_share``)."""
        m = prefill.probe_ids.numel()
        weights = torch.full((m,), 1.0 / m, device=self.device)
        share, start = self.hparams.answer_share, prefill.answer_start
        if share is None or start is None or not 0 < start < m:  # no answer, or nothing before it: uniform
            return weights
        weights[:start] = (1.0 - share) / start
        weights[start:] = share / (m - start)
        return weights

    def probe_kl(self, prefill: StoredPrefill, logits: Tensor) -> Tensor:
        """KL(full || compressed) of each row of ``logits`` (R, m, V), weighted over the probe positions: (R,)."""
        log_q = F.log_softmax(logits.float(), dim=-1)
        log_p = prefill.full_logprobs.to(self.device)  # (m, V)
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)  # (R, m)
        return per_position @ self.probe_weights(prefill)

    @torch.no_grad()
    def validation_step(self, batch: list[StoredPrefill], batch_idx: int) -> None:
        for prefill in batch:
            self._validate_one(prefill)

    def _validate_one(self, prefill: StoredPrefill) -> None:
        n = prefill.context_length
        num_layers = len(prefill.keys)
        capture = prefill.to_capture(device=self.device)
        probe_ids = prefill.probe_ids.to(self.device)
        for budget in self.hparams.val_budgets:
            if budget >= n:
                continue
            head_features = heads.head_features_for(self, prefill, budget)  # (L, G, Fh) or None
            methods = {"learned": self.learned_planner().plan(prefill.features_at(budget), budget, n, head_features)}
            if head_features is not None:  # the same layer plan, every head keeping b_l: what the head split gains
                methods["learned_even_heads"] = methods["learned"].with_head_budgets(None)
            methods.update({p: Plan.uniform(p, budget, num_layers) for p in self.policies})
            if "snapkv" in self.policies:  # PyramidKV as evaluate runs it (SnapKV's ranks are stored only if routed)
                methods["pyramid"] = Plan.pyramid("snapkv", budget, num_layers, context_length=n)
            logits = self.simulator.probe_logits(
                capture, probe_ids, self.simulator.hard_biases(capture, list(methods.values()))
            )
            kl = self.probe_kl(prefill, logits)  # (P,)
            for name, value in zip(methods, kl.tolist(), strict=True):
                sums = self._val_sums[(budget, name)]
                sums[0] += value
                sums[1] += 1

    def on_validation_epoch_end(self) -> None:
        sums = dict(self._val_sums)
        self._val_sums.clear()
        if self.trainer.world_size > 1:  # add up every process's documents
            keys = sorted(sums)
            local = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
            total = self.all_gather(local).reshape(-1, len(keys), 2).sum(0)
            sums = {k: total[i].tolist() for i, k in enumerate(keys)}
        table: dict[int, dict[str, float]] = defaultdict(dict)
        for (budget, name), (total, count) in sorted(sums.items()):
            if count:
                table[budget][name] = total / count
        learned_means = []
        for budget, row in table.items():
            best = min(row[p] for p in self.policies)
            row["best_uniform"] = best
            for name, value in row.items():
                self.log(f"val/kl@{budget}/{name}", value, rank_zero_only=True)
            learned_means.append(row["learned"])
        self.validation_table = {b: dict(r) for b, r in table.items()}
        self.validated_at_step = int(self.global_step)
        if learned_means:
            self.log("val/kl_learned", sum(learned_means) / len(learned_means), prog_bar=True, rank_zero_only=True)

    # --- checkpoints and export -----------------------------------------------------------------------------------
    def wall_time_s(self) -> float:
        """Wall time of this training in seconds: every part of a resumed fit, each from its learner's construction
        (prefills included) to now, up to its last checkpoint for the earlier parts."""
        return self.wall_time_before + (time.time() - self.fit_started_at)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["polykv_validation_table"] = self.validation_table
        checkpoint["polykv_validation_step"] = self.validated_at_step
        checkpoint["polykv_training"] = {"wall_time_s": self.wall_time_s(), "resumed": self.resumed}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming (``--ckpt_path``): the validation table, the wall time so far and one more resume."""
        self._restore_validation(checkpoint)
        done = checkpoint.get("polykv_training", {})
        self.wall_time_before = float(done.get("wall_time_s", 0.0))
        self.resumed = int(done.get("resumed", 0)) + 1

    def _restore_validation(self, checkpoint: dict) -> None:
        self.validation_table = {int(b): row for b, row in checkpoint.get("polykv_validation_table", {}).items()}
        step = checkpoint.get("polykv_validation_step")
        self.validated_at_step = None if step is None else int(step)

    def restore_selected(self, checkpoint: dict) -> None:
        """Take the weights and validation table of ``checkpoint`` (model selection); the wall time and the resume
        count stay those of this training."""
        self.load_state_dict(checkpoint["state_dict"])
        self._restore_validation(checkpoint)
        self.selected_step = int(checkpoint["global_step"])

    def configure_callbacks(self) -> list[L.Callback]:
        """With ``export_dir`` set, the fit ends by exporting the artifact (:class:`export.ExportRouter`)."""
        return [export.ExportRouter(self.hparams.export_dir)] if self.hparams.export_dir else []

    def best_checkpoint(self) -> str | None:
        """The best checkpoint by ``val/kl_learned`` of a ModelCheckpoint that monitors it, if any."""
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) == "val/kl_learned" and callback.best_model_path:
                return callback.best_model_path
        return None

    # --- what the artifact holds (read by learn/export.py) ---------------------------------------------------------
    def planner_state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The artifact's planner entries (policies, scaler, router, allocator, b_min) and tensors."""
        return self.learned_planner().state(self.hparams.router)


def check_learner_args(hp: Any) -> None:
    """The one-line checks of every :class:`PolyKVLearner` argument (``hp``: its hyperparameters); the model's
    configuration is read (not its weights) to check ``val_budgets`` against its context."""
    checks.policy_list("policies", hp.policies, routable=True, allow_empty=False)
    checks.policy_list("overlap_policies", hp.overlap_policies)
    check_allocation_prior(hp.allocation_prior)
    checks.one_of("router", hp.router, ROUTERS)
    checks.one_of("head_allocation", hp.head_allocation, heads.HEAD_ALLOCATIONS)
    if not isinstance(hp.train_allocator, bool):
        raise ValueError(f"train_allocator must be true or false, got {hp.train_allocator!r}")
    if not hp.train_allocator and hp.router != "mlp":
        raise ValueError(
            f"train_allocator: false leaves nothing to train with router {hp.router!r} (its trees are fit on oracle "
            "labels, not trained end to end); allowed: router mlp, or train_allocator true"
        )
    checks.int_at_least("hidden", hp.hidden, 1)
    checks.int_at_least("b_min", hp.b_min, 1)
    checks.int_at_least("budget_min", hp.budget_min, 1)
    if hp.b_min > hp.budget_min:
        raise ValueError(f"b_min must be <= budget_min ({hp.budget_min}), got {hp.b_min}")
    checks.int_at_least("budget_max", hp.budget_max, hp.budget_min)
    checks.int_at_least("budgets_per_step", hp.budgets_per_step, 1)
    checks.budget_list("val_budgets", hp.val_budgets)
    for name in ("tau_start", "tau_end", "temperature_start", "temperature_end", "lr"):
        checks.positive(name, hp[name])
    checks.int_at_least("anneal_steps", hp.anneal_steps, 1)
    checks.non_negative("weight_decay", hp.weight_decay)
    checks.int_at_least("gbdt_docs", hp.gbdt_docs, 1)
    checks.budget_list("gbdt_budgets", hp.gbdt_budgets)
    if hp.answer_share is not None and not (checks.is_number(hp.answer_share) and 0.0 <= hp.answer_share <= 1.0):
        raise ValueError(f"answer_share must be in [0, 1] (or None), got {hp.answer_share}")
    if hp.export_dir is not None and (
        not isinstance(hp.export_dir, (str, os.PathLike)) or Path(hp.export_dir).is_file()
    ):
        raise ValueError(f"export_dir must be a folder path (or null), got {hp.export_dir!r}")
    if not checks.is_int(hp.seed):
        raise ValueError(f"seed must be an integer, got {hp.seed!r}")
    checks.within_context("val_budgets", hp.val_budgets, max_positions(hp.model_name), hp.model_name)
