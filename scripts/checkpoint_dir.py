"""What the ``build_*.py`` scripts share: a dense model from a GGUF file, and a
checkpoint directory that never looks complete while half-built.

A checkpoint is built in a temporary sibling directory and renamed into place
with a ``.complete`` marker; a later run reuses a complete one and refuses to
touch a partial one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = ".complete"


def is_complete(out: Path) -> bool:
    return all((out / f).is_file() for f in ("config.json", "model.safetensors", MARKER))


def output_dir(argv: list[str], default: Path) -> Path | None:
    """The checkpoint directory the command line names; ``None`` if it is already complete."""
    out = Path(argv[1]) if len(argv) > 1 else default
    out = out if out.is_absolute() else (Path.cwd() / out)
    if is_complete(out):
        print(f"reusing existing checkpoint at {out}")
        return None
    if out.exists():
        sys.exit(
            f"error: {out} exists but is not a complete checkpoint (no {MARKER}); remove it first"
        )
    return out


def publish(out: Path, build: Callable[[Path], str], start: float) -> None:
    """Run ``build(tmp)`` (which returns the marker's text), then move ``tmp`` to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / MARKER).write_text(build(tmp))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
    print(f"wrote {out} ({files}) in {time.perf_counter() - start:.1f}s")


def dense_model_from_gguf(gguf: Path) -> Any:
    """The GGUF's model dequantized to plain bfloat16, as ``save_pretrained`` writes it dense."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    start = time.perf_counter()
    # transformers 5 keeps GGUF weights packed unless told to dequantize; `dtype` is its
    # name for `torch_dtype`.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    print(f"model dequantized to bfloat16 in {time.perf_counter() - start:.1f}s")
    for name, param in model.named_parameters():
        if param.dtype != torch.bfloat16:
            sys.exit(
                f"error: parameter {name} is {param.dtype}, expected dense bfloat16 (still packed?)"
            )
    # A plain, non-quantized model, so that save_pretrained writes dense safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
