"""Where set-up puts the model and the text, and where benchmarks write results."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
GEMMA3 = REPO / "models" / "gemma-3-270m"
TEXT = REPO / "data" / "debian-handbook.txt"
RESULTS = REPO / "benchmarks" / "results"
