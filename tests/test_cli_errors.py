"""``polykv-learn`` error handling: expected errors are one stderr line and exit status 2 (``--debug`` or
POLYKV_DEBUG=1 shows the traceback), and ``generate`` checks everything before it loads the model."""

import json
from pathlib import Path

import pytest
import torch
from artifact_helpers import make_artifact

from polykv_learn import cli
from polykv_learn.models import build_tiny_model, load_tokenizer
from polykv_learn.text import cut_middle

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "checkpoints" / "smollm2-135m"
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """A valid tiny-llama artifact (fingerprint: 8192 positions)."""
    return make_artifact(tmp_path_factory.mktemp("router") / "tiny", build_tiny_model("tiny-llama"))


@pytest.fixture()
def prompt(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("What is the capital of France?\n")
    return path


def _copy_router(router, tmp_path, edit=None):
    """A copy of the tiny artifact with ``edit(config)`` applied to its polykv.json."""
    target = tmp_path / "edited"
    target.mkdir()
    for name in ("polykv.json", "weights.safetensors"):
        (target / name).write_bytes((router / name).read_bytes())
    if edit is not None:
        config = json.loads((target / "polykv.json").read_text())
        config = edit(config) or config
        (target / "polykv.json").write_text(json.dumps(config))
    return target


def _positions(value):
    def edit(config):
        config["model"]["max_positions"] = value

    return edit


def _error(capsys, argv, command="generate"):
    """Run the CLI, expect exit status 2 and one stderr line; return the message after the prefix."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"polykv-learn {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


def _gen(router, prompt, *extra):
    return ["generate", "--router", str(router), "--budget", "8", "--prompt-file", str(prompt), *extra]


# --- generate: every check before the model loads --------------------------------------------------------------------
def test_missing_router_folder(capsys, no_model, prompt, tmp_path):
    message = _error(capsys, _gen(tmp_path / "nowhere", prompt))
    assert message == f"{tmp_path / 'nowhere'} is not a polykv-learn artifact folder (it does not exist)"


def test_router_given_as_a_file(capsys, no_model, router, prompt):
    message = _error(capsys, _gen(router / "polykv.json", prompt))
    assert message == f"{router / 'polykv.json'} is a file, not an artifact folder"


def test_truncated_artifact(capsys, no_model, router, prompt, tmp_path):
    broken = _copy_router(router, tmp_path)
    data = (broken / "weights.safetensors").read_bytes()
    (broken / "weights.safetensors").write_bytes(data[: len(data) // 2])
    message = _error(capsys, _gen(broken, prompt))
    assert message.startswith(f"corrupt artifact {broken}: weights.safetensors cannot be read (")


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda c: c.__setitem__("policies", "streaming"),
         "policies must be a list of policy names, got a string ('streaming')"),
        (lambda c: [c], "polykv.json must hold a JSON object, got a list of 1 item"),
        (lambda c: c["model"].__setitem__("num_layers", "4"),
         "model.num_layers must be an integer >= 1, got a string ('4')"),
    ],
)  # fmt: skip
def test_corrupt_config(capsys, no_model, router, prompt, tmp_path, edit, expected):
    broken = _copy_router(router, tmp_path, edit)
    assert _error(capsys, _gen(broken, prompt)) == f"corrupt artifact {broken}: {expected}"


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--budget", "0"], "--budget must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-context", "0"], "--max-context must be >= 1, got 0"),
    ],
)
def test_numeric_options(capsys, no_model, router, prompt, extra, expected):
    assert _error(capsys, _gen(router, prompt, *extra)) == expected


def test_learned_head_allocation_needs_a_head_allocator(capsys, no_model, router, prompt):
    message = _error(capsys, _gen(router, prompt, "--head-allocation", "learned"))
    assert message.startswith("head_allocation='learned' needs an artifact with a learned head allocator")
    message = _error(capsys, _gen(router, prompt, "--head-allocation", "adakv", "--mode", "static"))
    assert message == "--head-allocation adakv needs --mode adaptive (heads are split by the prefill's signals)"


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "does not exist"),
        ("dir", "is not a file"),
        (b"\x00\x01\x02binary", "is binary (it contains NUL bytes); give a UTF-8 text file"),
        (
            "café".encode("latin-1") + b" au lait",
            "is not UTF-8 text (byte 3: invalid continuation byte); give a UTF-8 text file",
        ),
        (b"", "is empty (or only whitespace)"),
        (b"  \n\t\n", "is empty (or only whitespace)"),
    ],
)
def test_prompt_file(capsys, no_model, router, tmp_path, content, expected):
    path = tmp_path / "p.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert _error(capsys, _gen(router, path, "--no-chat")) == f"prompt file {path} {expected}"


def test_unknown_model(capsys, no_model, router, prompt, tmp_path):
    message = _error(capsys, _gen(router, prompt, "--model", str(tmp_path / "nomodel")))
    known = "(smollm2-135m, gemma3-270m, tiny-llama"
    assert message.startswith(f"model '{tmp_path / 'nomodel'}' is neither a known model {known}")


def test_max_new_tokens_leaving_no_room(capsys, no_model, router, prompt, tmp_path):
    small = _copy_router(router, tmp_path, _positions(64))
    message = _error(capsys, _gen(small, prompt, "--max-new-tokens", "64"))
    assert message == "--max-new-tokens 64 leaves no room for the prompt: tiny-llama has 64 positions"


def test_prompt_longer_than_the_context_is_refused(capsys, no_model, router, tmp_path):
    small = _copy_router(router, tmp_path, _positions(64))
    path = tmp_path / "long.txt"
    path.write_text(LONG_TEXT)
    n = len(load_tokenizer("tiny-llama")(LONG_TEXT).input_ids)
    assert n > 56
    message = _error(capsys, _gen(small, path, "--no-chat", "--max-new-tokens", "8"))
    assert message == (
        f"the prompt has {n} tokens but tiny-llama has 64 positions, so with --max-new-tokens 8 at most 56 prompt "
        "tokens fit; shorten the prompt or pass --max-context N (N <= 56) to drop its middle"
    )
    message = _error(capsys, _gen(small, path, "--no-chat", "--max-new-tokens", "8", "--max-context", "57"))
    assert message == "--max-context 57 is more than the 56 prompt tokens that fit (tiny-llama has 64 positions, " \
        "minus --max-new-tokens 8)"  # fmt: skip


def test_bundled_router_refuses_a_24k_token_prompt_before_loading(capsys, no_model, tmp_path):
    """The reported case: 24K tokens into the 8192-position SmolLM2 (tokenizer only, no model)."""
    path = tmp_path / "long.txt"
    path.write_text("word " * 24000)
    message = _error(capsys, _gen(BUNDLED, path))
    assert message.startswith("the prompt has 240") and "smollm2-135m has 8192 positions" in message
    assert "at most 8128 prompt tokens fit" in message and "--max-context N (N <= 8128)" in message


# --- generate that runs ------------------------------------------------------------------------------------------
def test_max_context_cuts_the_middle_and_generates_like_the_library(capsys, router, tmp_path):
    from polykv_learn import adapter
    from polykv_learn.deploy.polykv import PolyKV
    from polykv_learn.models import load_model

    path = tmp_path / "long.txt"
    path.write_text(LONG_TEXT)
    cli.main(_gen(router, path, "--no-chat", "--max-context", "40", "--max-new-tokens", "3"))
    out, err = capsys.readouterr()
    tok = load_tokenizer("tiny-llama")
    ids, cut = cut_middle(tok(LONG_TEXT).input_ids, 40)
    assert cut > 0
    assert err.strip().splitlines() == [
        f"polykv-learn generate: cut {cut} tokens from the middle of the prompt (kept 40, --max-context 40)"
    ]
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    polykv = PolyKV.from_pretrained(router)
    input_ids = torch.tensor([ids])
    cache = {adapter.cache_kwarg(model): polykv.make_cache(model, budget=8)}
    reference = model.generate(input_ids, **cache, max_new_tokens=3, do_sample=False)
    answer = tok.decode(reference[0, 40:], skip_special_tokens=True)
    assert out.startswith(answer + "\n\n--- plan (adaptive, budget 8, context 40 tokens) ---\n")
    assert "KV bytes: " in out


@pytest.mark.slow
def test_bundled_router_generates_from_a_cut_24k_token_prompt(capsys, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("word " * 24000)
    cli.main(_gen(BUNDLED, path, "--max-context", "2000", "--max-new-tokens", "4"))
    out, err = capsys.readouterr()
    tok = load_tokenizer("smollm2-135m")
    text = tok.apply_chat_template([{"role": "user", "content": path.read_text()}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    cut = len(tok(text, verbose=False).input_ids) - 2000
    notes = [line for line in err.splitlines() if line.startswith("polykv-learn")]  # transformers logs too
    assert notes == [
        f"polykv-learn generate: cut {cut} tokens from the middle of the prompt (kept 2000, --max-context 2000)"
    ]
    assert "--- plan (adaptive, budget 8, context 2000 tokens) ---" in out and "KV bytes: " in out


# --- the wrapper: --debug, POLYKV_DEBUG, unexpected errors, every command ---------------------------------------
def test_debug_flag_anywhere_shows_the_traceback(no_model, router, prompt):
    for argv in (["--debug", *_gen(router, prompt, "--budget", "0")], [*_gen(router, prompt, "--budget", "0"),
                                                                       "--debug"]):  # fmt: skip
        with pytest.raises(ValueError, match="^--budget must be >= 1, got 0$"):
            cli.main(argv)


def test_debug_environment_variable_shows_the_traceback(monkeypatch, no_model, router, prompt, capsys):
    monkeypatch.setenv("POLYKV_DEBUG", "1")
    with pytest.raises(ValueError, match="^--budget must be >= 1, got 0$"):
        cli.main(_gen(router, prompt, "--budget", "0"))
    monkeypatch.setenv("POLYKV_DEBUG", "0")
    assert _error(capsys, _gen(router, prompt, "--budget", "0")) == "--budget must be >= 1, got 0"


def test_unexpected_errors_keep_their_traceback(monkeypatch, router, prompt):
    from polykv_learn.deploy.polykv import PolyKV

    def broken(directory):
        raise KeyError("a bug")

    monkeypatch.setattr(PolyKV, "from_pretrained", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(_gen(router, prompt))


@pytest.mark.parametrize(
    "error,expected",
    [
        (ValueError("--budgets must be positive,\n  got [0]"), "--budgets must be positive, got [0]"),
        (FileNotFoundError("data/x.jsonl does not exist"), "data/x.jsonl does not exist"),
        (PermissionError(13, "Permission denied", "/out/results.json"), "/out/results.json: Permission denied"),
        (NotADirectoryError(20, "Not a directory", "/out"), "/out: Not a directory"),
    ],
)
def test_evaluate_errors_become_one_line(monkeypatch, capsys, error, expected):
    def evaluate_main(argv):
        raise error

    monkeypatch.setattr("polykv_learn.eval.cli.evaluate_main", evaluate_main)
    assert _error(capsys, ["evaluate", "--limit", "1"], command="evaluate") == expected


def test_fit_constructor_errors_become_one_line(monkeypatch, capsys, tmp_path, no_model):
    monkeypatch.setattr("polykv_learn.learn.shared.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.budgets=[0]"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("polykv-learn fit: error: budgets must be "), err
    assert errors[0].endswith("got [0]")  # the datamodule's own message, on one line


def test_unknown_command_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert (
        info.value.code == 2 and "commands: fit, validate, prepare-data, generate, evaluate" in capsys.readouterr().out
    )


# --- cut_middle ---------------------------------------------------------------------------------------------------
def test_cut_middle_keeps_the_start_and_the_end():
    assert cut_middle(list(range(10)), 4) == ([0, 1, 8, 9], 6)
    assert cut_middle(list(range(10)), 5) == ([0, 1, 7, 8, 9], 5)
    assert cut_middle(list(range(10)), 1) == ([9], 9)
    assert cut_middle(list(range(10)), 10) == (list(range(10)), 0)
    assert cut_middle([1, 2], None) == ([1, 2], 0)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="limit must be a positive integer or None"):
            cut_middle([1, 2, 3], bad)
