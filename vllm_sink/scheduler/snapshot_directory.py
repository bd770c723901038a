"""The disk tier's files as the scheduler sees them: found, checked, loaded, kept within budget.

The worker writes one file per snapshot and rank
(:mod:`vllm_sink.core.snapshot_file`) into this engine's subdirectory, named
after the engine fingerprint, so that engines with other weights or settings
never meet each other's files; the subdirectory is the owner's only. Other
engines sharing the directory (replicas, a restarted server) write there too:
:meth:`SnapshotDirectory.scan` picks up what they wrote and drops what is gone.
A file is loaded only after its header matches this engine and its payload its
checksum; anything else is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.snapshot_file import (
    SUFFIX,
    SnapshotFileError,
    SnapshotHeader,
    file_name,
    read_header,
    read_payload,
)
from vllm_sink.core.snapshots import Snapshot
from vllm_sink.scheduler.fingerprint import engine_fingerprint, weights_fingerprint

logger = init_logger("vllm.vllm_sink")

STALE_TEMPORARY_S = 3600
"""A temporary file this old was left by a writer that died: removed at a scan."""


@dataclass(frozen=True)
class OnDisk:
    snapshot: Snapshot
    bytes: int
    """All its ranks' files together."""
    used_at: float
    """The newest modification time of its files (touched when resumed)."""


def open_snapshot_directory(
    root: str, vllm_config: Any, kv_cache_config: Any, policy: SinkWindowPolicy
) -> SnapshotDirectory | None:
    """This engine's snapshot directory under ``root``; ``None``, with a warning, if it
    cannot be used (snapshots then live in memory only, as without a directory)."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True, mode=0o700)
        weights = weights_fingerprint(vllm_config.model_config.model, Path(root))
        engine = engine_fingerprint(vllm_config, kv_cache_config, policy, weights)
        ranks = vllm_config.parallel_config.tensor_parallel_size
        return SnapshotDirectory(Path(root), engine, ranks)
    except Exception as error:  # a request never fails because the disk tier does
        logger.warning(
            "vllm-sink: snapshots are not kept on disk (--streaming-snapshot-dir %s): %s",
            root,
            error,
        )
        return None


class SnapshotDirectory:
    """This engine's snapshot files: ``<root>/<engine fingerprint>/<key>.<rank>.snap``."""

    def __init__(self, root: Path, engine: bytes, ranks: int) -> None:
        self.engine = engine.hex()
        self.ranks = ranks
        self.path = Path(root) / self.engine[:32]
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        probe = self.path / f".probe.{os.getpid()}"
        probe.write_bytes(b"")  # OSError: not writable
        probe.unlink()
        self._known: dict[str, tuple[tuple, OnDisk | None]] = {}
        """Key (hex) -> its files (name, size, inode) when read, and what they hold
        (``None``: refused; read again only if the files change)."""

    def file(self, key: bytes, rank: int) -> Path:
        return self.path / file_name(key, rank)

    def scan(self) -> dict[bytes, OnDisk]:
        """Every whole, valid snapshot in the directory now (headers read once per file)."""
        files: dict[str, list[Path]] = {}
        now = time.time()
        try:
            entries = list(os.scandir(self.path))
        except OSError as error:
            logger.warning("vllm-sink: cannot list snapshot directory %s: %s", self.path, error)
            return {}
        for entry in entries:
            if entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_TEMPORARY_S:
                        os.unlink(entry.path)
            elif entry.name.endswith(SUFFIX):
                stem = entry.name[: -len(SUFFIX)].rpartition(".")[0]
                files.setdefault(stem, []).append(Path(entry.path))
        found = {}
        for stem, paths in files.items():
            if len(paths) != self.ranks:
                continue  # a writer not done yet, or a rank's file lost
            try:
                stats = [path.stat() for path in paths]
            except OSError:
                continue
            files_id = tuple(sorted((p.name, st.st_size, st.st_ino) for p, st in zip(paths, stats)))
            known = self._known.get(stem)
            if known is None or known[0] != files_id:
                known = self._known[stem] = (files_id, self._check(stem))
            on_disk = known[1]
            if on_disk is not None:
                used_at = max(st.st_mtime for st in stats)
                found[on_disk.snapshot.key] = OnDisk(on_disk.snapshot, on_disk.bytes, used_at)
        for stem in set(self._known) - set(files):
            del self._known[stem]
        return found

    def _check(self, stem: str) -> OnDisk | None:
        """The snapshot a key's files hold, if they are whole and this engine's."""
        snapshot, size = None, 0
        for rank in range(self.ranks):
            path = self.path / f"{stem}.{rank}{SUFFIX}"
            try:
                header, offset = read_header(path)
                if header.engine != self.engine or (header.rank, header.ranks) != (
                    rank,
                    self.ranks,
                ):
                    raise SnapshotFileError("made by another engine or rank layout")
                ours = header.snapshot_of()
                if ours.key.hex() != stem or (snapshot is not None and ours != snapshot):
                    raise SnapshotFileError("its header does not match its name")
                if path.stat().st_size != offset + header.payload_bytes:
                    raise SnapshotFileError("truncated")
            except (SnapshotFileError, OSError) as error:
                logger.warning("vllm-sink: skipping snapshot file %s: %s", path, error)
                return None
            snapshot, size = ours, size + offset + header.payload_bytes
        return OnDisk(snapshot, size, 0.0)

    def load(self, snapshot: Snapshot) -> list[tuple[SnapshotHeader, bytearray]] | None:
        """Each rank's header and payload, checked; ``None`` (warned) if any file is not whole."""
        files = []
        for rank in range(self.ranks):
            path = self.file(snapshot.key, rank)
            try:
                header, payload = read_payload(path)
                if header.engine != self.engine or header.snapshot_of() != snapshot:
                    raise SnapshotFileError("its header changed")
            except SnapshotFileError as error:
                logger.warning("vllm-sink: not loading snapshot file %s: %s", path, error)
                stem = snapshot.key.hex()
                if stem in self._known:  # refused until its files change
                    self._known[stem] = (self._known[stem][0], None)
                return None
            files.append((header, payload))
        self.touch(snapshot)
        return files

    def touch(self, snapshot: Snapshot) -> None:
        """Mark it recently used (the budget removes the least recently used first)."""
        for rank in range(self.ranks):
            with contextlib.suppress(OSError):
                os.utime(self.file(snapshot.key, rank))

    def remove(self, snapshot: Snapshot) -> None:
        for rank in range(self.ranks):
            with contextlib.suppress(OSError):
                self.file(snapshot.key, rank).unlink()
        self._known.pop(snapshot.key.hex(), None)
