"""``fit`` runs: config errors before any prefill, one log folder per run, whole-training records across resumes,
the prefill store's temporary files and permissions, and what the exported artifact says about its run."""

import csv
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from learn_helpers import TINY_CONFIG, fit_cmd

from polykv_learn.learn import datamodule as datamodule_module
from polykv_learn.learn import module as module_module
from polykv_learn.learn.datamodule import PrefillDataModule
from polykv_learn.learn.fitcli import claim_version, run_fit
from polykv_learn.learn.module import PolyKVLearner
from polykv_learn.learn.store import STALE_AFTER_S, writer_tag

TINY_GRID = "16, 24, 32, 48, 64, 96, 128"  # data.budgets of configs/tiny.yaml
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["polykv-learn"])  # run_fit parses its own list, not pytest's arguments


def _fit(tiny_corpus: Path, cache: Path, *extra: str) -> None:
    run_fit(["fit", "--config", str(TINY_CONFIG), f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={cache}", *QUIET,
             *extra])  # fmt: skip


# --- config errors: one line, before any model load or prefill -----------------------------------------------------
BAD_CONFIGS = [
    (["--model.val_budgets=[32, 40]"],
     f"val_budgets [40] are not in the data module's budget grid (data.budgets); allowed: {TINY_GRID}"),
    (["--model.val_budgets=[32, 100000]", "--data.budgets=[16, 32, 100000]"],
     "val_budgets [100000] exceed the model's context of 8192 tokens (tiny-llama); allowed: 1 to 8192"),
    (["--model.val_budgets=[64, 32]"],
     "val_budgets must be a non-empty increasing list of integers >= 1, got [64, 32]"),
    (["--model.lr=-0.1"], "lr must be a number > 0, got -0.1"),
    (["--model.tau_end=0"], "tau_end must be a number > 0, got 0.0"),
    (["--model.temperature_start=-1"], "temperature_start must be a number > 0, got -1.0"),
    (["--model.weight_decay=-0.5"], "weight_decay must be a number >= 0, got -0.5"),
    (["--model.anneal_steps=-3"], "anneal_steps must be an integer >= 1, got -3"),
    (["--model.b_min=0"], "b_min must be an integer >= 1, got 0"),
    (["--model.allocation_prior=pyramid"], "allocation_prior must be null or one of kvzip_global, got 'pyramid'"),
    (["--model.budgets_per_step=0"], "budgets_per_step must be an integer >= 1, got 0"),
    (["--model.head_allocation=ada"], "head_allocation must be one of none, learned, adakv, got 'ada'"),
    (["--model.router=gbdt", "--model.train_allocator=false"],
     "train_allocator: false leaves nothing to train with router 'gbdt' (its trees are fit on oracle labels, not "
     "trained end to end); allowed: router mlp, or train_allocator true"),
    (["--model.budget_min=200", "--model.budget_max=300"],
     "budget_min..budget_max (200..300) holds no budget of the data module's grid (data.budgets), so no step could "
     f"train; allowed: a range holding one of {TINY_GRID}"),
    (["--model.router=forest"], "router must be one of mlp, gbdt, got 'forest'"),
    (["--model.router=gbdt", "--model.gbdt_budgets=[20]"],
     f"gbdt_budgets [20] are not in the data module's budget grid (data.budgets); allowed: {TINY_GRID}"),
    (["--model.policies=[snapkv, nope]"], "policies: unknown policy 'nope'; known policies: "),
    (["--model.policies=[snapkv, random]"], "policies: policies ['random'] are controls and cannot be routed"),
    (["--model.policies=[snapkv, snapkv]"], "policies must name each policy once, got ['snapkv'] more than once"),
    (["--data.budgets=[16, 64, 32]"], "budgets must be a non-empty increasing list of integers >= 1, got [16, 64, 32]"),
    (["--data.budgets=[0, 16, 32, 64]"], "budgets must be a non-empty increasing list of integers >= 1, got [0, 16,"),
    (["--data.probe_tokens=0"], "probe_tokens must be an integer >= 1, got 0"),
    (["--data.min_context_tokens=600"], "max_context_tokens must be an integer >= 600, got 512"),
    (["--data.min_context_tokens=0"], "min_context_tokens must be an integer >= 1, got 0"),
    (["--data.task_probe_tokens=0"], "task_probe_tokens must be an integer >= 1 (or null), got 0"),
    (["--data.max_context_tokens=8190"],
     "max_context_tokens + probe tokens (8206) exceed the model's context of 8192 tokens (tiny-llama)"),
]  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or tokenizer (what a prefill needs first) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    for target in (datamodule_module, module_module):
        monkeypatch.setattr(target, "shared_model", refuse)
    monkeypatch.setattr(datamodule_module, "shared_tokenizer", refuse)


@pytest.mark.parametrize(("args", "message"), BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_config_errors_fail_before_any_model_or_prefill(args, message, tiny_corpus, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        _fit(tiny_corpus, tmp_path / "cache", *args)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text, text
    assert not (tmp_path / "cache").exists()  # no prefill store
    assert not list((tmp_path / "runs").rglob("version_*"))  # and no log folder claimed


def test_the_python_api_checks_the_pair_before_any_prefill(tiny_corpus, tmp_path, no_model):
    learner = PolyKVLearner(model_name="tiny-llama", policies=["snapkv", "tova"], val_budgets=[32, 40], b_min=2,
                            budget_min=16, budget_max=64)  # fmt: skip
    dm = PrefillDataModule(data_dir=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), model_name="tiny-llama",
                           policies=["snapkv", "tova"], budgets=[16, 32, 64])  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"^val_budgets \[40\] are not in the data module's budget grid"):
        trainer.fit(learner, datamodule=dm)
    assert not (tmp_path / "cache").exists()
    other = PrefillDataModule(data_dir=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), model_name="tiny-llama",
                              policies=["snapkv"], budgets=[16, 32, 64])  # fmt: skip
    with pytest.raises(ValueError, match=r"^data.policies \['snapkv'\] must hold every routed policy .* \['tova'\]"):
        learner.check_data(other)


def test_constructor_errors_name_the_field(tiny_corpus):
    with pytest.raises(ValueError, match=r"^hidden must be an integer >= 1, got 0$"):
        PolyKVLearner(model_name="tiny-llama", hidden=0)
    with pytest.raises(ValueError, match=r"^answer_share must be in \[0, 1\] \(or None\), got -0.1$"):
        PolyKVLearner(model_name="tiny-llama", answer_share=-0.1)
    with pytest.raises(FileNotFoundError, match=r"^model_name '/no/such/model' is neither a known model"):
        PolyKVLearner(model_name="/no/such/model")
    with pytest.raises(ValueError, match=r"^max_val_samples must be an integer >= 1 \(or null\), got 0$"):
        PrefillDataModule(data_dir=str(tiny_corpus), model_name="tiny-llama", max_val_samples=0)
    with pytest.raises(ValueError, match=r"^window must be an integer >= 1, got 0$"):
        PrefillDataModule(data_dir=str(tiny_corpus), model_name="tiny-llama", window=0)


# --- one log folder per run ------------------------------------------------------------------------------------------
def _claim(roots, barrier, queue):
    barrier.wait()
    queue.put(claim_version(roots)[0])


def test_claim_version_gives_every_process_its_own_folder(tmp_path):
    roots = [tmp_path / "a" / "lightning_logs", tmp_path / "b"]
    (roots[0] / "version_2").mkdir(parents=True)  # an earlier run: new versions come after it
    (roots[0] / "version_x").mkdir()  # not a version
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(roots, barrier, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    versions = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert versions == [3, 4, 5, 6, 7, 8]
    for root in roots:
        assert sorted(p.name for p in root.glob("version_*")) == ["version_2"] * (root == roots[0]) + [
            f"version_{v}" for v in versions
        ] + ["version_x"] * (root == roots[0])


@pytest.mark.parametrize(
    ("logger", "expected", "claims"),
    [
        (["--trainer.logger=true"], "version_0", 1),  # Lightning's default logger (TensorBoard) gets a claimed version
        (["--trainer.logger.init_args.version=7"], "version_7", 0),  # a configured version is kept
    ],
)
def test_loggers_without_a_version_get_the_claimed_one(logger, expected, claims, tiny_corpus, prefill_cache, tmp_path,
                                                       monkeypatch):  # fmt: skip
    from polykv_learn.learn import fitcli

    _build_prefills(tiny_corpus, prefill_cache)
    calls = []
    monkeypatch.setattr(fitcli, "claim_version", lambda roots: calls.append(roots) or claim_version(roots))
    monkeypatch.chdir(tmp_path)
    _fit(tiny_corpus, prefill_cache, "--model.export_dir=null", "--trainer.max_steps=1", *logger)
    assert len(calls) == claims
    assert [p.name for p in (tmp_path / "runs" / "tiny" / "lightning_logs").iterdir()] == [expected]


def _train_steps(metrics: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("train/kl")]


def test_two_fits_started_together_log_to_their_own_folders(tiny_corpus, prefill_cache, tmp_path):
    _build_prefills(tiny_corpus, prefill_cache)
    cmd = fit_cmd(f"--data.data_dir={tiny_corpus}", f"--data.cache_dir={prefill_cache}", "--model.export_dir=null",
                  "--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
                  *QUIET)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]  # fmt: skip
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errors]
    logs = tmp_path / "runs" / "tiny" / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]
    for version in ("version_0", "version_1"):  # each run's rows alone, not interleaved
        assert _train_steps(logs / version / "metrics.csv") == [0, 1, 2]
        assert (logs / version / "config.yaml").exists()
    saved = yaml.safe_load((logs / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["version"] is None  # re-running the saved config claims anew


def _build_prefills(tiny_corpus: Path, prefill_cache: Path) -> None:
    """Build the prefills of configs/tiny.yaml in-process (so that the timed or concurrent fits only train)."""
    dm = PrefillDataModule(data_dir=str(tiny_corpus), cache_dir=str(prefill_cache), model_name="tiny-llama",
                           policies=yaml.safe_load(TINY_CONFIG.read_text())["model"]["policies"],
                           budgets=[16, 24, 32, 48, 64, 96, 128], max_context_tokens=512, min_context_tokens=128,
                           probe_tokens=16, max_train_samples=8, max_val_samples=3)  # fmt: skip
    dm.prepare_data()


# --- a stopped and resumed fit: whole wall time and steps, run ids, config hash, the replacement warning ------------
def _expected_config_sha256(log_dir: Path) -> str:
    """The hash recomputed from the run's saved config: the model section and the data section (with the values
    the CLI links from the model)."""
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    model, data = saved["model"], dict(saved["data"])
    linked = ("model_name", "policies", "overlap_policies", "allocation_prior", "head_allocation")
    data.update({k: model[k] for k in linked})
    text = json.dumps({"model": model, "data": data}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def test_resumed_fit_records_the_whole_training(tiny_corpus, prefill_cache, tmp_path, monkeypatch, capsys):
    _build_prefills(tiny_corpus, prefill_cache)
    monkeypatch.chdir(tmp_path)
    art = tmp_path / "artifact"
    common = [f"--model.export_dir={art}", "--trainer.log_every_n_steps=1"]
    _fit(tiny_corpus, prefill_cache, *common, "--trainer.max_steps=4")
    first = json.loads((art / "polykv.json").read_text())["training"]
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    saved_wall = torch.load(last, map_location="cpu", weights_only=False)["polykv_training"]["wall_time_s"]
    capsys.readouterr()

    started = time.time()
    _fit(tiny_corpus, prefill_cache, *common, "--trainer.max_steps=7", "--ckpt_path=last")
    second_part = time.time() - started
    second = json.loads((art / "polykv.json").read_text())["training"]

    assert (first["global_step"], first["resumed"], first["run_id"]) == (4, 0, "version_0")
    assert (second["global_step"], second["resumed"], second["run_id"]) == (7, 1, "version_1")  # 4 + 3 steps
    assert saved_wall <= first["wall_time_s"] + 0.05  # the checkpoint was written before the export
    # the whole training: the first part (up to its checkpoint) plus the whole second part, not the second alone
    assert saved_wall < second["wall_time_s"] <= saved_wall + second_part + 0.05
    logs = tmp_path / "runs" / "tiny" / "lightning_logs"
    assert _train_steps(logs / "version_0" / "metrics.csv") == [0, 1, 2, 3]
    assert _train_steps(logs / "version_1" / "metrics.csv") == [4, 5, 6]
    assert first["config_sha256"] == _expected_config_sha256(logs / "version_0")
    assert second["config_sha256"] == first["config_sha256"]  # only trainer options changed
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == [
        f"polykv-learn fit: warning: {art} held the artifact of run version_0 (step 4, data {tiny_corpus}); "
        "run version_1 replaces it"
    ]
    card = (art / "README.md").read_text()
    assert f"- run: version_1; config sha256: {first['config_sha256']}" in card and "1 resume)" in card


# --- the prefill store: stale temporary files, permissions ---------------------------------------------------------
SMALL_DATA = dict(model_name="tiny-llama", policies=["snapkv", "tova"], budgets=[16, 32], max_context_tokens=300,
                  min_context_tokens=100, probe_tokens=8, max_train_samples=1, max_val_samples=1)  # fmt: skip


def _tiny_dm(tiny_corpus: Path, cache: Path) -> PrefillDataModule:
    return PrefillDataModule(data_dir=str(tiny_corpus), cache_dir=str(cache), **SMALL_DATA)


def test_stale_temporary_files_go_and_live_ones_stay(tiny_corpus, tmp_path):
    store = _tiny_dm(tiny_corpus, tmp_path / "cache").store
    store.root.mkdir(parents=True)
    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is now free: the writer is dead
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": f".a.safetensors.tmp-1.w-{host}-{gone.pid}",
            "live": f".b.safetensors.tmp-2.w-{host}-{live.pid}",
            "mine": f".c.safetensors.tmp-3{writer_tag()}",
            "foreign_new": ".d.safetensors.tmp-4.w-otherhost-1",
            "foreign_old": ".e.safetensors.tmp-5.w-otherhost-1",
            "legacy_new": ".tmp-6.safetensors",
            "legacy_old": ".tmp-7.safetensors",
            "prefill": "0123456789abcdef0123.safetensors",
        }
        for name in files.values():
            (store.root / name).write_bytes(b"x")
        old = time.time() - STALE_AFTER_S - 60
        for key in ("foreign_old", "legacy_old", "prefill"):
            os.utime(store.root / files[key], (old, old))
        removed = {p.name for p in store.remove_stale()}
        assert removed == {files["dead"], files["foreign_old"], files["legacy_old"]}
        assert {p.name for p in store.root.iterdir()} == set(files.values()) - removed
    finally:
        live.kill()
        live.wait()


def test_a_build_killed_mid_write_is_cleaned_up_by_the_next_run(tiny_corpus, tmp_path):
    cache = tmp_path / "cache"
    script = f"""
import os, signal
from pathlib import Path
import polykv_learn.learn.store as store
from polykv_learn.learn.datamodule import PrefillDataModule

def die(tensors, path, metadata=None):  # kill -9 in the middle of writing the temporary file
    Path(path).write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

store.save_file = die
PrefillDataModule(data_dir={str(tiny_corpus)!r}, cache_dir={str(cache)!r}, **{SMALL_DATA!r}).prepare_data()
"""
    killed = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    root = cache / "tiny-llama"
    left = [p.name for p in root.glob(".*")]
    assert len(left) == 1 and left[0].endswith(f".w-{socket.gethostname()}-{killed.pid}"), left
    dm = _tiny_dm(tiny_corpus, cache)
    dm.prepare_data()  # the next run removes it and builds the prefill_cache
    assert not list(root.glob(".*"))
    dm.setup("fit")
    assert len(list(root.glob("*.safetensors"))) == 2 and all(dm.store.has(i) for i in dm.train_ids + dm.val_ids)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prefill_files_get_the_umask_permissions(tiny_corpus, tmp_path, umask):
    dm = _tiny_dm(tiny_corpus, tmp_path / "cache")
    sample_id, context, probe, _ = dm._tokenized("validation")[0]
    previous = os.umask(umask)
    try:
        path = dm.store.build(sample_id, context, probe)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_fit_with_the_kvzip_global_prior_exports_a_router_that_follows_it(tiny_corpus, tmp_path):
    """The allocator's prior column is the stored one, its scale the scaler's std of that column, its gain trained;
    the artifact says which prior it has and plans with it (adaptive and static)."""
    art = tmp_path / "artifact"
    _fit(tiny_corpus, tmp_path / "prefills", "--model.allocation_prior=kvzip_global", "--trainer.max_steps=6",
         "--model.policies=[snapkv, kvzip, streaming]", f"--model.export_dir={art}",
         f"--trainer.default_root_dir={tmp_path}")  # fmt: skip
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.models import load_model

    polykv = PolyKV.from_pretrained(art)
    assert polykv.allocation_prior == "kvzip_global" and polykv.feature_names[-1] == "kvzip_global"
    allocator = polykv.planner.allocator
    assert allocator.prior == len(polykv.feature_names) - 1
    std = polykv.planner.scaler.std[-1]
    assert float(allocator.prior_scale) == pytest.approx(float(std)) and float(std) != 1.0
    assert float(allocator.prior_gain.detach()) != 1.0  # trained (AdamW moved it in 6 steps)
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    ids = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(0))
    assert polykv.plan_for(model, ids, 32).total_budget == 4 * 32
    assert polykv.static_plan(32).total_budget == 4 * 32


def test_a_fit_with_a_frozen_allocator_trains_the_router_only(tiny_corpus, tmp_path):
    """``train_allocator: false`` with the kvzip_global prior: the exported allocator is the untouched prior (gain 1,
    zero correction: its budgets are KVzip's allocation, tests/deploy/test_allocation_prior.py) and still plans."""
    art = tmp_path / "artifact"
    _fit(tiny_corpus, tmp_path / "prefills", "--model.allocation_prior=kvzip_global", "--trainer.max_steps=4",
         "--model.train_allocator=false", "--model.policies=[snapkv, kvzip, streaming]", f"--model.export_dir={art}",
         f"--trainer.default_root_dir={tmp_path}")  # fmt: skip
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.models import load_model

    polykv = PolyKV.from_pretrained(art)
    allocator = polykv.planner.allocator
    assert float(allocator.prior_gain.detach()) == 1.0
    assert not allocator.net[-1].weight.detach().any() and not allocator.net[-1].bias.detach().any()
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    ids = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(0))
    assert polykv.plan_for(model, ids, 32).total_budget == 4 * 32


def test_a_fit_with_one_routed_policy_trains_only_where_the_budget_goes(tiny_corpus, tmp_path, capsys):
    """``policies: [kvzip]`` (configs/smollm2-135m-kvzip-alloc.yaml): the router has one choice, so every planned
    layer is on kvzip; the allocator is trained off its kvzip_global prior; validation runs without SnapKV's ranks
    (no PyramidKV row); the AdaKV split the artifact records keeps each layer's total and the plan's total exactly."""
    art = tmp_path / "artifact"
    _fit(tiny_corpus, tmp_path / "prefills", "--model.allocation_prior=kvzip_global", "--trainer.max_steps=4",
         "--model.policies=[kvzip]", "--model.head_allocation=adakv", "--trainer.val_check_interval=2",
         f"--model.export_dir={art}", f"--trainer.default_root_dir={tmp_path}")  # fmt: skip
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.models import load_model

    polykv = PolyKV.from_pretrained(art)
    assert list(polykv.policies) == ["kvzip"] and polykv.head_allocation == "adakv"
    card = (art / "README.md").read_text()
    assert "| 32 |" in card and "(kvzip) | – |" in card  # validated at B = 32 against uniform kvzip only
    assert float(polykv.planner.allocator.prior_gain.detach()) != 1.0  # trained
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    ids = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(0))
    plan = polykv.plan_for(model, ids, 32)
    assert set(plan.policies) == {"kvzip"} and plan.total_budget == 4 * 32
    heads = polykv.plan_for(model, ids, 32, head_allocation="adakv")
    assert list(heads.budgets) == list(plan.budgets)
    assert [sum(h) for h in heads.head_budgets] == [b * model.config.num_key_value_heads for b in plan.budgets]
    # `polykv-learn generate` splits heads as the artifact was fitted for (auto -> adakv here)
    from polykv_learn import cli

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    capsys.readouterr()
    cli.main(["generate", "--router", str(art), "--budget", "8", "--prompt-file", str(prompt), "--no-chat",
              "--max-new-tokens", "2"])  # fmt: skip
    assert "--- plan (adaptive, budget 8, heads: adakv, context" in capsys.readouterr().out
