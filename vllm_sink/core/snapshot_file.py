"""One snapshot on disk: one file per tensor-parallel rank, checked before anything is loaded.

Layout: :data:`MAGIC`, the header's length (8 bytes, little-endian), the header
(JSON), the payload (the sink keys' first copy, then each KV storage's pages of
the snapshot's blocks, in the order they were read). The header carries what
the scheduler needs to index the file without reading the payload, and the
payload's length and SHA-256, so that a truncated or corrupt file is refused
before a byte of it reaches the KV cache. Files are written under a temporary
name, readable by their owner only, and renamed into place, so a reader never
sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_sink.core.snapshots import Snapshot

MAGIC = b"VLLM-SINK-SNAPSHOT\x01"
SUFFIX = ".snap"
MAX_HEADER_BYTES = 1 << 20


class SnapshotFileError(ValueError):
    """A file that is not a whole snapshot of this engine: skipped, never loaded."""


@dataclass(frozen=True)
class SnapshotHeader:
    engine: str
    """The engine fingerprint (hex) the KV is valid for: weights, settings, layout."""
    rank: int
    ranks: int
    snapshot: dict[str, Any]
    """The :class:`~vllm_sink.core.snapshots.Snapshot`, keys in hex."""
    sink_keys: dict[str, Any] | None
    """``{"dtype", "shape"}`` of the sink keys' first copy, if the stream evicted."""
    page_bytes: list[int]
    """Bytes of one block in each KV storage."""
    num_blocks: int
    payload_bytes: int
    sha256: str

    def snapshot_of(self) -> Snapshot:
        fields = dict(self.snapshot)
        for name in ("key", "start_key"):
            fields[name] = bytes.fromhex(fields[name])
        for name in ("tail_tokens", "freed_until"):
            fields[name] = tuple(fields[name])
        return Snapshot(**fields)


def snapshot_fields(snapshot: Snapshot) -> dict[str, Any]:
    fields = asdict(snapshot)
    for name in ("key", "start_key"):
        fields[name] = fields[name].hex()
    return fields


def file_name(key: bytes, rank: int) -> str:
    return f"{key.hex()}.{rank}{SUFFIX}"


def write(path: Path, header: dict[str, Any], payload: Iterable[memoryview]) -> int:
    """Write a snapshot file atomically (owner-only); returns its size in bytes.

    ``header`` lacks the payload's length and checksum, which are added here.
    """
    chunks = [memoryview(chunk).cast("B") for chunk in payload]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    header = {
        **header,
        "payload_bytes": sum(len(c) for c in chunks),
        "sha256": digest.hexdigest(),
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
            for chunk in chunks:
                file.write(chunk)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return len(MAGIC) + 8 + len(encoded) + header["payload_bytes"]


def read_header(path: Path) -> tuple[SnapshotHeader, int]:
    """The file's header and where its payload starts; :class:`SnapshotFileError` if malformed."""
    try:
        with open(path, "rb") as file:
            start = file.read(len(MAGIC) + 8)
            if len(start) < len(MAGIC) + 8 or not start.startswith(MAGIC):
                raise SnapshotFileError("not a vllm-sink snapshot file")
            length = int.from_bytes(start[len(MAGIC) :], "little")
            if length > MAX_HEADER_BYTES:
                raise SnapshotFileError(f"a header of {length} bytes")
            raw = file.read(length)
    except OSError as error:
        raise SnapshotFileError(str(error)) from None
    if len(raw) != length:
        raise SnapshotFileError("truncated header")
    try:
        header = SnapshotHeader(**json.loads(raw))
        header.snapshot_of()
    except (ValueError, TypeError, KeyError) as error:
        raise SnapshotFileError(f"malformed header ({error})") from None
    return header, len(MAGIC) + 8 + length


def read_payload(path: Path) -> tuple[SnapshotHeader, bytearray]:
    """The header and the whole payload, checked against the header's length and SHA-256."""
    header, offset = read_header(path)
    payload = bytearray(header.payload_bytes)
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            got = file.readinto(payload)
            extra = file.read(1)
    except OSError as error:
        raise SnapshotFileError(str(error)) from None
    if got != header.payload_bytes or extra:
        raise SnapshotFileError(
            f"payload of {got}{'+' if extra else ''} bytes, header says {header.payload_bytes}"
        )
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise SnapshotFileError("payload checksum mismatch")
    return header, payload
