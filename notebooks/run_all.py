"""Execute the notebooks and save them in place with their outputs.

    python notebooks/run_all.py --mode smollm2          # the committed copies: SmolLM2 with the shipped router
    python notebooks/run_all.py --mode tiny             # CI-sized: a tiny random model, a router trained on the fly
    python notebooks/run_all.py --mode tiny --no-save 02_ablations.ipynb

The mode is written into each notebook's parameter cell (the cell tagged ``parameters``) and passed to the kernel as
``POLYKV_NOTEBOOK_MODE``. Cells run with the notebooks folder as working directory, in the ``python3`` kernel.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
MODES = ("tiny", "smollm2")
KERNEL = "python3"


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def set_mode(nb: nbformat.NotebookNode, mode: str) -> None:
    """Rewrite ``MODE = "..."`` in the cell tagged ``parameters``."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected exactly one cell tagged 'parameters', found {len(cells)}")
    source, count = re.subn(r'^MODE = "[a-z0-9]+"', f'MODE = "{mode}"', cells[0].source, flags=re.M)
    if count != 1:
        raise ValueError('the parameters cell has no line `MODE = "..."`')
    cells[0].source = source


def execute(path: Path, mode: str, timeout: int = 3600, save: bool = True) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in ``mode``; raises ``nbclient.exceptions.CellExecutionError`` on any error."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    nb = nbformat.read(path, as_version=4)
    set_mode(nb, mode)
    previous = os.environ.get("POLYKV_NOTEBOOK_MODE")
    os.environ["POLYKV_NOTEBOOK_MODE"] = mode  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
    finally:
        if previous is None:
            os.environ.pop("POLYKV_NOTEBOOK_MODE", None)
        else:
            os.environ["POLYKV_NOTEBOOK_MODE"] = previous
    if save:
        nbformat.write(nb, path)
    return nb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    p.add_argument("--no-save", action="store_true", help="execute only; leave the files unchanged")
    p.add_argument("names", nargs="*", help="notebook file names (default: all of notebooks/[0-9][0-9]_*.ipynb)")
    args = p.parse_args(argv)
    paths = [HERE / n for n in args.names] if args.names else notebooks()
    for path in paths:
        start = time.perf_counter()
        print(f"{path.name} ({args.mode}) ...", end=" ", flush=True)
        execute(path, args.mode, timeout=args.timeout, save=not args.no_save)
        print(f"{time.perf_counter() - start:.0f} s{'' if args.no_save else ', saved'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
