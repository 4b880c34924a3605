"""``docs/quickstart-tiny.md`` works as written: its code blocks are extracted and run in order, in a fresh folder.

The bash blocks run in one shell (so ``cd`` and ``REPO`` carry over) with ``REPO`` pointed at this checkout and the
documented smoke-test option ``--trainer.max_steps 6`` added to the fit command; the Python block runs in this
process from the quickstart folder; then the command-line ``generate`` runs. We check that the artifact loads, that
``generate`` with the compressed cache returns new tokens and that it holds fewer KV bytes than the full cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "quickstart-tiny.md"
FIT_STEPS = "--trainer.max_steps 6"


def _blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # polykv-learn of this env
    env["OMP_NUM_THREADS"] = "1"  # the documented tip: tiny models are fastest single-threaded on busy machines
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _bash(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{script}\n--- stdout ---\n{out.stdout[-3000:]}\n--- stderr ---\n{out.stderr[-5000:]}"
    return out


def test_quickstart_as_documented(tmp_path, monkeypatch):
    blocks = [(lang, code) for lang, code in _blocks(DOC.read_text()) if lang in ("bash", "python")]
    python_at = [i for i, (lang, _) in enumerate(blocks) if lang == "python"]
    assert len(python_at) == 1, "the quickstart has one Python block"
    before, python_code, after = blocks[: python_at[0]], blocks[python_at[0]][1], blocks[python_at[0] + 1 :]

    setup = "\n".join(code for _, code in before)
    assert "REPO=/path/to/polykv-learn" in setup and "polykv-learn fit" in setup
    setup = setup.replace("REPO=/path/to/polykv-learn", f"REPO={REPO}")
    fit = re.search(r"polykv-learn fit(?:[^\n]*\\\n)*[^\n]*", setup)
    assert fit is not None
    setup = setup.replace(fit.group(0), f"{fit.group(0)} {FIT_STEPS}")
    _bash(setup + "\npwd", tmp_path)

    work = tmp_path / "polykv-quickstart"
    art = work / "artifact"
    assert (art / "polykv.json").exists() and (art / "weights.safetensors").exists()
    assert (work / "prompt.txt").exists()

    # the Python block, in this process, from the quickstart folder
    monkeypatch.chdir(work)
    scope: dict = {"__name__": "quickstart"}
    exec(compile(python_code, str(DOC), "exec"), scope)

    from polykv_learn import cache_bytes
    from polykv_learn.deploy.polykv import PolyKV

    polykv, cache, full, out, ids = (scope[k] for k in ("polykv", "cache", "full", "out", "ids"))
    assert isinstance(polykv, PolyKV) and polykv.model_fingerprint["num_layers"] == 4
    assert polykv.model_fingerprint["name"] == str(work / "tiny-model")
    assert ids.shape[1] > 32, "the prompt must be longer than the budget"
    assert out.shape[1] > ids.shape[1], "generate returned no new token"
    plan = cache.applied_plan
    assert plan is not None and plan.total_budget == 4 * 32
    assert 0 < cache_bytes(cache) < cache_bytes(full)
    assert polykv.static_plan(32).total_budget == 4 * 32

    # the command-line generate
    result = _bash("\n".join(code for _, code in after), work)
    assert "--- plan (adaptive, budget 32" in result.stdout
    held, full_bytes = (
        int(x.replace(",", "")) for x in re.search(r"KV bytes: ([\d,]+) vs full ([\d,]+)", result.stdout).groups()
    )
    assert 0 < held < full_bytes
