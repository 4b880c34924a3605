"""Learning the router and allocator: soft plans, the prefill store, training on tiny-llama, the fit CLI."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from learn_helpers import fit_cmd

from polykv_learn.learn.soft_plan import soft_keep_weights, soft_key_bias

REPO = Path(__file__).resolve().parents[2]


# --- soft plans ---------------------------------------------------------------------------------------------------
def test_soft_keep_weights_sum_to_budget_and_become_hard():
    ranks = torch.randperm(200)[None, None, :].expand(1, 2, 200)  # (Pol=1, G=2, n)
    budgets = torch.tensor([10.0, 57.0])
    soft = soft_keep_weights(ranks, budgets, tau=1.0)  # (R, 1, G, n)
    assert torch.allclose(soft.sum(-1), budgets[:, None, None], atol=1e-3)  # tails cancel away from rank 0
    hard = soft_keep_weights(ranks, budgets, tau=1e-4)
    assert torch.equal(hard > 0.5, ranks[None] < budgets[:, None, None, None])


def test_soft_key_bias_mixture_and_gradients():
    ranks = torch.stack([torch.randperm(50), torch.arange(50)])[:, None, :]  # (Pol=2, G=1, n)
    probs = torch.tensor([[1.0, 0.0], [0.3, 0.7]], requires_grad=True)
    budgets = torch.tensor([20.0, 20.0], requires_grad=True)
    bias = soft_key_bias(ranks, probs, budgets, tau=0.01)  # (R, G, n)
    assert torch.equal(bias[0, 0] > -1, ranks[0, 0] < 20)  # one-hot routing, tiny tau: the hard keep mask
    bias.sum().backward()
    assert probs.grad.abs().sum() > 0 and budgets.grad.abs().sum() > 0


def _datamodule(corpus, cache_dir, **kw):
    from polykv_learn.learn.datamodule import PrefillDataModule

    return PrefillDataModule(
        data_dir=str(corpus),
        cache_dir=str(cache_dir),
        model_name="tiny-llama",
        policies=["streaming", "snapkv", "tova", "knorm"],
        budgets=[16, 32, 64],
        max_context_tokens=400,
        min_context_tokens=100,
        probe_tokens=24,
        **kw,
    )


def test_training_lowers_loss_and_beats_the_starting_plan(tiny_corpus, prefill_cache):
    import lightning as L

    from polykv_learn.learn.module import PolyKVLearner
    from polykv_learn.plan import Plan

    L.seed_everything(0)
    dm = _datamodule(tiny_corpus, prefill_cache)
    learner = PolyKVLearner(
        model_name="tiny-llama",
        policies=["streaming", "snapkv", "tova", "knorm"],
        budget_min=16,
        budget_max=64,
        val_budgets=[32],
        b_min=2,
        anneal_steps=60,
        lr=0.02,
        budgets_per_step=3,
        # fixed softness and temperature, so that losses at the start and the end are comparable
        tau_start=0.05,
        tau_end=0.05,
        temperature_start=0.5,
        temperature_end=0.5,
    )
    dm.prepare_data()
    dm.setup("fit")
    docs = [dm.store.load(i) for i in dm.train_ids]
    mean, std = dm.feature_statistics()
    learner.feature_mean.copy_(mean)
    learner.feature_std.copy_(std.clamp_min(1e-6))

    def plan_kl(prefill, plan):
        from polykv_learn.learn.oracle import plan_kls

        return float(plan_kls(learner.simulator, prefill, [plan])[0])

    def total_kl(make_plan):
        return sum(plan_kl(d, make_plan(d)) for d in docs) / len(docs)

    start = {d.sample_id: learner.learned_planner().plan(d.features_at(32), 32, d.context_length) for d in docs}
    start_kl = total_kl(lambda d: start[d.sample_id])

    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if outputs is not None:
                losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(learner, datamodule=dm)
    learned_kl = total_kl(lambda d: learner.learned_planner().plan(d.features_at(32), 32, d.context_length))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    assert learned_kl < start_kl, (learned_kl, start_kl)
    best_uniform = min(total_kl(lambda d, p=p: Plan.uniform(p, 32, 4)) for p in learner.policies)
    assert learned_kl < best_uniform, (learned_kl, best_uniform)
    for d in docs:  # hard plans keep the exact total budget
        assert learner.learned_planner().plan(d.features_at(32), 32, d.context_length).total_budget == 32 * 4
    # what the artifact stores rebuilds the planner validation used: the same plans after training
    from polykv_learn.planner import LearnedPlanner

    config, tensors = learner.planner_state()
    rebuilt = LearnedPlanner.from_state({**config, "feature_names": learner.feature_names}, tensors)
    for d in docs:
        for budget in (16, 32, 48):
            feats = d.features_at(32)
            assert rebuilt.plan(feats, budget, d.context_length) == learner.learned_planner().plan(
                feats, budget, d.context_length
            )


def test_prefill_store_never_leaves_a_half_written_file(tiny_corpus, tmp_path, monkeypatch):
    import polykv_learn.learn.store as store_module

    dm = _datamodule(tiny_corpus, tmp_path / "cache")
    sample_id, context, probe, _ = dm._tokenized("validation")[0]

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.store.build(sample_id, context, probe)
    assert not dm.store.path_for(sample_id).exists()
    assert not list((dm.store.root).glob(".*tmp-*")), "the temporary file must be removed"
    monkeypatch.undo()
    # a truncated file at the final name (e.g. copied by hand) is detected and rebuilt
    dm.store.root.mkdir(parents=True, exist_ok=True)
    dm.store.path_for(sample_id).write_bytes(b"garbage")
    assert not dm.store.has(sample_id)
    dm.store.build(sample_id, context, probe)
    loaded = dm.store.load(sample_id)
    assert loaded.context_length == context.shape[0] and loaded.features.shape[0] == 3


def test_answer_share_weights_the_gold_answer_in_the_kl(tiny_corpus, tmp_path):
    from polykv_learn.learn.module import PolyKVLearner

    dm = _datamodule(tiny_corpus, tmp_path / "cache")
    sample_id, context, probe, _ = dm._tokenized("validation")[0]
    probe = probe[:5]
    dm.store.build(sample_id + "|a2", context, probe, answer_start=2)  # the answer: probe tokens 2, 3, 4
    task = dm.store.load(sample_id + "|a2")
    assert task.answer_start == 2 and torch.equal(task.probe_ids, probe)
    with pytest.raises(ValueError, match=r"answer_start must be in \[0, 5\] \(the probe length\), got 6"):
        dm.store.build(sample_id + "|a6", context, probe, answer_start=6)
    dm.store.build(sample_id + "|plain", context, probe)
    plain = dm.store.load(sample_id + "|plain")
    assert plain.answer_start is None

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, task.full_logprobs.shape[-1], generator=gen)  # (R, m, V)
    log_p = task.full_logprobs
    per_position = (log_p.exp() * (log_p - torch.log_softmax(logits, -1))).sum(-1)  # (R, m)
    weighted = PolyKVLearner(model_name="tiny-llama", policies=dm.policies, answer_share=0.75)
    expected = 0.25 * per_position[:, :2].mean(-1) + 0.75 * per_position[:, 2:].mean(-1)
    torch.testing.assert_close(weighted.probe_kl(task, logits), expected)
    torch.testing.assert_close(weighted.probe_kl(plain, logits), per_position.mean(-1))  # no answer: uniform
    uniform = PolyKVLearner(model_name="tiny-llama", policies=dm.policies)
    torch.testing.assert_close(uniform.probe_kl(task, logits), per_position.mean(-1))
    with pytest.raises(ValueError, match=r"answer_share must be in \[0, 1\] \(or None\), got 1.5"):
        PolyKVLearner(model_name="tiny-llama", policies=dm.policies, answer_share=1.5)


def test_bad_config_fails_fast(tmp_path):
    from polykv_learn.learn.datamodule import PrefillDataModule
    from polykv_learn.learn.module import PolyKVLearner

    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        PolyKVLearner(policies=["snapkv", "nope"])
    with pytest.raises(ValueError, match="controls"):
        PolyKVLearner(policies=["snapkv", "random"])
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        PrefillDataModule(data_dir=str(tmp_path / "missing"))


def _write_tasks(root: Path, rows: list[dict]) -> Path:
    path = root / "tasks" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task_row(i: int, task: str, words: int, **kw) -> dict:
    return {
        "id": f"{task}-{i}",
        "task": task,
        "split": "train",
        "context": "Read the text. " + " ".join(f"word{j}" for j in range(words)) + " The pass key is 4711.",
        "question": "What is the pass key?",
        "answers": ["4711"],
        "answer_prefix": "The pass key is",
        **kw,
    }


def test_task_samples_join_training_with_the_evaluation_layout(tiny_corpus, tmp_path):
    from polykv_learn.eval.evaluator import EvalSettings, Evaluator
    from polykv_learn.learn.datamodule import load_task_rows, task_probe
    from polykv_learn.learn.shared import shared_tokenizer
    from polykv_learn.models import load_model

    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    for split in ("train", "validation"):
        (data / "corpus" / f"{split}.jsonl").write_text((tiny_corpus / "corpus" / f"{split}.jsonl").read_text())
    rows = [_task_row(0, "passkey", 50), _task_row(1, "passkey", 2000), _task_row(2, "summarisation", 60)]
    _write_tasks(data, rows)
    dm = _datamodule(data, tmp_path / "cache", task_file="tasks/train.jsonl", task_probe_tokens=64)
    train = {sid.split("|")[0]: (ctx, probe, start) for sid, ctx, probe, start in dm._tokenized("train")}
    # both short task samples train (each task type is its own source); the one longer than max_context is skipped
    assert {"task/passkey-0", "task/summarisation-2"} <= set(train) and "task/passkey-1" not in train
    assert len([k for k in train if not k.startswith("task/")]) == 8  # the corpus is all still there
    assert all(train[k][2] is None for k in train if not k.startswith("task/"))  # corpus probes have no answer
    assert not [sid for sid, *_ in dm._tokenized("validation") if sid.startswith("task/")]

    # the probe is exactly what the evaluation feeds after the compressed context (text mode), then the gold answer
    tok = shared_tokenizer("tiny-llama")
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    sample = {**rows[0], "metric": "string_match", "max_new_tokens": 8}
    enc = Evaluator(model, tok, _full_only(), EvalSettings(chat=False)).encode(sample)
    ctx, probe, start = train["task/passkey-0"]
    assert torch.equal(ctx, enc.prompt_ids[0])
    assert torch.equal(probe, torch.cat([enc.tail_ids, enc.answer_ids], 1)[0]) and start == enc.tail_ids.shape[1]
    assert task_probe(rows[0]) == "\n\nWhat is the pass key?\nThe pass key is 4711"
    assert task_probe({**rows[0], "question": "", "answer_prefix": ""}) == "\n4711"
    short = _datamodule(data, tmp_path / "cache", task_file="tasks/train.jsonl", task_probe_tokens=5)
    _, _, probe, start = next(t for t in short._tokenized("train") if t[0].startswith("task/passkey-0|"))
    assert len(probe) == 5 and start == min(enc.tail_ids.shape[1], 5)  # a cut probe: the answer may be cut off

    # held-out task samples: validated on, never trained on, every task type
    more = [_task_row(i, task, 40) for i in range(3, 9) for task in ("passkey", "summarisation")]
    _write_tasks(data, rows + more)
    held = _datamodule(data, tmp_path / "cache", task_file="tasks/train.jsonl", task_val_samples=3)
    val = [sid.split("|")[0] for sid, *_ in held._tokenized("validation") if sid.startswith("task/")]
    trained = {sid.split("|")[0] for sid, *_ in held._tokenized("train")}
    assert sorted(val) == ["task/passkey-7", "task/passkey-8", "task/summarisation-8"]  # from the end, in turn
    assert not set(val) & trained and len([s for s in trained if s.startswith("task/")]) == 11
    with pytest.raises(ValueError, match="task_val_samples must be >= 0 and needs a task_file"):
        _datamodule(data, tmp_path / "cache", task_val_samples=2)
    _write_tasks(data, rows)

    # the generalisation protocol: no test split, no test-only task type
    for bad, why in (
        (_task_row(3, "passkey", 10, split="test"), "'test'"),
        (_task_row(4, "code_completion", 10), "code"),
    ):
        path = _write_tasks(tmp_path / "bad", [rows[0], bad])
        with pytest.raises(ValueError, match=f"train.jsonl:2: task sample .*{why}.*may not be trained on"):
            load_task_rows(path)
    with pytest.raises(FileNotFoundError, match="tasks/nope.jsonl"):
        _datamodule(data, tmp_path / "cache", task_file="tasks/nope.jsonl")


def _full_only():
    from polykv_learn.eval.methods import available_methods, resolve_methods

    return resolve_methods(["full"], available_methods(None, None))


def _run(cmd, cwd, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


FIT_CONFIGS = sorted(
    p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith(("eval-", "calibrate-"))
)


def _base_of(path: Path) -> list[str]:
    """An override config names its base on its first line (``# base: configs/X.yaml``): parse it on top of that
    (and of that one's own base, first)."""
    first = path.read_text().splitlines()[0]
    if not first.startswith("# base:"):
        return []
    base = REPO / first.removeprefix("# base:").strip()
    return [*_base_of(base), "--config", str(base)]


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_shipped_config_parses(config, tmp_path):
    """Every field of every fit config is one the CLI knows (a typo or a removed option fails here, not mid-run);
    evaluation configs (``eval-*.yaml``) are parsed by ``tests/eval/test_eval_config.py``, calibration configs
    (``calibrate-*.yaml``) by ``tests/test_calibrate_cli.py``."""
    path = REPO / "configs" / config
    cmd = [sys.executable, "-m", "polykv_learn.cli", "fit", *_base_of(path), "--config", str(path), "--print_config"]
    out = _run(cmd, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model:" in out.stdout and "data:" in out.stdout
    if _base_of(path):
        assert "export_dir: runs/" in out.stdout  # an override exports into a run folder, never checkpoints/


def test_fit_cli_tiny_exports_an_artifact_and_rejects_budgets_above_the_context(tiny_corpus, prefill_cache, tmp_path):
    common = [f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={prefill_cache}"]
    bad = _run(fit_cmd(*common, "--model.val_budgets=[32, 100000]", "--data.budgets=[16, 32, 100000]"), tmp_path)
    assert bad.returncode != 0 and "exceed the model's context" in bad.stderr + bad.stdout
    art = tmp_path / "artifact"
    out = _run(fit_cmd(*common, "--trainer.max_steps=12", f"--model.export_dir={art}"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((art / "polykv.json").read_text())
    assert config["model"]["num_layers"] == 4 and set(config["validation"]) == {"32", "64"}
    # the table is the one measured on the exported (selected) weights, and says so
    training = config["training"]
    assert training["selected_step"] is not None and training["validated_at_step"] == training["selected_step"]
    from polykv_learn.deploy.polykv import PolyKV

    polykv = PolyKV.from_pretrained(art)
    assert polykv.static_plan(32).total_budget == 4 * 32


def test_fit_resumes_from_last_checkpoint_after_a_kill(tiny_corpus, prefill_cache, tmp_path):
    common = [f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={prefill_cache}", "--model.export_dir=null"]
    proc = subprocess.Popen(
        fit_cmd(*common, "--trainer.max_steps=400"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "runs" / "tiny"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not list(ckpt.rglob("last*.ckpt")):
            time.sleep(1)
        time.sleep(3)
    finally:
        proc.kill()
        proc.wait()
    last = ckpt / "checkpoints" / "last.ckpt"
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 400
    out = _run(fit_cmd(*common, f"--trainer.max_steps={killed_at + 5}", "--ckpt_path=last"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = torch.load(ckpt / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert resumed == killed_at + 5
    # the resumed run logged only steps after the checkpoint (a run from scratch would log from step 0)
    metrics = sorted((ckpt / "lightning_logs").glob("version_*/metrics.csv"))[-1]
    rows = list(csv.DictReader(metrics.open()))
    steps = [int(r["step"]) for r in rows if r.get("train/kl")]
    assert steps and min(steps) >= killed_at, steps


def test_fit_ddp_two_cpu_processes(tiny_corpus, prefill_cache, tmp_path):
    common = [f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={prefill_cache}", "--model.export_dir=null"]
    out = _run(
        fit_cmd(
            *common,
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
        ),
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world_size: 2" in out.stderr + out.stdout or "distributed_backend=gloo" in out.stderr + out.stdout


def test_fit_gbdt_router_trains_on_oracle_labels_and_exports_trees(tiny_corpus, prefill_cache, tmp_path):
    common = [f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={prefill_cache}"]
    art = tmp_path / "gbdt"
    extra = ["--model.router=gbdt", "--model.gbdt_docs=2", "--model.gbdt_budgets=[32]", f"--model.export_dir={art}"]
    out = _run(fit_cmd(*common, *extra, "--trainer.max_steps=10"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    from polykv_learn.deploy.polykv import PolyKV

    polykv = PolyKV.from_pretrained(art)
    assert polykv.config["router"]["type"] == "gbdt" and polykv.planner.gbdt is not None
    plan = polykv.static_plan(32)
    assert plan.total_budget == 4 * 32 and set(plan.policies) <= set(polykv.planner.gbdt.classes)
