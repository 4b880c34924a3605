"""`polykv-learn evaluate` keeps every finished sample in OUT/samples.jsonl, and `--resume` continues a stopped run
to the results an uninterrupted run gives."""

import json

import pytest
from artifact_helpers import make_artifact
from eval_helpers import make_samples, write_jsonl

from polykv_learn.eval.cli import evaluate_main
from polykv_learn.eval.evaluator import Evaluator
from polykv_learn.models import build_tiny_model

WALL_TIME = ("seconds", "seconds_per_sample")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data (4 samples), a router, the options, and the results of one uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    data = write_jsonl(root / "d.jsonl", make_samples(4))
    router = make_artifact(root / "router", build_tiny_model("tiny-llama"), random_allocator=True)
    common = ["--data", str(data), "--model", "tiny-llama", "--router", str(router), "--no-chat", "--no-progress"]
    common += ["--methods", "snapkv", "streaming", "pyramid", "polykv", "polykv-static", "--budgets", "32", "64"]
    evaluate_main([*common, "--out", str(root / "whole")])
    return {"root": root, "data": data, "common": common, "whole": root / "whole"}


def results_of(out):
    """results.json, parsed, without its wall-time fields."""
    results = json.loads((out / "results.json").read_text())
    results["timing"] = {k: v for k, v in results["timing"].items() if k not in WALL_TIME}
    return results


def log_lines(out):
    return (out / "samples.jsonl").read_text().splitlines()


def spy(monkeypatch, stop_after=None):
    """Record the samples evaluated; raise KeyboardInterrupt (a kill) once ``stop_after`` are done."""
    done = []
    original = Evaluator.evaluate_sample

    def evaluate_sample(self, sample):
        if stop_after is not None and len(done) == stop_after:
            raise KeyboardInterrupt
        done.append(sample["id"])
        return original(self, sample)

    monkeypatch.setattr(Evaluator, "evaluate_sample", evaluate_sample)
    return done


def interrupted(setup, monkeypatch, out, after=2, common=None):
    """A run stopped after ``after`` samples: their records are in samples.jsonl, no results."""
    with monkeypatch.context() as m:
        spy(m, stop_after=after)
        with pytest.raises(KeyboardInterrupt):
            evaluate_main([*(common or setup["common"]), "--out", str(out)])
    assert not (out / "results.json").exists()
    assert [json.loads(line)["id"] for line in log_lines(out)[1:]] == [f"s{i}" for i in range(after)]


def test_a_killed_run_resumed_gives_the_uninterrupted_results(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(setup, monkeypatch, out)
    done = spy(monkeypatch)
    evaluate_main([*setup["common"], "--out", str(out), "--resume"])
    assert done == ["s2", "s3"]  # only the samples the stopped run had not finished
    assert f"resuming {out / 'samples.jsonl'}: 2 of 4 samples done, 2 to go" in capsys.readouterr().out
    assert results_of(out) == results_of(setup["whole"])
    assert [json.loads(line)["id"] for line in log_lines(out)[1:]] == ["s0", "s1", "s2", "s3"]
    whole_md = (setup["whole"] / "results.md").read_text().splitlines()
    md = (out / "results.md").read_text().splitlines()
    assert [line for line in md if "per sample" not in line] == [line for line in whole_md if "per sample" not in line]


def test_a_torn_last_line_is_ignored_and_cut_off(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(setup, monkeypatch, out)
    with open(out / "samples.jsonl", "a") as handle:
        handle.write('{"id": "s2", "context_tokens": 41, "reco')  # a kill in the middle of the write
    done = spy(monkeypatch)
    evaluate_main([*setup["common"], "--out", str(out), "--resume"])
    assert done == ["s2", "s3"]
    assert "2 of 4 samples done (a torn last line was dropped), 2 to go" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in log_lines(out)[1:]] == ["s0", "s1", "s2", "s3"]
    assert results_of(out) == results_of(setup["whole"])


def test_a_finished_run_resumed_rebuilds_its_outputs_without_evaluating(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # every sample done, killed while writing the outputs

        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        m.setattr("polykv_learn.eval.runner.write_outputs", killed)
        with pytest.raises(KeyboardInterrupt):
            evaluate_main([*setup["common"], "--out", str(out)])
    assert len(log_lines(out)) == 5 and not (out / "results.json").exists()
    done = spy(monkeypatch)
    evaluate_main([*setup["common"], "--out", str(out), "--resume"])
    assert done == []
    assert results_of(out) == results_of(setup["whole"])


def test_an_earlier_run_is_refused_without_resume(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted(setup, monkeypatch, out)
    monkeypatch.setattr("polykv_learn.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError) as err:
        evaluate_main([*setup["common"], "--out", str(out)])
    assert str(err.value) == (
        f"{out / 'samples.jsonl'} already holds the samples of an earlier run; use --resume to continue it, or "
        "another --out"
    )
    with pytest.raises(ValueError, match="already holds the samples of an earlier run"):  # a finished run's too
        evaluate_main([*setup["common"], "--out", str(setup["whole"])])


def test_resume_with_other_settings_is_refused(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted(setup, monkeypatch, out)
    monkeypatch.setattr("polykv_learn.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = out / "samples.jsonl"
    resume = ["--out", str(out), "--resume"]
    common = [a for a in setup["common"] if a != "64"]  # --budgets 32
    with pytest.raises(ValueError) as err:
        evaluate_main([*common, *resume])
    assert str(err.value) == (
        f"--resume: {path} was recorded with other settings (budgets: recorded [32, 64], now [32]); resume with the "
        "recorded settings, or evaluate into another --out"
    )
    with pytest.raises(ValueError, match=r"other settings \(batch_size: recorded 64, now 3\)"):
        evaluate_main([*setup["common"], "--batch-size", "3", *resume])
    # the same file name with other content: a sample not yet evaluated changed
    rows = make_samples(4)
    rows[3]["answers"] = ["99999"]
    edited = write_jsonl(tmp_path / "d.jsonl", rows)
    changed = [str(edited) if a == str(setup["data"]) else a for a in setup["common"]]
    with pytest.raises(ValueError, match=r"other settings \(data: recorded .*; samples: recorded \""):
        evaluate_main([*changed, *resume])


def test_resume_with_a_router_retrained_into_the_same_folder_is_refused(setup, tmp_path, monkeypatch):
    router = tmp_path / "router"
    make_artifact(router, build_tiny_model("tiny-llama"), seed=1)
    with_router = [str(router) if a == setup["common"][setup["common"].index("--router") + 1] else a
                   for a in setup["common"]]  # fmt: skip
    interrupted(setup, monkeypatch, tmp_path / "run2", common=with_router)
    make_artifact(router, build_tiny_model("tiny-llama"), seed=2)
    with pytest.raises(ValueError, match=r"other settings \(router_files: recorded \"[0-9a-f]{64}\", now \""):
        evaluate_main([*with_router, "--out", str(tmp_path / "run2"), "--resume"])


def test_a_damaged_line_is_an_error(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted(setup, monkeypatch, out, after=3)
    lines = log_lines(out)
    lines[2] = lines[2][:-5]  # damage inside the file, not a torn end
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        evaluate_main([*setup["common"], "--out", str(out), "--resume"])
    assert str(err.value) == (
        f"{out / 'samples.jsonl'}:3: not a JSON line; the file is damaged (only a torn last line is skipped): repair "
        "or remove it, or evaluate into another --out"
    )
