"""``polykv-learn calibrate``: config-driven sweep, exact budget totals in the JSON, one-line errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from artifact_helpers import make_artifact

from polykv_learn import cli
from polykv_learn.data.jsonl import write_jsonl
from polykv_learn.deploy.polykv import PolyKV
from polykv_learn.models import load_model


def write_inputs(tmp_path, **overrides):
    samples = [
        {"context": "The cat sat on the mat. " * 12, "question": " Where?", "answers": ["on the mat"],
         "metric": "qa_f1"},
        {"context": "def f(x):\n    return x + 1\n" * 8, "question": " f(2)=", "answers": ["3"], "metric": "qa_f1"},
    ]  # fmt: skip
    write_jsonl(samples, tmp_path / "calib.jsonl")
    config = {
        "model": "tiny-llama", "samples_file": str(tmp_path / "calib.jsonl"), "max_samples": 2,
        "context_tokens": 150, "probe_tokens": 6, "policies": ["snapkv", "knorm"], "grid": [4, 16, 32],
        "budgets": [8, 20], "b_min": 2, "out": str(tmp_path / "out" / "calib.json"), "tasks": [],
    }  # fmt: skip
    config.update(overrides)
    (tmp_path / "calib.yaml").write_text(json.dumps(config))  # JSON is YAML
    return tmp_path / "calib.yaml", config


def test_calibrate_writes_curves_and_exact_budgets(tmp_path, capsys):
    path, config = write_inputs(tmp_path)
    cli.main(["calibrate", "--config", str(path), "--budgets", "8,20,30"])
    report = json.loads((tmp_path / "out" / "calib.json").read_text())
    n = report["context_length"]
    layers = len(report["layer_policies"])
    assert len(report["loss"]) == layers and len(report["loss"][0]) == 2 and len(report["loss"][0][0]) == 3
    assert set(report["layer_policies"]) <= {"snapkv", "knorm"}
    assert sorted(report["plans"], key=int) == ["8", "20", "30"]
    for budget, plan in report["plans"].items():
        budgets = plan["budgets"]
        assert len(budgets) == layers and sum(budgets) == layers * int(budget)
        assert all(2 <= b <= n for b in budgets) and plan["policies"] == report["layer_policies"]
    assert "wrote" in capsys.readouterr().out


def test_calibrate_writes_an_artifact_copy_with_both_baselines_and_refinement(tmp_path):
    model = load_model("tiny-llama", with_tokenizer=False)[0]
    router = make_artifact(tmp_path / "router", model)
    before = (router / "polykv.json").read_text()
    path, config = write_inputs(tmp_path, baseline="both", refine_rounds=1, router=str(router),
                                artifact=str(tmp_path / "calibrated"), validation_samples=2)  # fmt: skip
    config["validation_file"] = config["samples_file"]  # rows without a split field pass as either split
    path.write_text(json.dumps(config))
    cli.main(["calibrate", "--config", str(path)])
    report = json.loads((tmp_path / "out" / "calib.json").read_text())
    assert (router / "polykv.json").read_text() == before  # the source artifact is untouched
    copy = PolyKV.from_pretrained(tmp_path / "calibrated")
    layers = model.config.num_hidden_layers
    assert sorted(copy.calibrated_plans) == [8, 20]
    for budget, entry in report["budgets"].items():
        assert set(entry["allocated"]) == {"full", "uniform"}
        refined = entry["refined"]
        starts = [a["loss"] for a in entry["allocated"].values()] + [min(entry["uniform"].values())]
        assert refined["start_loss"] == pytest.approx(min(starts), abs=1e-12)
        assert refined["loss"] <= refined["start_loss"] and len(refined["moves"]) <= 1
        plan = copy.calibrated_plans[int(budget)]
        assert list(plan.budgets) == refined["budgets"] and list(plan.policies) == refined["policies"]
        assert sum(plan.budgets) == layers * int(budget) and copy.static_plan(int(budget)) == plan
    assert copy.config["calibrated"]["context_length"] == report["context_length"]
    table = report["validation"]["kl"]
    assert (
        sorted(table, key=int) == ["8", "20"] and copy.config["calibrated"]["calibration"]["validation"]["kl"] == table
    )
    for row in table.values():
        assert set(row) == {"calibrated", "router_static", "snapkv", "knorm"} and min(row.values()) >= 0
    assert copy.router_static_plan(8) == PolyKV.from_pretrained(router).static_plan(8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"policies": ["nope"]}, "unknown: nope"),
        ({"grid": [0, 4]}, "must be positive"),
        ({"budgets": [500]}, "outside"),
        ({"baseline": "median"}, "baseline must be one of full, uniform, both, got 'median'"),
        ({"refine_rounds": -1}, "refine_rounds must be >= 0, got -1"),
        ({"protocols": ["chat"]}, "protocols must be a non-empty list of query_agnostic, query_aware"),
        ({"artifact": "x"}, "artifact (the folder to write) and router (the artifact it copies) go together"),
        ({"tasks": ["passkey"]}, "no train samples of task types passkey"),
        ({"validation_file": "nope.jsonl"}, "validation_file 'nope.jsonl': no such file"),
        ({"min_context_tokens": 200}, "min_context_tokens 200 exceeds context_tokens"),
    ],
)
def test_calibrate_bad_config_is_one_line(tmp_path, capsys, override, message):
    path, _ = write_inputs(tmp_path, **override)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["calibrate", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polykv-learn calibrate: error:") and message in err and "\n" not in err


def test_calibrate_refuses_other_splits_and_a_non_artifact_destination(tmp_path, capsys):
    path, config = write_inputs(tmp_path)
    rows = [json.loads(line) for line in open(config["samples_file"])]
    write_jsonl([{**r, "split": "test"} for r in rows], tmp_path / "test.jsonl")
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--config", str(path), "--samples_file", str(tmp_path / "test.jsonl")])
    assert "is of split 'test', not 'train'" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--config", str(path), "--router", "r", "--artifact", str(tmp_path / "busy")])
    err = capsys.readouterr().err.strip()
    assert err.endswith("exists and is not an artifact folder (not replaced)") and "\n" not in err


class _WithBos:
    """tiny-llama's tokenizer with a BOS (id 1) put before a text unless ``add_special_tokens=False``, like Gemma3's."""

    def __init__(self):
        from polykv_learn.models import load_tokenizer

        self.inner = load_tokenizer("tiny-llama")

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False).input_ids
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def test_calibration_contexts_start_with_the_tokenizers_bos_once(tmp_path):
    """A model trained with a BOS before every sequence (Gemma3) is calibrated on contexts that start with it, as the
    evaluation and the fit prefill them; a tokenizer that adds none (SmolLM2's) gets the plain pieces."""
    from polykv_learn.calibrate_cli import task_samples

    rows = [{"id": "passkey/train/0", "task": "passkey", "split": "train", "context": "The sky is blue. " * 10,
             "question": " What colour?", "answer_prefix": " It is", "answers": [" blue"], "metric": "string_match",
             "max_new_tokens": 4}]  # fmt: skip
    write_jsonl(rows, tmp_path / "train.jsonl")
    args = (str(tmp_path / "train.jsonl"), "train", [], ["query_agnostic"])
    plain = task_samples(*args, _WithBos().inner, 1, (1, 1000, 16))
    marked = task_samples(*args, _WithBos(), 1, (1, 1000, 16))
    assert marked[0][0][0].tolist() == [1, *plain[0][0][0].tolist()]  # BOS once, then the same context
    assert marked[0][1].tolist() == plain[0][1].tolist()  # the probe continues the context: no BOS there


CALIBRATE_CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("calibrate-*.yaml"))


@pytest.mark.parametrize("path", CALIBRATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_calibrate_config_parses(path, tmp_path):
    """Every field of a shipped calibration config is one `calibrate` knows, with a valid value (a typo or a removed
    option fails here, not after the model loads). Its data files are prepare-data's; here they are stand-ins."""
    from polykv_learn.calibrate_cli import read_config

    fields = yaml.safe_load(path.read_text())
    for key in ("samples_file", "validation_file"):
        if fields.get(key):
            assert fields[key].startswith("data/polykv/tasks/"), key  # what `polykv-learn prepare-data` writes
            fields[key] = str(tmp_path / Path(fields[key]).name)
            write_jsonl([{"id": "x", "context": "a", "question": "b", "answers": ["c"]}], fields[key])
    if fields.get("router"):
        fields["router"] = str(path.parents[1] / fields["router"])  # the shipped artifact, relative to the repo
    (tmp_path / path.name).write_text(yaml.safe_dump(fields))
    config = read_config(["--config", str(tmp_path / path.name)])
    assert config.policies == fields["policies"] and config.budgets == fields["budgets"]
