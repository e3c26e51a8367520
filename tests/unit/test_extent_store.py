"""storage_daemon.extent_store: replica files with per-block CRC32C, and the disk store."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pickle
import random
import threading
from pathlib import Path

import pytest
from crc32c import crc32c

from storage_daemon import extent_store
from storage_daemon.extent_store import BLOCK, ChecksumError, DiskStore, ReplicaFile, ReplicaMeta

MiB = 1 << 20
SMALL = 256 * 1024  # extent size for most tests: 64 blocks


@pytest.fixture
def store(tmp_path):
    s = DiskStore(tmp_path / "disk0", "disk0")
    yield s
    s.close()


@pytest.fixture
def rf(store) -> ReplicaFile:
    return store.open_replica("vol-1", 0, SMALL, 1, create=True)


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of a file behind the store's back."""
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)


def open_paths() -> list[str]:
    """Targets of this process's open fds."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.fixture
def fdatasyncs(monkeypatch):
    """Record the inode of every fdatasync'ed fd (and still do the real call)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd):
        calls.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


# --- round trips ------------------------------------------------------------------------------------------


def test_never_written_reads_zeros(rf):
    assert rf.size == SMALL
    assert rf.read(0, SMALL) == bytes(SMALL)
    assert rf.read(123, 4000) == bytes(4000)
    assert rf.read(SMALL, 0) == b""


@pytest.mark.parametrize("offset,length", [
    (0, BLOCK),                      # one aligned block
    (8 * BLOCK, 5 * BLOCK),          # aligned run
    (100, 50),                       # inside one block
    (BLOCK - 10, 20),                # straddles a block boundary
    (3 * BLOCK + 1, 4 * BLOCK),      # unaligned both ends, several blocks
    (5 * BLOCK, 2 * BLOCK + 7),      # aligned start, unaligned end
    (7 * BLOCK - 3, 2 * BLOCK + 3),  # unaligned start, aligned end
    (SMALL - 10, 10),                # the very end
])
def test_round_trip_keeps_neighbours(rf, offset, length):
    background = pattern(SMALL, seed=1)
    rf.write(0, memoryview(background))
    data = pattern(length, seed=2)
    rf.write(offset, memoryview(data))
    expected = bytearray(background)
    expected[offset:offset + length] = data
    assert rf.read(offset, length) == data
    assert rf.read(0, SMALL) == expected
    # Unaligned reads around the written range, into a caller-provided buffer.
    lo, hi = max(0, offset - 777), min(SMALL, offset + length + 555)
    buf = bytearray(hi - lo)
    rf.readinto(lo, memoryview(buf))
    assert buf == expected[lo:hi]


def test_whole_extent_round_trip_and_crcs(rf):
    data = pattern(SMALL, seed=3)
    rf.write(0, data)  # plain bytes are accepted too
    assert rf.read(0, SMALL) == data
    # The sidecar holds exactly the CRC32C of every block, little-endian.
    rf.sync()
    raw = rf.crc_path.read_bytes()
    assert len(raw) == SMALL // BLOCK * 4
    stored = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
    assert stored == [crc32c(data[i:i + BLOCK]) for i in range(0, SMALL, BLOCK)]


def test_unaligned_write_into_unwritten_extent(rf):
    rf.write(5000, b"hello")
    assert rf.read(4990, 30) == bytes(10) + b"hello" + bytes(15)
    assert rf.read(0, BLOCK) == bytes(BLOCK)


def test_data_survives_reopen(tmp_path):
    data = pattern(3 * BLOCK + 11, seed=4)
    with DiskStore(tmp_path, "d") as s:
        s.open_replica("vol-1", 2, SMALL, 1, create=True).write(999, data)
    with DiskStore(tmp_path, "d") as s:
        r = s.get("vol-1", 2)
        assert r.read(999, len(data)) == data
        assert r.read(0, 999) == bytes(999)


# --- thin provisioning and space reclaim ------------------------------------------------------------------


def test_thin_provisioning(store):
    r = store.open_replica("vol-1", 0, 64 * MiB, 1, create=True)
    assert os.stat(r.path).st_size == 64 * MiB
    assert os.stat(r.crc_path).st_size == 64 * MiB // BLOCK * 4
    assert r.allocated_bytes() == 0
    r.write(40 * MiB, pattern(BLOCK))
    r.sync()
    assert 0 < r.allocated_bytes() <= 4 * BLOCK
    # The sidecar stays sparse as well: one written page of crcs.
    assert os.stat(r.crc_path).st_blocks * 512 <= 4 * BLOCK
    assert store.usage()["used_bytes"] <= 16 * BLOCK


def test_write_zeroes_punches_and_reads_zeros(rf):
    data = pattern(SMALL, seed=5)
    rf.write(0, data)
    rf.sync()
    full = rf.allocated_bytes()
    assert full >= SMALL
    # Unaligned range: 10 whole blocks punched, partial edges zeroed in place.
    lo, hi = 2 * BLOCK + 100, 13 * BLOCK + 50
    rf.write_zeroes(lo, hi - lo)
    expected = bytearray(data)
    expected[lo:hi] = bytes(hi - lo)
    assert rf.read(0, SMALL) == expected
    assert rf.allocated_bytes() <= full - 10 * BLOCK
    assert (3 * BLOCK, 10 * BLOCK, False) in rf.allocation(0, SMALL)
    # The punched blocks store crc 0 ("zero block").
    rf.sync()
    raw = rf.crc_path.read_bytes()
    assert raw[3 * 4:13 * 4] == bytes(40)
    assert raw[2 * 4:3 * 4] != bytes(4)  # the partial edge block has a real crc


def test_write_zeroes_without_punch_keeps_allocation(rf):
    rf.write(0, pattern(8 * BLOCK))
    rf.sync()
    before = rf.allocated_bytes()
    rf.write_zeroes(0, 8 * BLOCK, punch=False)
    assert rf.read(0, 8 * BLOCK) == bytes(8 * BLOCK)
    assert rf.allocated_bytes() == before
    rf.write_zeroes(10, 20, punch=False)  # sub-block: read-modify-write
    assert rf.read(0, BLOCK) == bytes(BLOCK)


def test_trim_whole_blocks_only(rf):
    data = pattern(SMALL, seed=6)
    rf.write(0, data)
    rf.sync()
    before = rf.allocated_bytes()
    rf.trim(BLOCK + 1, 4 * BLOCK)  # whole blocks inside: 2, 3, 4
    expected = bytearray(data)
    expected[2 * BLOCK:5 * BLOCK] = bytes(3 * BLOCK)
    assert rf.read(0, SMALL) == expected  # partial edges untouched
    assert before - rf.allocated_bytes() >= 3 * BLOCK
    assert (2 * BLOCK, 3 * BLOCK, False) in rf.allocation(0, SMALL)
    rf.trim(10, 100)  # no whole block: nothing happens
    assert rf.read(0, BLOCK) == data[:BLOCK]
    rf.trim(0, SMALL)
    assert rf.read(0, SMALL) == bytes(SMALL)
    assert rf.allocated_bytes() == 0


def test_without_hole_punching(rf, monkeypatch):
    """Filesystems without FALLOC_FL_PUNCH_HOLE/ZERO_RANGE (EOPNOTSUPP): write_zeroes
    writes zeros instead, trim (advisory) does nothing; other fallocate errors surface."""
    calls = []

    def fallocate(fd, mode, offset, length):
        calls.append(mode)
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(extent_store, "_libc_fallocate", fallocate)
    data = pattern(SMALL, seed=14)
    rf.write(0, data)
    rf.trim(0, SMALL)
    assert rf.read(0, SMALL) == data
    rf.write_zeroes(BLOCK, 4 * BLOCK)
    rf.write_zeroes(10 * BLOCK, 2 * BLOCK, punch=False)
    assert calls  # it was tried
    expected = bytearray(data)
    expected[BLOCK:5 * BLOCK] = bytes(4 * BLOCK)
    expected[10 * BLOCK:12 * BLOCK] = bytes(2 * BLOCK)
    assert rf.read(0, SMALL) == expected

    def failing(fd, mode, offset, length):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(extent_store, "_libc_fallocate", failing)
    rf.sync()
    with pytest.raises(OSError) as ei:
        rf.trim(0, SMALL)
    assert ei.value.errno == errno.EIO and rf.dirty
    with pytest.raises(OSError):
        rf.write_zeroes(0, SMALL)
    monkeypatch.undo()
    # Nothing was zeroed, and the crcs still describe the data.
    assert rf.read(0, SMALL) == expected


def test_random_operations_match_a_model(tmp_path):
    """Random unaligned writes, zeroes, trims, syncs and reads over a few replicas with a
    tiny open-file cache (constant eviction), a store reopen halfway, against bytearrays."""
    rng = random.Random(15)
    model = {i: bytearray(SMALL) for i in range(3)}
    s = DiskStore(tmp_path, "d", max_open_replicas=2)
    try:
        for step in range(3000):
            if step == 1500:
                s.close()
                s = DiskStore(tmp_path, "d", max_open_replicas=2)
            i = rng.randrange(3)
            r = s.open_replica("vol-1", i, SMALL, 1, create=True)
            off = rng.randrange(SMALL)
            n = rng.randrange(min(SMALL - off, 3 * BLOCK) + 1)
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(n)
                r.write(off, memoryview(data))
                model[i][off:off + n] = data
            elif op < 0.55:
                r.write_zeroes(off, n, punch=rng.random() < 0.5)
                model[i][off:off + n] = bytes(n)
            elif op < 0.6:
                r.trim(off, n)
                lo, hi = -(-off // BLOCK) * BLOCK, (off + n) // BLOCK * BLOCK
                if lo < hi:
                    model[i][lo:hi] = bytes(hi - lo)
            elif op < 0.65:
                r.sync()
            else:
                assert r.read(off, n) == model[i][off:off + n], (step, i, off, n)
        for i in range(3):
            assert s.get("vol-1", i).read(0, SMALL) == model[i]
    finally:
        s.close()


def test_allocation_map(rf):
    assert rf.allocation(0, SMALL) == [(0, SMALL, False)]
    rf.write(0, pattern(BLOCK))
    rf.write(10 * BLOCK, pattern(2 * BLOCK))
    rf.write(SMALL - BLOCK, pattern(BLOCK))
    assert rf.allocation(0, SMALL) == [
        (0, BLOCK, True),
        (BLOCK, 9 * BLOCK, False),
        (10 * BLOCK, 2 * BLOCK, True),
        (12 * BLOCK, SMALL - 13 * BLOCK, False),
        (SMALL - BLOCK, BLOCK, True),
    ]
    # Clipped to the asked range.
    assert rf.allocation(BLOCK // 2, 10 * BLOCK) == [
        (BLOCK // 2, BLOCK // 2, True),
        (BLOCK, 9 * BLOCK, False),
        (10 * BLOCK, BLOCK // 2, True),
    ]
    assert rf.allocation(5 * BLOCK, 0) == []


# --- checksums --------------------------------------------------------------------------------------------


def test_flipped_data_byte_is_detected(rf):
    rf.write(0, pattern(16 * BLOCK, seed=7))
    rf.sync()
    flip_byte(rf.path, 5 * BLOCK + 1234)
    with pytest.raises(ChecksumError) as ei:
        rf.read(0, 16 * BLOCK)
    err = ei.value
    assert err.errno == errno.EIO
    assert err.offset == 5 * BLOCK
    assert err.path == rf.path
    assert str(rf.path) in str(err) and str(5 * BLOCK) in str(err)
    # Any read covering the block fails, even one byte of it; neighbours are fine.
    with pytest.raises(ChecksumError):
        rf.read(6 * BLOCK - 1, 1)
    assert len(rf.read(0, 5 * BLOCK)) == 5 * BLOCK
    assert len(rf.read(6 * BLOCK, BLOCK)) == BLOCK
    # It is an OSError and survives pickling with its fields.
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, OSError) and (again.path, again.offset, again.errno) == (rf.path, 5 * BLOCK, errno.EIO)


def test_partial_write_never_launders_a_bad_block(rf):
    rf.write(0, pattern(4 * BLOCK, seed=8))
    flip_byte(rf.path, 2 * BLOCK + 7)
    with pytest.raises(ChecksumError) as ei:
        rf.write(2 * BLOCK + 100, b"x")  # read-modify-write of the bad block
    assert ei.value.offset == 2 * BLOCK
    with pytest.raises(ChecksumError):
        rf.read(2 * BLOCK, BLOCK)
    # A whole-block write repairs it (what the scrubber will do from a peer).
    good = pattern(BLOCK, seed=9)
    rf.write(2 * BLOCK, good)
    assert rf.read(2 * BLOCK, BLOCK) == good


def test_garbage_in_never_written_block_is_detected(rf):
    fd = os.open(rf.path, os.O_RDWR)
    os.pwrite(fd, b"junk", 3 * BLOCK + 10)
    os.close(fd)
    assert rf.read(0, 3 * BLOCK) == bytes(3 * BLOCK)
    with pytest.raises(ChecksumError) as ei:
        rf.read(0, SMALL)
    assert ei.value.offset == 3 * BLOCK


def test_corrupted_crc_sidecar_is_detected(tmp_path):
    with DiskStore(tmp_path, "d") as s:
        r = s.open_replica("vol-1", 0, SMALL, 1, create=True)
        r.write(0, pattern(8 * BLOCK, seed=10))
        crc_path = r.crc_path
    flip_byte(crc_path, 6 * 4 + 1)  # crc of block 6
    with DiskStore(tmp_path, "d") as s:
        r = s.get("vol-1", 0)
        with pytest.raises(ChecksumError) as ei:
            r.read(0, SMALL)
        assert ei.value.offset == 6 * BLOCK
        assert r.read(0, 6 * BLOCK) == pattern(8 * BLOCK, seed=10)[:6 * BLOCK]


def test_lost_crc_update_after_crash_is_detected(tmp_path):
    """A crash that persisted the data of a write but not its crc page: the block
    fails verification instead of returning unverified data."""
    old = pattern(BLOCK, seed=11)
    with DiskStore(tmp_path, "d") as s:
        r = s.open_replica("vol-1", 0, SMALL, 1, create=True)
        r.write(0, old)
        r.sync()
        synced_crcs = r.crc_path.read_bytes()
        r.write(0, pattern(BLOCK, seed=12))
        crc_path = r.crc_path
    crc_path.write_bytes(synced_crcs)  # the sidecar as of the last sync
    with DiskStore(tmp_path, "d") as s:
        with pytest.raises(ChecksumError):
            s.get("vol-1", 0).read(0, BLOCK)


def test_truncated_data_file_is_refused(tmp_path):
    with DiskStore(tmp_path, "d") as s:
        path = s.open_replica("vol-1", 0, SMALL, 1, create=True).path
    os.truncate(path, SMALL - BLOCK)
    with DiskStore(tmp_path, "d") as s:
        with pytest.raises(OSError) as ei:
            s.get("vol-1", 0)
        assert ei.value.errno == errno.EIO


# --- durability -------------------------------------------------------------------------------------------


def test_sync_only_when_dirty(rf, fdatasyncs):
    data_ino, crc_ino = os.stat(rf.path).st_ino, os.stat(rf.crc_path).st_ino
    assert not rf.dirty
    rf.sync()
    assert fdatasyncs == []
    rf.read(0, BLOCK)
    rf.sync()
    assert fdatasyncs == []  # reads do not dirty
    rf.write(BLOCK, b"abc")
    assert rf.dirty
    rf.sync()
    assert fdatasyncs == [data_ino, crc_ino]  # data first, then its crcs
    assert not rf.dirty
    rf.sync()
    assert len(fdatasyncs) == 2
    for op in (lambda: rf.write_zeroes(0, 3 * BLOCK), lambda: rf.trim(0, SMALL)):
        op()
        assert rf.dirty
        rf.sync()
    assert fdatasyncs == [data_ino, crc_ino] * 3


def test_write_during_sync_stays_dirty(rf, monkeypatch):
    """The flag is cleared before flushing: a write that lands while fdatasync runs
    (another thread in the daemon) is left for the next sync, not forgotten."""
    real = os.fdatasync
    raced = []

    def fdatasync_with_a_racing_write(fd):
        if not raced:
            raced.append(fd)
            rf.write(7 * BLOCK, b"late")  # I/O is not blocked by a sync in progress
        real(fd)

    rf.write(0, b"early")
    monkeypatch.setattr(os, "fdatasync", fdatasync_with_a_racing_write)
    rf.sync()
    assert raced and rf.dirty
    rf.sync()
    assert not rf.dirty
    assert rf.read(7 * BLOCK, 4) == b"late"


def test_failed_fdatasync_is_sticky(tmp_path, monkeypatch):
    store = DiskStore(tmp_path, "d")
    rf = store.open_replica("vol-1", 0, SMALL, 1, create=True)
    rf.write(0, b"data")

    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        rf.sync()
    monkeypatch.undo()
    # The kernel may have dropped those pages: every later sync reports the failure,
    # and so do sync_all and close (which still closes the files).
    with pytest.raises(OSError) as ei:
        rf.sync()
    assert ei.value.errno == errno.EIO
    with pytest.raises(OSError):
        store.sync_all()
    with pytest.raises(OSError):
        store.close()
    assert rf.closed
    assert not [p for p in open_paths() if str(tmp_path) in p]


def test_concurrent_sync_thread(rf):
    """A worker thread syncing in a loop while this thread writes and reads."""
    stop = threading.Event()
    errors = []

    def syncer():
        while not stop.is_set():
            try:
                rf.sync()
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

    t = threading.Thread(target=syncer)
    t.start()
    model = bytearray(SMALL)
    rng = random.Random(13)
    try:
        for _ in range(2000):
            off = rng.randrange(SMALL - 3 * BLOCK)
            data = rng.randbytes(rng.randrange(1, 3 * BLOCK))
            rf.write(off, memoryview(data))
            model[off:off + len(data)] = data
    finally:
        stop.set()
        t.join()
    assert errors == []
    rf.sync()
    assert not rf.dirty
    assert rf.read(0, SMALL) == model


# --- the disk store ---------------------------------------------------------------------------------------


def test_disk_layout(tmp_path, store):
    label = json.loads((tmp_path / "disk0" / "braid-disk.json").read_text())
    assert label["disk_id"] == store.disk_id and label["format_version"] == 1 and label["created"]
    r = store.open_replica("vol-1", 3, SMALL, 5, create=True)
    d = tmp_path / "disk0" / "replicas" / "vol-1"
    assert r.path == d / "3.data"
    assert sorted(p.name for p in d.iterdir()) == ["3.crc", "3.data", "3.meta"]
    assert json.loads((d / "3.meta").read_text()) == {
        "volume": "vol-1", "index": 3, "extent_size": SMALL, "generation": 5}


def test_open_replica_caches_and_checks(store):
    r = store.open_replica("vol-1", 0, SMALL, 1, create=True)
    assert store.open_replica("vol-1", 0, SMALL, 9, create=True) is r
    assert store.get("vol-1", 0) is r
    assert r.meta.generation == 1  # an existing replica keeps its generation
    assert store.get("vol-1", 1) is None
    with pytest.raises(FileNotFoundError):
        store.open_replica("vol-1", 1, SMALL, 1, create=False)
    with pytest.raises(ValueError, match="extent_size"):
        store.open_replica("vol-1", 0, 2 * SMALL, 1, create=False)


def test_second_store_on_same_disk_is_refused(tmp_path, store):
    with pytest.raises(OSError) as ei:
        DiskStore(tmp_path / "disk0", "again")
    assert ei.value.errno == errno.EBUSY


def test_generation_persists_across_reopen(tmp_path, fdatasyncs):
    with DiskStore(tmp_path, "d") as s:
        disk_id = s.disk_id
        r = s.open_replica("vol-1", 4, SMALL, 1, create=True)
        r.write(0, b"before the bump")
        s.set_generation("vol-1", 4, 7)
        assert os.stat(r.path).st_ino in fdatasyncs  # data made durable before the new generation
        assert r.meta.generation == 7 and not r.dirty
        s.open_replica("vol-1", 5, SMALL, 1, create=True)
    with DiskStore(tmp_path, "d") as s:
        assert s.disk_id == disk_id
        s.set_generation("vol-1", 5, 3)  # a replica that is not open
        assert s.get("vol-1", 4).meta.generation == 7
        assert s.get("vol-1", 5).meta.generation == 3
        assert s.get("vol-1", 4).read(0, 15) == b"before the bump"
        with pytest.raises(FileNotFoundError):
            s.set_generation("vol-1", 6, 1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_replicas_listing(store):
    for vol, idx, gen in [("vol-b", 2, 1), ("vol-a", 10, 2), ("vol-a", 9, 3), ("vol-b", 0, 4)]:
        store.open_replica(vol, idx, SMALL, gen, create=True)
    assert store.replicas() == [
        ReplicaMeta("vol-a", 9, SMALL, 3), ReplicaMeta("vol-a", 10, SMALL, 2),
        ReplicaMeta("vol-b", 0, SMALL, 4), ReplicaMeta("vol-b", 2, SMALL, 1),
    ]


def test_delete_reclaims_space(tmp_path, store):
    a = store.open_replica("vol-1", 0, 4 * MiB, 1, create=True)
    a.write(0, pattern(4 * MiB))
    store.open_replica("vol-1", 1, 4 * MiB, 1, create=True).write(0, pattern(MiB))
    store.open_replica("vol-2", 0, 4 * MiB, 1, create=True).write(0, pattern(MiB))
    store.sync_all()
    used = store.usage()["used_bytes"]
    assert used >= 6 * MiB
    store.delete_replica("vol-1", 0)
    assert not a.path.exists() and not a.crc_path.exists()
    assert store.get("vol-1", 0) is None
    assert used - store.usage()["used_bytes"] >= 4 * MiB
    assert a.closed
    with pytest.raises(ValueError, match="closed"):
        a.read(0, 1)
    store.delete_replica("vol-1", 0)  # idempotent
    store.delete_volume("vol-1")
    assert not (tmp_path / "disk0" / "replicas" / "vol-1").exists()
    assert [(m.volume, m.index) for m in store.replicas()] == [("vol-2", 0)]
    assert store.usage()["used_bytes"] < 2 * MiB
    # A deleted replica can be created afresh, empty.
    b = store.open_replica("vol-1", 0, SMALL, 2, create=True)
    assert b.read(0, SMALL) == bytes(SMALL)


def test_crash_leftovers_are_swept(tmp_path):
    with DiskStore(tmp_path, "d") as s:
        s.open_replica("vol-1", 0, SMALL, 1, create=True).write(0, b"keep")
    d = tmp_path / "replicas" / "vol-1"
    for name in ("1.data", "1.crc", "0.meta.tmp"):  # a create that never committed, a torn meta update
        (d / name).write_bytes(b"x")
    (tmp_path / "replicas" / "vol-2").mkdir()
    (tmp_path / "replicas" / "vol-2" / "0.data").write_bytes(b"x")
    with DiskStore(tmp_path, "d") as s:
        assert sorted(p.name for p in d.iterdir()) == ["0.crc", "0.data", "0.meta"]
        assert not (tmp_path / "replicas" / "vol-2").exists()
        assert s.get("vol-1", 0).read(0, 4) == b"keep"


@pytest.mark.parametrize("volume", ["", "Vol", "../etc", "a/b", "a.b", "-a", "a-", "a" * 64, "vol\x00", 7])
def test_invalid_volume_names_rejected(store, volume):
    with pytest.raises(ValueError):
        store.open_replica(volume, 0, SMALL, 1, create=True)
    with pytest.raises(ValueError):
        store.get(volume, 0)
    with pytest.raises(ValueError):
        store.delete_volume(volume)
    assert store.replicas() == []


def test_invalid_arguments_rejected(store, rf):
    store.open_replica("a" * 63, 0, SMALL, 1, create=True)  # longest valid name
    for bad in [dict(index=-1), dict(index=True), dict(extent_size=0), dict(extent_size=SMALL + 512),
                dict(generation=-1)]:
        args = dict(volume="vol-1", index=0, extent_size=SMALL, generation=1, create=True) | bad
        with pytest.raises(ValueError):
            store.open_replica(**args)
    for offset, length in [(-1, 1), (0, SMALL + 1), (SMALL, 1), (SMALL + 1, 0), (10, -1)]:
        with pytest.raises(ValueError):
            rf.read(offset, length)
        if length >= 0:
            with pytest.raises(ValueError):
                rf.write(offset, bytes(length))
        with pytest.raises(ValueError):
            rf.write_zeroes(offset, length)
        with pytest.raises(ValueError):
            rf.trim(offset, length)
        with pytest.raises(ValueError):
            rf.allocation(offset, length)
    with pytest.raises(ValueError):
        rf.readinto(SMALL - 1, memoryview(bytearray(2)))
    with pytest.raises(TypeError):
        rf.readinto(0, memoryview(b"read-only"))
    assert rf.read(0, SMALL) == bytes(SMALL)  # nothing was written


def test_lru_eviction_keeps_data(tmp_path, fdatasyncs):
    with DiskStore(tmp_path, "d", max_open_replicas=2) as s:
        handles = [s.open_replica("vol-1", i, SMALL, 1, create=True) for i in range(2)]
        for i, h in enumerate(handles):
            h.write(i * BLOCK + 1, pattern(BLOCK, seed=i))
        assert fdatasyncs == []
        handles.append(s.open_replica("vol-1", 2, SMALL, 1, create=True))
        handles[2].write(0, b"third")
        # The least recently used replica was synced, then its files closed.
        first = handles[0]
        assert fdatasyncs == [os.stat(first.path).st_ino, os.stat(first.crc_path).st_ino]
        assert not first.dirty

        def open_data_files():
            return sorted(p for p in open_paths() if p.endswith(".data") and str(tmp_path) in p)

        assert open_data_files() == sorted(str(h.path) for h in handles[1:])
        # A held reference keeps working: it reopens (evicting the next LRU one) with its data.
        assert first.read(1, BLOCK) == pattern(BLOCK, seed=0)
        assert s.get("vol-1", 0) is first
        assert open_data_files() == sorted(str(h.path) for h in (handles[0], handles[2]))
        for i, h in enumerate(handles[:2]):
            assert h.read(i * BLOCK + 1, BLOCK) == pattern(BLOCK, seed=i)
        assert len(open_data_files()) == 2
    assert not [p for p in open_paths() if str(tmp_path) in p]


def test_usage_numbers(tmp_path):
    with DiskStore(tmp_path / "a", "a") as s:
        vfs = os.statvfs(tmp_path)
        u = s.usage()
        assert u["capacity_bytes"] == vfs.f_blocks * vfs.f_frsize  # 0: the whole filesystem
        assert u["used_bytes"] == 0
        assert 0 < u["free_bytes"] <= vfs.f_bavail * vfs.f_frsize
    with DiskStore(tmp_path / "b", "b", capacity_bytes=8 * MiB) as s:
        r = s.open_replica("vol-1", 0, 64 * MiB, 1, create=True)
        r.write(0, pattern(3 * MiB))
        s.sync_all()
        u = s.usage()
        files = [r.path, r.crc_path, r.path.with_suffix(".meta")]
        assert u["used_bytes"] == sum(os.stat(p).st_blocks * 512 for p in files)
        assert 3 * MiB <= u["used_bytes"] < 3 * MiB + 64 * 1024
        assert u == {"capacity_bytes": 8 * MiB, "used_bytes": u["used_bytes"],
                     "free_bytes": 8 * MiB - u["used_bytes"]}
        r.write(3 * MiB, pattern(6 * MiB))  # thin: more than the capacity can be written
        assert s.usage()["free_bytes"] == 0
        s.open_replica("vol-2", 3, SMALL, 1, create=True)
        assert s.replica_allocations() == {("vol-1", 0): r.allocated_bytes(), ("vol-2", 3): 0}
        assert r.allocated_bytes() >= 9 * MiB


def test_closed_store_refuses_use(tmp_path):
    s = DiskStore(tmp_path, "d")
    r = s.open_replica("vol-1", 0, SMALL, 1, create=True)
    r.write(0, b"x")
    s.close()
    assert r.closed and not r.dirty
    with pytest.raises(ValueError):
        s.get("vol-1", 0)
    with pytest.raises(ValueError):
        r.write(0, b"y")
    s.close()  # idempotent


def test_standalone_replica_file(tmp_path):
    """ReplicaFile without a DiskStore: create, reopen, and close being final."""
    meta = ReplicaMeta("vol-1", 0, SMALL, 1)
    with ReplicaFile.create(tmp_path / "0.data", meta) as r:
        r.write(10, b"standalone")
        assert r.dirty
    assert r.closed and not r.dirty
    with pytest.raises(ValueError, match="closed"):
        r.read(0, 1)
    with ReplicaFile(tmp_path / "0.data", meta) as again:
        assert again.read(0, 20) == bytes(10) + b"standalone"
    with pytest.raises(ValueError):
        ReplicaFile(tmp_path / "0.data", ReplicaMeta("../x", 0, SMALL, 1))
    with pytest.raises(OSError):  # the files do not match the extent size
        ReplicaFile(tmp_path / "0.data", ReplicaMeta("vol-1", 0, 2 * SMALL, 1))
