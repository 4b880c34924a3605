"""``polykv-learn evaluate`` options: one field per option (:class:`EvaluateOptions`), ``--config`` files (later
ones override earlier ones, flags override every file), ``--print_config``, ``--help``, the earlier argparse
spellings, one-line errors for bad config files, the shipped evaluation config and the script that runs it, and
what the shipped fit config trains on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from eval_helpers import make_samples, write_jsonl

from polykv_learn import cli
from polykv_learn.eval.cli import evaluate_main
from polykv_learn.eval.settings import FIELDS, EvaluateOptions, normalize_argv, parse_options

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = EvaluateOptions()


def _options(**changes) -> EvaluateOptions:
    return dataclasses.replace(DEFAULTS, **changes)


def _yaml(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything loads a model."""

    def fail(*args, **kwargs):
        pytest.fail("the model was loaded")

    monkeypatch.setattr("polykv_learn.models.load_model", fail)


# the earlier argparse command's spellings -> the options they set (besides --out o)
OLD_SPELLINGS = [
    (["--budgets", "128", "256"], {"budgets": [128, 256]}),
    (["--budgets", "32"], {"budgets": [32]}),
    (["--budgets=64"], {"budgets": [64]}),
    (["--budgets", "32", "-1"], {"budgets": [32, -1]}),  # a negative number is a value (check() refuses it)
    (["--methods", "full", "snapkv", "polykv"], {"methods": ["full", "snapkv", "polykv"]}),
    (["--methods", "snapkv,tova", "h2o"], {"methods": ["snapkv", "tova", "h2o"]}),
    (["--tasks", "passkey", "code_completion"], {"tasks": ["passkey", "code_completion"]}),
    (["--tasks", "passkey,variable_tracking"], {"tasks": ["passkey", "variable_tracking"]}),
    (["--merge", "a", "b c", "d:e#f"], {"merge": ["a", "b c", "d:e#f"]}),
    (["--merge", "base", "update", "--replace"], {"merge": ["base", "update"], "replace": True}),
    (["--router", "r/dir"], {"router": "r/dir"}),
    (["--no-router"], {"router": None}),
    (["--gbdt-router", "g"], {"gbdt_router": "g"}),
    (["--model", "tiny-llama"], {"model": "tiny-llama"}),
    (["--data", "my.jsonl"], {"data": "my.jsonl"}),
    (["--limit", "5"], {"limit": 5}),
    (["--shard", "1/4"], {"shard": "1/4"}),
    (["--query-aware"], {"query_aware": True}),
    (["--chat"], {"chat": True}),
    (["--no-chat"], {"chat": False}),
    (["--max-context", "2000"], {"max_context": 2000}),
    (["--batch-size", "3"], {"batch_size": 3}),
    (["--group-size", "2"], {"group_size": 2}),
    (["--attn", "eager"], {"attn": "eager"}),
    (["--no-onednn"], {"onednn": False}),
    (["--threads", "1"], {"threads": 1}),
    (["--no-progress"], {"progress": False}),
    (["--resume"], {"resume": True}),
    # the whole command line of the earlier scripts/evaluate_smollm2.sh
    (
        ["--data", "d.jsonl", "--router", "ckpt", "--no-chat", "--threads", "1", "--no-progress", "--limit", "8",
         "--methods", "polykv", "polykv-static", "--tasks", "passkey", "--shard", "1/2", "--resume"],
        {"data": "d.jsonl", "router": "ckpt", "chat": False, "threads": 1, "progress": False, "limit": 8,
         "methods": ["polykv", "polykv-static"], "tasks": ["passkey"], "shard": "1/2", "resume": True},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), OLD_SPELLINGS, ids=[" ".join(a) for a, _ in OLD_SPELLINGS])
def test_earlier_spellings_parse_to_the_same_options(argv, expected):
    assert parse_options(["--out", "o", *argv]) == _options(out="o", **expected)
    assert parse_options([*argv, "--out", "o"]) == _options(out="o", **expected)  # wherever --out stands


@pytest.mark.parametrize(
    ("new", "old"),
    [
        (["--budgets", "[128,256]"], ["--budgets", "128", "256"]),
        (["--budgets=[128, 256]"], ["--budgets", "128", "256"]),
        (["--batch_size", "3"], ["--batch-size", "3"]),
        (["--batch_size=3"], ["--batch-size=3"]),
        (["--query_aware", "true"], ["--query-aware"]),
        (["--resume=true"], ["--resume"]),
        (["--chat", "false"], ["--no-chat"]),
        (["--router", "null"], ["--no-router"]),
        (["--onednn=false", "--progress", "false"], ["--no-onednn", "--no-progress"]),
        (["--methods", '["snapkv", "tova"]'], ["--methods", "snapkv", "tova"]),
    ],
)
def test_jsonargparse_spellings_equal_the_earlier_ones(new, old):
    assert parse_options(["--out", "o", *new]) == parse_options(["--out", "o", *old])


def test_normalize_argv_puts_config_files_first_and_lists_in_yaml():
    argv = ["--budgets", "32", "x", "--config", "a.yaml", "--no-chat", "--merge", "p q", "--config=b.yaml", "--resume"]
    assert normalize_argv(argv) == [
        "--config", "a.yaml", "--config", "b.yaml",
        '--budgets=[32, "x"]', "--chat=false", '--merge=["p q"]', "--resume=true",
    ]  # fmt: skip


def test_flags_override_config_files_wherever_they_stand(tmp_path):
    base = _yaml(tmp_path / "base.yaml", budgets=[32, 64], chat=False, limit=3, methods=["snapkv"])
    expected = _options(out="o", budgets=[16], chat=False, limit=3, methods=["snapkv"])
    assert parse_options(["--config", str(base), "--budgets", "16", "--out", "o"]) == expected
    assert parse_options(["--budgets", "16", "--out", "o", "--config", str(base)]) == expected
    assert parse_options(["--config", str(base), "--out", "o"]) == _options(
        out="o", budgets=[32, 64], chat=False, limit=3, methods=["snapkv"]
    )


def test_a_later_config_overrides_an_earlier_one_field_by_field(tmp_path):
    first = _yaml(tmp_path / "a.yaml", budgets=[32, 64], tasks=["passkey", "x"], chat=False, batch_size=4)
    second = _yaml(tmp_path / "b.yaml", budgets=[128], limit=2, tasks=None)
    merged = parse_options(["--config", str(first), "--config", str(second), "--chat"])
    # lists are replaced whole; fields the later file does not hold keep the earlier file's value; the flag wins
    assert merged == _options(budgets=[128], tasks=None, chat=True, batch_size=4, limit=2)
    assert parse_options(["--config", str(second), "--config", str(first)]) == _options(
        budgets=[32, 64], tasks=["passkey", "x"], chat=False, batch_size=4, limit=2
    )


def test_print_config_is_yaml_that_parses_back_to_the_same_options(tmp_path, capsys):
    config = _yaml(tmp_path / "c.yaml", budgets=[32, 64], methods=["snapkv", "polykv"], router=None, limit=4)
    argv = ["--config", str(config), "--out", "o", "--no-chat", "--shard", "1/2", "--batch-size", "5", "--tasks",
            "passkey", "--query-aware", "--threads", "2", "--attn", "eager", "--no-onednn"]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        parse_options([*argv, "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert list(yaml.safe_load(printed)) == list(FIELDS)  # every field, in field order
    (tmp_path / "printed.yaml").write_text(printed)
    expected = _options(out="o", budgets=[32, 64], methods=["snapkv", "polykv"], router=None, limit=4, chat=False,
                        shard="1/2", batch_size=5, tasks=["passkey"], query_aware=True, threads=2, attn="eager",
                        onednn=False)  # fmt: skip
    assert parse_options(argv) == expected
    assert parse_options(["--config", str(tmp_path / "printed.yaml")]) == expected


def test_help_lists_every_field_with_its_documentation(capsys):
    with pytest.raises(SystemExit) as done:
        parse_options(["--help"])
    assert done.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # the help wraps lines (and hyphenated words) anywhere
    for name, field in FIELDS.items():
        assert f"--{name}" in text and "".join(field.metadata["doc"].split()) in text, name
    for flag in ("--config", "--print_config", "--no-router", "--no-chat", "--no-onednn", "--no-progress"):
        assert flag in text


def test_every_field_has_documentation():
    assert all(len(f.metadata["doc"]) > 10 for f in FIELDS.values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("budget: [32]\n", "unknown field 'budget' (did you mean 'budgets'?); the fields: data, out, router, "),
        ("budgets: [32]\nno_chat: true\n", "unknown field 'no_chat' (did you mean 'chat'?); the fields: "),
        ("limit: many\n", "limit (--limit) must be an integer or null, got many"),
        ("budgets: [32, lots]\n", "budgets (--budgets) must be a list of integers, e.g. [128, 256], got lots"),
        ("attn: flash\n", "attn (--attn) must be one of sdpa, eager, got flash"),
        ("chat: perhaps\n", "chat (--chat) must be true or false or null, got perhaps"),
        ("- budgets\n", "must be a mapping of evaluate options (`field: value` lines), not a YAML list"),
        ("budgets: [32\n", "is not valid YAML at line 2 column 1: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_field(no_model, tmp_path, content, message, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_samples())
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    good = _yaml(tmp_path / "good.yaml", budgets=[32])
    argv = ["--config", str(good), "--config", str(bad), "--data", str(data), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError) as err:
        evaluate_main(argv)
    assert str(err.value).startswith(f"--config {bad}") and message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as done:  # the command: the same line on stderr, exit status 2
        cli.main(["evaluate", *argv])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"polykv-learn evaluate: error: {err.value}\n"
    assert not (tmp_path / "o").exists()


def test_missing_config_file_and_bad_flags_fail_in_one_line(no_model, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        evaluate_main(["--config", str(tmp_path / "nope.yaml"), "--out", "o"])
    assert str(err.value) == f"--config {tmp_path / 'nope.yaml'} is not a file (give a YAML file of evaluate options)"
    cases = [
        (["--budgets", "32", "x"], "budgets (--budgets) must be a list of integers, e.g. [128, 256], got x"),
        (["--limit", "x"], "limit (--limit) must be an integer or null, got x"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1 (polykv-learn evaluate --help lists the options)"),
        (["--budgets", "32", "-1"], "--budgets must be >= 1, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--group-size", "0"], "--group-size must be >= 1, got 0"),
        (["--replace"], "--replace works only with --merge BASE UPDATE"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError) as err:
            evaluate_main(["--out", str(tmp_path / "o"), *extra])
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        evaluate_main(["--budgets", "32"])
    assert str(err.value) == "--out is required: the output folder (or `out:` in a --config file)"


def test_router_auto_is_the_bundled_router_only_if_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_options([]).router_dir() is None
    (tmp_path / "checkpoints" / "smollm2-135m").mkdir(parents=True)
    assert parse_options([]).router_dir() == "checkpoints/smollm2-135m"
    assert parse_options(["--no-router"]).router_dir() is None
    assert parse_options(["--router", "other"]).router_dir() == "other"


def test_a_config_drives_the_run_and_flags_override_it(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_samples(3))
    config = _yaml(tmp_path / "run.yaml", data=str(data), model="tiny-llama", router=None, methods=["snapkv"],
                   budgets=[32, 64], chat=False, progress=False, threads=1)  # fmt: skip
    results = evaluate_main(["--config", str(config), "--budgets", "32", "--tasks", "passkey", "--out", str(tmp_path)])
    recorded = results["config"]
    assert (recorded["budgets"], recorded["methods"], recorded["tasks"]) == ([32], ["full", "snapkv"], ["passkey"])
    assert recorded["chat"] is False
    assert (recorded["data"], recorded["router"], recorded["model"]) == (str(data), None, "tiny-llama")
    assert {r["id"] for r in results["samples"]} == {"s0", "s2"}  # the passkey samples
    assert json.loads((tmp_path / "results.json").read_text())["config"] == recorded


EVAL_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("eval-*.yaml"))


@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_every_shipped_eval_config_parses(name):
    options = parse_options(["--config", str(REPO / "configs" / name), "--out", "o"])
    options.check()
    assert options.out == "o"


def test_eval_smollm2_config_holds_the_earlier_script_settings():
    """The script's per-shard command with the config gives the options its earlier full command line gave."""
    shard = ["--tasks", "passkey", "--shard", "0/2", "--out", "out/eval/passkey.0-of-2", "--resume"]
    earlier = parse_options(["--data", "data/polykv/tasks/test.jsonl", "--router", "checkpoints/smollm2-135m",
                             "--no-chat", "--threads", "1", "--no-progress", *shard])  # fmt: skip
    now = parse_options(["--config", str(REPO / "configs" / "eval-smollm2.yaml"), "--threads", "1", "--no-progress",
                         *shard])  # fmt: skip
    assert now == earlier
    tasks = parse_options(["--config", str(REPO / "configs" / "eval-smollm2.yaml")]).tasks
    assert tasks == ["summarisation", "code_completion", "multi_key_needle", "multi_query_needle",
                     "few_shot_classification", "passkey"]  # fmt: skip
    script = (REPO / "scripts" / "evaluate_smollm2.sh").read_text()
    assert "CONFIG=${CONFIG:-configs/eval-smollm2.yaml}" in script and 'evaluate --config "$CONFIG"' in script


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # polykv-learn of this env
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_evaluate_script_runs_its_config_in_shards_and_merges(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_samples(4))  # s0, s2: passkey
    config = _yaml(tmp_path / "eval.yaml", data=str(data), model="tiny-llama", router=None, methods=["snapkv"],
                   budgets=[32], chat=False, tasks=["passkey"])  # fmt: skip
    env = {**_env(), "CONFIG": str(config), "OUT": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "merged")}
    for name in ("ROUTER", "DATA", "METHODS", "LIMIT", "SHARDS"):  # the script's other settings: its defaults
        env.pop(name, None)
    script = str(REPO / "scripts" / "evaluate_smollm2.sh")
    run = subprocess.run(["bash", script], cwd=tmp_path, env={**env, "JOBS": "1"}, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    direct = evaluate_main(["--config", str(config), "--no-progress", "--out", str(tmp_path / "direct")])
    ids = sorted((r["id"], r["method"]) for r in merged["samples"])
    assert ids == sorted((r["id"], r["method"]) for r in direct["samples"])
    assert ids == [("s0", "full"), ("s0", "snapkv"), ("s2", "full"), ("s2", "snapkv")]
    assert merged["summary"] == direct["summary"]
    for shard in (0, 1):  # one sample per shard, with the config's settings
        part = json.loads((tmp_path / "runs" / f"passkey.{shard}-of-2" / "results.json").read_text())
        assert [r["id"] for r in part["samples"] if r["method"] == "full"] == [f"s{2 * shard}"]
        assert (part["config"]["budgets"], part["config"]["shard"]) == ([32], f"{shard}/2")

    config.write_text("budget: [32]\n")  # a bad config stops the script before any shard runs
    bad = subprocess.run(["bash", script], cwd=tmp_path, env={**env, "OUT": str(tmp_path / "bad")},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "unknown field 'budget'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def _fit_config(capsys, monkeypatch, *configs: str) -> dict:
    """The resolved config of ``polykv-learn fit --config ... --print_config`` (in this process)."""
    from polykv_learn.learn.fitcli import run_fit

    monkeypatch.setattr(sys, "argv", ["polykv-learn"])  # the arguments are run_fit's, not pytest's
    with pytest.raises(SystemExit) as done:
        run_fit(["fit", *(a for c in configs for a in ("--config", str(REPO / c))), "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_default_fit_trains_on_what_is_scored(capsys, monkeypatch):
    """The shipped fit config trains task samples in both evaluation protocols with the gold answer weighted,
    selects on the validation task file (held-out haystack sources), and samples tight budgets (B <= 256) at least
    as often as loose ones (the learner draws uniformly from the grid inside [budget_min, budget_max])."""
    config = _fit_config(capsys, monkeypatch, "configs/smollm2-135m.yaml")
    model, data = config["model"], config["data"]
    assert data["task_protocols"] == ["query_agnostic", "query_aware"]
    assert (data["task_file"], data["task_val_file"]) == ("tasks/train.jsonl", "tasks/validation.jsonl")
    assert data["task_val_samples"] > 0 and model["answer_share"] == 0.5
    assert data["max_train_samples"] >= 300
    sampled = [b for b in data["budgets"] if model["budget_min"] <= b <= model["budget_max"]]
    tight = [b for b in sampled if b <= 256]
    assert len(tight) >= len(sampled) - len(tight) > 0
