"""``polykv-learn calibrate``: config-driven sweep, exact budget totals in the JSON, one-line errors."""

import json

import pytest

from polykv_learn import cli
from polykv_learn.data.jsonl import write_jsonl


def write_inputs(tmp_path, **overrides):
    samples = [
        {"context": "The cat sat on the mat. " * 12, "question": " Where?", "answers": ["on the mat"],
         "metric": "qa_f1"},
        {"context": "def f(x):\n    return x + 1\n" * 8, "question": " f(2)=", "answers": ["3"], "metric": "qa_f1"},
    ]  # fmt: skip
    write_jsonl(samples, tmp_path / "calib.jsonl")
    config = {
        "model": "tiny-llama", "samples_file": str(tmp_path / "calib.jsonl"), "max_samples": 2,
        "context_tokens": 60, "probe_tokens": 6, "policies": ["snapkv", "knorm"], "grid": [4, 16, 32],
        "budgets": [8, 20], "b_min": 2, "out": str(tmp_path / "out" / "calib.json"),
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
    for budget, budgets in report["plans"].items():
        assert len(budgets) == layers and sum(budgets) == layers * int(budget)
        assert all(2 <= b <= n for b in budgets)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"policies": ["nope"]}, "unknown: nope"),
        ({"grid": [0, 4]}, "must be positive"),
        ({"budgets": [500]}, "outside"),
    ],
)
def test_calibrate_bad_config_is_one_line(tmp_path, capsys, override, message):
    path, _ = write_inputs(tmp_path, **override)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["calibrate", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polykv-learn calibrate: error:") and message in err and "\n" not in err
