"""What a snapshot on disk is valid for: the model's weights and all that shapes its KV cache.

A snapshot file is used only by an engine with the same fingerprint: the
weights (their bytes, not their path: replicas mount a model at different
paths, and a path can be given new weights), the streaming settings, and what
decides the KV pages' layout and values (dtype, quantization, KV cache groups
and their specs, tensor-parallel size, platform, attention backend, vLLM's
version). Hashing the weights reads them once; the digests are kept next to the
snapshots by each file's path, size, modification time and inode, so a restart
does not read them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.snapshot_file import MAGIC

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DIGEST_CACHE = "weight-digests.json"


def weight_files(model: str) -> list[Path]:
    """The files a model's weights are read from: a local directory, a file, or a model
    already in the Hugging Face cache."""
    path = Path(model)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, local_files_only=True))
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_fingerprint(model: str, cache_dir: Path) -> str:
    """SHA-256 over the weight files' names and contents (digests cached in ``cache_dir``)."""
    files = weight_files(model)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {model}")
    cache_file = cache_dir / DIGEST_CACHE
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    overall = hashlib.sha256()
    for path in files:
        stat = path.stat()
        resolved = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        cached = cache.get(resolved)
        if cached is None or cached[0] != stamp:
            cached = cache[resolved] = [stamp, _file_sha256(path)]
        overall.update(f"{path.name}:{stat.st_size}:{cached[1]}\n".encode())
    temporary = cache_file.with_name(f".{DIGEST_CACHE}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, cache_file)
    return overall.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def engine_fingerprint(vllm_config: Any, kv_cache_config: Any, policy: SinkWindowPolicy,
                       weights: str) -> bytes:  # fmt: skip
    """The fingerprint of everything a snapshot's KV depends on, besides its tokens."""
    import vllm
    from vllm.platforms import current_platform

    model, cache = vllm_config.model_config, vllm_config.cache_config
    groups = [
        (repr(group.kv_cache_spec), list(group.layer_names))
        for group in kv_cache_config.kv_cache_groups
    ]
    facts = {
        "format": MAGIC.decode("latin-1"),
        "weights": weights,
        "dtype": str(model.dtype),
        "quantization": str(model.quantization),
        "kv_cache_dtype": str(cache.cache_dtype),
        "policy": [policy.sinks, policy.window, policy.block_size, policy.max_chunk_tokens],
        "groups": groups,
        "tensor_parallel": vllm_config.parallel_config.tensor_parallel_size,
        "platform": str(current_platform.device_type),
        "attention_backend": str(getattr(vllm_config.attention_config, "backend", None)),
        "vllm": ".".join(map(str, vllm.__version_tuple__[:2])),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).digest()
