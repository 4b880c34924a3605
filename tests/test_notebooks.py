"""Every notebook runs end to end in tiny mode (``POLYKV_NOTEBOOK_MODE=tiny``) and draws its figures.

The notebooks share one work folder, so the tiny router trained by the first one is reused by the others (each
notebook also trains it itself when it is missing). The files are not rewritten.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _run_all():
    spec = importlib.util.spec_from_file_location("notebooks_run_all", NOTEBOOKS_DIR / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _run_all()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def test_committed_notebooks_are_the_ones_documented_and_hold_smollm2_outputs():
    """The README names every notebook run_all executes; each is committed executed in SmolLM2 mode (its
    parameters cell says so and its outputs hold a figure), not as a tiny-mode or unexecuted copy."""
    import nbformat

    readme = (NOTEBOOKS_DIR.parent / "README.md").read_text()
    paths = run_all.notebooks()
    assert paths, "no notebooks found"
    for path in paths:
        assert path.name.split("_", 1)[1] in readme or path.name in readme, f"README does not mention {path.name}"
        nb = nbformat.read(path, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and 'MODE = "smollm2"' in params[0].source, path.name
        outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} is committed without figures"


@pytest.mark.parametrize("path", run_all.notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_in_tiny_mode(path, workdir, monkeypatch):
    monkeypatch.setenv("POLYKV_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest, and CI machines are shared
    nb = run_all.execute(path, "tiny", timeout=600, save=False)  # raises CellExecutionError on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook drew no figure"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'MODE = "tiny"' in params[0].source
