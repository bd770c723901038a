"""The disk tier without an engine: the file format, the directory, the keeper's budget."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from vllm_sink.core import snapshot_file
from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.snapshot_ops import RestoreSnapshot, SaveSnapshot
from vllm_sink.core.snapshots import SnapshotIndex
from vllm_sink.scheduler.kv_cache import StreamingManagers
from vllm_sink.scheduler.snapshot_directory import SnapshotDirectory
from vllm_sink.scheduler.snapshot_keeper import HEADER_ALLOWANCE, TierSizes
from vllm_sink_dev.kv_managers import make_manager, step

POLICY = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=96)
ENGINE = bytes(range(32))
BYTES_PER_BLOCK = 64


def a_snapshot(tokens: list[int], salt: bytes = ENGINE):
    return SnapshotIndex(32, salt).make(tokens, "", 290, 224, (8,))


def write_like_the_worker(op: SaveSnapshot, rank: int, pages: int, payload_byte: int = 7) -> None:
    """What the worker writes for a :class:`SaveSnapshot` op (its own fields added)."""
    key = bytes.fromhex(op.header["snapshot"]["key"])
    header = {**op.header, "rank": rank, "sink_keys": None, "page_bytes": [BYTES_PER_BLOCK],
              "num_blocks": pages}  # fmt: skip
    payload = [bytes([payload_byte]) * (BYTES_PER_BLOCK * pages)]
    snapshot_file.write(Path(op.directory) / snapshot_file.file_name(key, rank), header, payload)


def test_a_file_reads_back_and_any_damage_is_refused(tmp_path):
    snapshot = a_snapshot(list(range(300)))
    header = {"engine": ENGINE.hex(), "rank": 0, "ranks": 1,
              "snapshot": snapshot_file.snapshot_fields(snapshot), "sink_keys": None,
              "page_bytes": [8], "num_blocks": 4}  # fmt: skip
    path = tmp_path / "x.0.snap"
    size = snapshot_file.write(path, header, [bytes(range(32))])
    assert path.stat().st_size == size
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the owner's only
    read, payload = snapshot_file.read_payload(path)
    assert read.snapshot_of() == snapshot and bytes(payload) == bytes(range(32))

    data = path.read_bytes()
    damaged = {
        "truncated": data[:-5],
        "a flipped byte": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
        "a longer payload": data + b"\0",
        "not a snapshot file": b"PK\x03\x04" + data[4:],
        "a cut header": data[:40],
    }
    for what, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(snapshot_file.SnapshotFileError):
            snapshot_file.read_payload(path)
        assert what


def keeper_with_disk(tmp_path, disk_snapshots: float, ranks: int = 1, num_blocks: int = 60):
    manager, pool = make_manager(POLICY, num_blocks=num_blocks)
    groups = StreamingManagers([manager])
    per_snapshot = ranks * (4 * BYTES_PER_BLOCK + HEADER_ALLOWANCE + 8 * 64)
    sizes = TierSizes(4, disk_bytes=int(disk_snapshots * per_snapshot),
                      bytes_per_block=BYTES_PER_BLOCK, ranks=ranks)  # fmt: skip
    directory = SnapshotDirectory(tmp_path, ENGINE, ranks)
    groups.enable_snapshots(sizes, ENGINE, directory)
    return manager, pool, groups, groups.snapshots


def stream(manager, req: str, tokens: int) -> None:
    computed = 0
    while computed < tokens:
        new = min(96 if computed < 200 else 1, tokens - computed)
        step(manager, req, computed, new)
        computed += new


def test_snapshots_go_to_disk_and_a_restarted_keeper_resumes_them(tmp_path):
    manager, _, groups, keeper = keeper_with_disk(tmp_path, disk_snapshots=4, ranks=2)
    stream(manager, "a", 300)
    groups.keep_snapshot("a", list(range(300)), "")
    keep, save = keeper.take_ops()
    assert isinstance(save, SaveSnapshot) and len(save.blocks) == 4
    assert stat.S_IMODE(os.stat(save.directory).st_mode) == 0o700
    for rank in range(2):
        write_like_the_worker(save, rank, pages=4, payload_byte=rank)

    _, _, _, restarted = keeper_with_disk(tmp_path, disk_snapshots=4, ranks=2)
    assert restarted.tier_figures()["disk"][0] == 1
    snapshot, length, rows, tier = restarted.resume(list(range(301)), "", 300)
    assert (length, tier) == (300, "disk")
    (restore,) = restarted.take_ops()
    assert isinstance(restore, RestoreSnapshot)
    assert restore.blocks == tuple(b.block_id for b in rows[0] if not b.is_null)
    assert [bytes(payload[:1]) for _, payload in restore.files] == [b"\0", b"\1"]
    assert restarted.resume(list(range(301)), "another tenant", 300) is None


def test_the_disk_budget_removes_the_least_recently_used_files(tmp_path):
    manager, _, groups, keeper = keeper_with_disk(tmp_path, disk_snapshots=2.5)
    for i in range(3):
        stream(manager, f"c{i}", 300)
        groups.keep_snapshot(f"c{i}", [i] * 300, "")
        for op in keeper.take_ops():
            if isinstance(op, SaveSnapshot):
                write_like_the_worker(op, 0, pages=4)
    files = sorted(p.name for p in keeper.disk.path.iterdir())
    assert len(files) == 2  # c0's were removed to make room for c2's
    used = sum(p.stat().st_size for p in keeper.disk.path.iterdir())
    assert used <= keeper.sizes.disk_bytes
    keeper.scan()
    assert keeper.tier_figures()["disk"] == (2, used)


def test_foreign_truncated_and_unfinished_files_are_skipped_with_a_warning(tmp_path, caplog):
    manager, _, groups, keeper = keeper_with_disk(tmp_path, disk_snapshots=8)
    saves = []
    for i in range(4):
        stream(manager, f"c{i}", 300)
        groups.keep_snapshot(f"c{i}", [i] * 300, "")
        saves += [op for op in keeper.take_ops() if isinstance(op, SaveSnapshot)]
    for save in saves:
        write_like_the_worker(save, 0, pages=4)
    names = {i: snapshot_file.file_name(bytes.fromhex(s.header["snapshot"]["key"]), 0)
             for i, s in enumerate(saves)}  # fmt: skip
    path = keeper.disk.path
    data = (path / names[1]).read_bytes()
    (path / names[1]).write_bytes(data[:-10])  # truncated
    (path / names[2]).write_bytes(data)  # c1's file under c2's name
    foreign = {**saves[3].header, "engine": bytes(32).hex()}
    write_like_the_worker(SaveSnapshot("x", (), str(path), foreign), 0, pages=4)  # overwrites c3's
    (path / ".c9.0.snap.123.tmp").write_bytes(b"half")  # a writer still at work

    with caplog.at_level(logging.WARNING):
        _, _, _, restarted = keeper_with_disk(tmp_path, disk_snapshots=8)
    assert restarted.tier_figures()["disk"][0] == 1  # c0 only
    assert restarted.resume([0] * 301, "", 300)[3] == "disk"
    for i in (1, 2, 3):
        assert restarted.resume([i] * 301, "", 300) is None
    skipped = [r.getMessage() for r in caplog.records if "skipping snapshot file" in r.getMessage()]
    assert len(skipped) == 3


def test_a_file_damaged_after_it_was_found_is_not_loaded(tmp_path, caplog):
    manager, _, groups, keeper = keeper_with_disk(tmp_path, disk_snapshots=8)
    stream(manager, "a", 300)
    groups.keep_snapshot("a", list(range(300)), "")
    (_, save) = keeper.take_ops()
    write_like_the_worker(save, 0, pages=4)
    _, _, _, restarted = keeper_with_disk(tmp_path, disk_snapshots=8)
    path = next(restarted.disk.path.glob("*.snap"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert restarted.resume(list(range(301)), "", 300) is None
    assert "checksum" in caplog.text
    assert not any(isinstance(op, RestoreSnapshot) for op in restarted.take_ops())


def test_the_weights_fingerprint_follows_the_bytes_not_the_path(tmp_path, monkeypatch):
    from vllm_sink.scheduler import fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 100)
    (model / "config.json").write_text("{}")
    cache = tmp_path / "snapshots"
    cache.mkdir()
    reads = []
    original = fingerprint._file_sha256
    monkeypatch.setattr(fingerprint, "_file_sha256", lambda p: reads.append(p) or original(p))

    first = fingerprint.weights_fingerprint(str(model), cache)
    assert fingerprint.weights_fingerprint(str(model), cache) == first
    assert len(reads) == 1  # the second time from the digest cache
    moved = tmp_path / "elsewhere"
    model.rename(moved)
    assert fingerprint.weights_fingerprint(str(moved), cache) == first
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[12345] ^= 1
    (moved / "model.safetensors").write_bytes(bytes(data))  # new weights, same path
    assert fingerprint.weights_fingerprint(str(moved), cache) != first


def test_a_directory_that_cannot_be_used_leaves_snapshots_in_memory(tmp_path, caplog):
    from vllm_sink.scheduler.snapshot_directory import open_snapshot_directory

    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with caplog.at_level(logging.WARNING):
        assert open_snapshot_directory(str(not_a_directory / "x"), None, None, POLICY) is None
    assert "snapshots are not kept on disk" in caplog.text


def test_a_failed_write_warns_once_and_loses_only_that_file(tmp_path, caplog):
    from vllm_sink.worker.snapshot_writer import SnapshotWriter

    written = []
    writer = SnapshotWriter(lambda size, seconds: written.append(size))
    header = {"engine": ENGINE.hex(), "rank": 0}
    pages = [torch.zeros(2, 8, dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            writer.save(tmp_path / "gone" / "x.0.snap", header, None, pages)
        writer.save(tmp_path / "y.0.snap", header, None, pages)
        assert writer.flush(timeout_s=10)
    assert writer.failures == 3 and len(written) == 1
    assert caplog.text.count("cannot write snapshot file") == 1
    assert (tmp_path / "y.0.snap").read_bytes().endswith(bytes(16))
