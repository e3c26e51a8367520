"""On-disk store of extent replicas: one directory per local disk, two files per replica.

A replicated volume is cut into extents (``braid.extents``, default 64 MiB); each
extent has 2-3 replicas on distinct nodes, and each replica lives on one local
disk of a storage daemon as

    <root>/braid-disk.json                      disk id, creation time, format version
    <root>/replicas/<volume>/<index>.data       the extent's bytes: a sparse file of exactly
                                                extent_size bytes, holes where never written
    <root>/replicas/<volume>/<index>.crc        sidecar: one CRC32C (4 bytes, little-endian)
                                                per 4 KiB block of .data; 0 = "zero block"
    <root>/replicas/<volume>/<index>.meta       JSON of ReplicaMeta, replaced atomically

``<volume>`` is the volume's uid (a DNS-label-like name, checked here so that no
name can escape the directory). The ``.meta`` file is the commit point of a
replica: it is written (atomically, durably) after the data and crc files exist,
and removed first on delete, so a crash in the middle of either leaves only
orphaned ``.data``/``.crc`` files that the next DiskStore sweeps away.

Checksums
---------
Every 4 KiB block has a CRC32C in the sidecar, kept in memory as ``array('I')``
while the replica is open and written through with ``pwrite`` of exactly the
changed slice. A stored 0 means "never written, or zeroed": such a block must
read back as zeros. Reads verify every block they cover (the crc matches, or the
stored value is 0 and the block is all zeros) and raise ChecksumError, an EIO
OSError naming the replica and the first bad block, on a mismatch. Unaligned
writes read-modify-write their boundary blocks, and verify them first: a
corrupt block is never silently re-checksummed, so a write that only partly
covers a bad block fails with ChecksumError too (a full-block write repairs it).

Durability and crashes
----------------------
``write()`` only reaches the page cache (data ``pwrite``, then crc ``pwrite``);
``sync()`` makes everything written before it durable (``fdatasync`` of the data
file, then of the sidecar). This is the contract of a disk with a volatile write
cache, which is what the NBD client above us expects: writes not covered by a
completed flush may be lost.

After a crash with unsynced writes, each block touched since the last sync is in
one of three states: the old data with its old crc, the new data with its new
crc, or data and crc out of step (the kernel wrote back one file and not the
other, or a torn block). The first two read back fine (old or new, both allowed
for an unflushed write); the third fails verification, so ``read`` raises
ChecksumError and the storage daemon reads that block from a peer replica
instead. Repairing such blocks (rewriting them from a peer) is the scrubber's
job (next issue). We accept this instead of journaling data+crc together
(double writes) or ordering them with an extra ``fdatasync`` per write because
the mismatch window only exists for writes the client has not flushed, it is
always detected, never returned as data, and the replicas provide the good copy;
meanwhile the hot path stays at two page-cache ``pwrite`` calls. (Replicas may
also disagree old-vs-new on unflushed blocks after a crash; resynchronising
them is the replication layer's business, not this store's.)

An ``fdatasync`` that fails is sticky: Linux may drop the dirty pages it could
not write, so later calls would "succeed" without the data. Every later
``sync()`` of that replica raises, and the storage daemon must treat the
replica as failed.

Threads
-------
The storage daemon calls read/write/write_zeroes/trim/allocation from its event
loop thread (page-cache I/O, a few microseconds) and ``sync()`` from a worker
thread, possibly while the loop thread keeps writing other ranges. Only one
thread at a time does I/O on a ReplicaFile; ``sync()`` never blocks it. DiskStore
methods are thread-safe. Creating, deleting replicas and ``set_generation``
fsync, so call them from a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import sys
import threading
import uuid
from array import array
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from crc32c import crc32c

log = logging.getLogger("braid.extent_store")

BLOCK = 4096
_SHIFT = 12
_MASK = BLOCK - 1
assert 1 << _SHIFT == BLOCK

FORMAT_VERSION = 1
LABEL_FILE = "braid-disk.json"
REPLICAS_DIR = "replicas"
DEFAULT_MAX_OPEN_REPLICAS = 1024

# Same rule as API object names (braid.validation.NAME_RE), which volume uids also
# satisfy: lowercase letters, digits and '-', 1-63 chars, alphanumeric at both ends.
# It admits no '/', '.' or NUL, so a name is always exactly one path component.
VOLUME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

# The sidecar is the in-memory array('I') written as-is: 4-byte little-endian words.
if array("I").itemsize != 4 or sys.byteorder != "little":  # pragma: no cover - not a Braid target
    raise ImportError("extent_store needs a little-endian host with a 4-byte C unsigned int")

_U32 = struct.Struct("<I")            # one sidecar entry
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CRC = crc32c(_ZERO_BLOCK)        # crc of an all-zero block (stored as 0 after zeroing)
_ZEROS = memoryview(bytes(1 << 20))   # source for writing zeros without allocating

# fallocate(2) modes (linux/falloc.h). Python's os.posix_fallocate takes no mode.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no dynamic libc
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:  # pragma: no cover - not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn  # a CDLL function: the GIL is released during the call


_libc_fallocate = _load_fallocate()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with ``mode``; False if the filesystem (or libc) does not support it."""
    if _libc_fallocate is None:
        return False
    while _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in _UNSUPPORTED:
            return False
        raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")
    return True


# --- errors and metadata -------------------------------------------------------------------------------


class ChecksumError(OSError):
    """A block of a replica failed its CRC32C check (errno EIO).

    ``path`` is the replica's data file and ``offset`` the byte offset, within the
    extent, of the first bad block. The storage daemon answers such a read from a
    peer replica."""

    def __init__(self, path: Path | str, offset: int, detail: str = "") -> None:
        self.path = Path(path)
        self.offset = offset
        self.detail = detail
        msg = f"checksum mismatch in block at offset {offset}" + (f" ({detail})" if detail else "")
        super().__init__(errno.EIO, msg, str(path))

    def __reduce__(self):  # keep (path, offset) when pickled across processes
        return type(self), (self.path, self.offset, self.detail)


@dataclass(frozen=True)
class ReplicaMeta:
    """What a replica is: extent ``index`` of ``volume`` (its uid), its size and generation.
    ``complete`` is False while a rebuild or resync fills it: only a complete replica
    holds all the data of its generation (a resync may start from it, see
    ``storage_daemon.changes``)."""

    volume: str
    index: int
    extent_size: int
    generation: int
    complete: bool = True

    def to_json(self) -> bytes:
        d = asdict(self)
        if self.complete:
            del d["complete"]   # (the form written before the field existed)
        return json.dumps(d, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> "ReplicaMeta":
        """Parse and validate; ValueError says what is wrong."""
        try:
            d = json.loads(raw)
            meta = cls(volume=d["volume"], index=d["index"], extent_size=d["extent_size"],
                       generation=d["generation"], complete=d.get("complete", True))
        except (ValueError, UnicodeDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"not a replica meta record: {exc!r}") from None
        meta.validate()
        return meta

    def validate(self) -> None:
        _check_volume(self.volume)
        _check_uint("index", self.index)
        _check_extent_size(self.extent_size)
        _check_uint("generation", self.generation)
        if not isinstance(self.complete, bool):
            raise ValueError(f"complete must be true or false, not {self.complete!r}")


_FICLONE = 0x40049409   # linux/fs.h


def _copy_sparse(src: Path, dst: Path, size: int) -> None:
    """Copy ``src`` into a new ``dst`` of ``size`` bytes and fsync it: a
    reflink where the filesystem has them, else the allocated ranges only
    (holes stay holes)."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:   # a reflink (XFS, btrfs): shares the blocks, copies nothing
                fcntl.ioctl(dfd, _FICLONE, sfd)
                os.ftruncate(dfd, size)
                os.fsync(dfd)
                return
            except OSError:
                pass
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:   # only a hole after pos
                        break
                    raise
                end = min(size, os.lseek(sfd, start, os.SEEK_HOLE))
                off = start
                while off < end:
                    try:
                        n = os.copy_file_range(sfd, dfd, end - off, off, off)
                    except OSError as exc:
                        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        n = os.pwrite(dfd, os.pread(sfd, min(end - off, 1 << 20), off), off)
                    if n <= 0:
                        raise OSError(errno.EIO, f"short copy of {src} at {off}")
                    off += n
                pos = end
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _check_uint(what: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer (got {value!r})")


def _check_volume(volume: str) -> None:
    if not isinstance(volume, str) or not VOLUME_RE.match(volume):
        raise ValueError(f"invalid volume name {str(volume)[:80]!r}: lowercase letters, digits and '-', "
                         "1-63 chars, starting and ending alphanumeric")


def _check_extent_size(size: int) -> None:
    _check_uint("extent_size", size)
    if size == 0 or size & _MASK:
        raise ValueError(f"extent_size must be a positive multiple of {BLOCK} (got {size})")


def _byte_view(data, writable: bool = False) -> memoryview:
    """A flat unsigned-byte memoryview of ``data`` (no copy)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.ndim != 1 or mv.format != "B" or not mv.c_contiguous:
        mv = mv.cast("B")  # TypeError for non-contiguous buffers, which pwrite could not take either
    if writable and mv.readonly:
        raise TypeError("readinto needs a writable buffer")
    return mv


# --- vectored I/O that finishes the job -----------------------------------------------------------------


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    """``bufs`` without its first ``done`` bytes."""
    out = []
    for b in bufs:
        if done >= len(b):
            done -= len(b)
        else:
            out.append(b[done:])
            done = 0
    return out


def _preadv_all(fd: int, bufs: list[memoryview], offset: int, want: int) -> int:
    """Fill ``bufs`` (``want`` bytes in all) from ``offset``; returns the bytes read,
    fewer than ``want`` only at end of file."""
    got = os.preadv(fd, bufs, offset)
    total = got
    while got and total < want:  # short reads of regular files: signals, or EOF
        got = os.preadv(fd, _advance(bufs, total), offset + total)
        total += got
    return total


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int, done: int = -1) -> None:
    """Write all of ``bufs`` at ``offset`` (``done`` bytes of them already written)."""
    want = sum(map(len, bufs))
    if done < 0:
        done = os.pwritev(fd, bufs, offset)
    while done < want:  # partial write: retry the rest, which raises the real error (ENOSPC...)
        n = os.pwritev(fd, _advance(bufs, done), offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"pwrite made no progress at offset {offset + done}")
        done += n


def _pwrite_all(fd: int, buf: memoryview | bytes, offset: int) -> None:
    """Write all of the byte buffer ``buf`` at ``offset`` (one pwrite in the normal case)."""
    n = os.pwrite(fd, buf, offset)
    if n != len(buf):
        _pwritev_all(fd, [memoryview(buf)], offset, n)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    while length:
        n = min(length, len(_ZEROS))
        _pwrite_all(fd, _ZEROS[:n], offset)
        offset += n
        length -= n


def _zero_file_range(fd: int, offset: int, length: int, punch: bool) -> None:
    """Make [offset, offset+length) of a file read as zeros.

    The whole 4 KiB pages inside are punched out (``punch``) or zeroed in place with
    FALLOC_FL_ZERO_RANGE (keeps the allocation); partial pages at the edges, and
    everything on filesystems without those modes, get zeros written."""
    lo = (offset + _MASK) & ~_MASK
    hi = (offset + length) & ~_MASK
    if lo >= hi:
        _write_zeros(fd, offset, length)
        return
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if punch else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
    if not _fallocate(fd, mode, lo, hi - lo):
        _write_zeros(fd, lo, hi - lo)
    if offset < lo:
        _write_zeros(fd, offset, lo - offset)
    if hi < offset + length:
        _write_zeros(fd, hi, offset + length - hi)


# --- one replica ----------------------------------------------------------------------------------------

_OPEN, _RELEASED, _CLOSED = "open", "released", "closed"


class ReplicaFile:
    """One extent replica: a sparse data file (thin: holes for never-written ranges) and
    a sidecar of one CRC32C per 4 KiB block (4 bytes/block, loaded into memory as
    array('I'), written through with pwrite of the changed slice). A stored 0 means
    "never written / zero": such a block must read back as zeros.

    ``path`` is the data file, ``size`` the extent size. Offsets and lengths must lie
    within [0, size] (ValueError otherwise); reads and writes need no alignment.

    A DiskStore may *release* a replica it has not used for a while (sync, close the
    fds, drop the crc array) to bound open files and memory; the next I/O call reopens
    it transparently. ``close()`` is final: I/O afterwards raises ValueError.
    """

    def __init__(self, path: Path | str, meta: ReplicaMeta, *,
                 on_reopen: Callable[["ReplicaFile"], None] | None = None) -> None:
        """Open an existing replica (its ``.data`` file at ``path`` and ``.crc`` beside it).
        ``on_reopen`` is called (under the I/O lock) after a released replica reopens."""
        meta.validate()
        self.path = Path(path)
        self.crc_path = self.path.with_suffix(".crc")
        self.meta = meta
        self.size = meta.extent_size
        self._nblocks = self.size >> _SHIFT
        self._on_reopen = on_reopen
        # _io_lock: held by every I/O call and by release/close, so fds never close under I/O.
        # _sync_lock: held by sync() and release/close, never by read/write, so the loop thread
        # keeps writing while a worker waits in fdatasync. Order: _io_lock before _sync_lock.
        self._io_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._data_fd = -1
        self._crc_fd = -1
        self._crcs = array("I")
        self._state = _RELEASED
        self._epoch = 0              # bumped on every open; eviction closes only the epoch it chose
        self._dirty = False          # set (after the pwrites) by writers, cleared only by sync
        self._sync_error: OSError | None = None
        self._open_files()

    @classmethod
    def create(cls, path: Path | str, meta: ReplicaMeta, *,
               on_reopen: Callable[["ReplicaFile"], None] | None = None) -> "ReplicaFile":
        """Create (or truncate) the data and crc files of a new, all-zero replica: both
        sparse, sized and fsynced. Writing the ``.meta`` commit record is the caller's job."""
        meta.validate()
        path = Path(path)
        for p, size in ((path, meta.extent_size), (path.with_suffix(".crc"), meta.extent_size >> _SHIFT << 2)):
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        return cls(path, meta, on_reopen=on_reopen)

    def __enter__(self) -> "ReplicaFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.meta
        return f"<ReplicaFile {m.volume}/{m.index} gen={m.generation} {self._state} {self.path}>"

    # -- open / release / close

    def _open_files(self) -> None:
        data_fd = crc_fd = -1
        try:
            data_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            crc_fd = os.open(self.crc_path, os.O_RDWR | os.O_CLOEXEC)
            for fd, p, want in ((data_fd, self.path, self.size), (crc_fd, self.crc_path, self._nblocks * 4)):
                have = os.fstat(fd).st_size
                if have != want:
                    raise OSError(errno.EIO, f"replica file is {have} bytes, expected {want}", str(p))
            crcs = array("I", [0]) * self._nblocks
            if _preadv_all(crc_fd, [memoryview(crcs).cast("B")], 0, self._nblocks * 4) != self._nblocks * 4:
                raise OSError(errno.EIO, "crc sidecar shrank while loading", str(self.crc_path))
        except BaseException:
            for fd in (data_fd, crc_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        self._data_fd, self._crc_fd, self._crcs = data_fd, crc_fd, crcs
        self._epoch += 1
        self._state = _OPEN

    def _ensure_open(self) -> None:
        """Reopen a released replica (caller holds _io_lock)."""
        if self._state is _CLOSED:
            raise ValueError(f"I/O on closed replica {self.path}")
        self._open_files()
        if self._on_reopen is not None:
            self._on_reopen(self)

    def _close_fds(self) -> None:
        fds, self._data_fd, self._crc_fd = (self._data_fd, self._crc_fd), -1, -1
        self._crcs = array("I")
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _release(self, epoch: int) -> None:
        """Sync and close the fds, keeping the object usable (DiskStore eviction).
        Does nothing unless still open in ``epoch``. A failed sync is logged here and
        stays sticky, so the next sync() reports it."""
        with self._io_lock:
            if self._state is not _OPEN or self._epoch != epoch:
                return
            with self._sync_lock:
                try:
                    self._sync_locked()
                except OSError as exc:
                    log.error("sync of %s before closing it failed: %s", self.path, exc)
                finally:
                    self._close_fds()
                    self._state = _RELEASED

    def close(self) -> None:
        """Sync (if dirty) and close for good; raises the sync error, if any, after closing."""
        with self._io_lock, self._sync_lock:
            if self._state is _CLOSED:
                return
            try:
                self._sync_locked()
            finally:
                self._close_fds()
                self._state = _CLOSED

    def _discard(self) -> None:
        """Close for good without syncing: the replica is being deleted."""
        with self._io_lock, self._sync_lock:
            self._close_fds()
            self._state = _CLOSED

    @property
    def closed(self) -> bool:
        return self._state is _CLOSED

    # -- durability

    @property
    def dirty(self) -> bool:
        """Written since the last successful sync."""
        return self._dirty

    def sync(self) -> None:
        """Make every write that completed before this call durable: fdatasync the data
        file, then the crc sidecar. Free when nothing was written since the last sync.
        Safe to call from another thread while the I/O thread keeps writing."""
        with self._sync_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._sync_error is not None:
            e = self._sync_error
            raise OSError(e.errno, f"an earlier fdatasync failed ({e.strerror}); writes may have been lost",
                          str(self.path))
        if self._state is not _OPEN or not self._dirty:
            return
        # Clear before flushing: a write that lands after this point sets the flag again and
        # is covered by the next sync; one that completed before it is covered by this one.
        self._dirty = False
        try:
            os.fdatasync(self._data_fd)
            os.fdatasync(self._crc_fd)
        except OSError as exc:
            self._dirty = True
            self._sync_error = exc
            raise

    # -- reads

    def _check_range(self, offset: int, length: int) -> None:
        if (not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0
                or offset + length > self.size):
            raise ValueError(f"range offset={offset!r} length={length!r} is outside the extent "
                             f"[0, {self.size}] of {self.path}")

    def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes from ``offset``, every covered block verified (ChecksumError)."""
        self._check_range(offset, length)
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return buf

    def readinto(self, offset: int, buf) -> None:
        """Fill ``buf`` (any writable buffer) from ``offset``, verified, without extra copies:
        one preadv into ``buf`` itself, plus 4 KiB scratch blocks for unaligned edges."""
        mv = _byte_view(buf, writable=True)
        n = len(mv)
        self._check_range(offset, n)
        if n == 0:
            return
        with self._io_lock:
            if self._state is not _OPEN:
                self._ensure_open()
            end = offset + n
            start = offset & ~_MASK                   # the covered blocks: [start, stop)
            stop = (end + _MASK) & ~_MASK
            if start == offset and stop == end:       # aligned: straight into the caller's buffer
                self._pread_verified([mv], start)
                return
            head = tail = None
            segs: list[memoryview] = []
            if offset != start or stop - start == BLOCK:
                head = memoryview(bytearray(BLOCK))
                segs.append(head)
            mid_lo = start + BLOCK if head is not None else offset
            mid_hi = end if end == stop else stop - BLOCK
            if mid_hi > mid_lo:
                segs.append(mv[mid_lo - offset:mid_hi - offset])
            if end != stop and stop - start > BLOCK:
                tail = memoryview(bytearray(BLOCK))
                segs.append(tail)
            self._pread_verified(segs, start)
            if head is not None:
                k = min(end, start + BLOCK) - offset
                mv[:k] = head[offset - start:offset - start + k]
            if tail is not None:
                tail_at = stop - BLOCK
                mv[tail_at - offset:] = tail[:end - tail_at]

    def _pread_verified(self, segs: list[memoryview], offset: int) -> None:
        """preadv block-aligned ``segs`` at ``offset`` and verify them (caller holds _io_lock)."""
        want = len(segs[0]) if len(segs) == 1 else sum(map(len, segs))
        got = _preadv_all(self._data_fd, segs, offset, want)
        if got != want:  # the file was truncated behind our back
            raise ChecksumError(self.path, (offset + got) & ~_MASK, "data file is short")
        block = offset >> _SHIFT
        for seg in segs:
            self._verify(seg, block)
            block += len(seg) >> _SHIFT

    def _verify(self, seg: memoryview, block: int) -> None:
        """Check the crcs of the whole blocks in ``seg``, the first being block number ``block``."""
        crcs = self._crcs
        if len(seg) == BLOCK:  # the 4 KiB random-I/O case, without the list
            c = crc32c(seg)
            s = crcs[block]
            if c != s and not (s == 0 and c == _ZERO_CRC and bytes(seg) == _ZERO_BLOCK):
                raise ChecksumError(self.path, block << _SHIFT)
            return
        computed = [crc32c(seg[i:i + BLOCK]) for i in range(0, len(seg), BLOCK)]
        stored = crcs[block:block + len(computed)].tolist()
        if computed == stored:
            return
        for i, (c, s) in enumerate(zip(computed, stored)):   # never-written blocks, or a bad one
            if c != s and not (s == 0 and c == _ZERO_CRC
                               and bytes(seg[i << _SHIFT:(i + 1) << _SHIFT]) == _ZERO_BLOCK):
                raise ChecksumError(self.path, (block + i) << _SHIFT)

    # -- writes

    def write(self, offset: int, data) -> None:
        """Write ``data`` (any bytes-like; a memoryview avoids copies) at ``offset``.

        One pwrite/pwritev of the data (aligned part straight from ``data``; partial
        boundary blocks are read, verified and patched), then one pwrite of the changed
        crc slice. The in-memory crcs change only after both succeed, so a failed write
        leaves the touched blocks failing verification rather than looking valid."""
        mv = _byte_view(data)
        n = len(mv)
        self._check_range(offset, n)
        if n == 0:
            return
        with self._io_lock:
            if self._state is not _OPEN:
                self._ensure_open()
            self._write_locked(offset, mv)

    def _write_locked(self, offset: int, mv: memoryview) -> None:
        n = len(mv)
        end = offset + n
        start = offset & ~_MASK
        stop = (end + _MASK) & ~_MASK
        if start == offset and stop == end:
            segs = [mv]
        elif stop - start == BLOCK:                     # inside one block
            blk = self._read_block(start)
            blk[offset - start:end - start] = mv
            segs = [memoryview(blk)]
        else:
            segs = []
            lo = offset
            if offset != start:
                head = self._read_block(start)
                lo = start + BLOCK
                head[offset - start:] = mv[:lo - offset]
                segs.append(memoryview(head))
            hi = end if end == stop else stop - BLOCK
            if hi > lo:
                segs.append(mv[lo - offset:hi - offset])
            if end != stop:
                tail = self._read_block(hi)
                tail[:end - hi] = mv[hi - offset:]
                segs.append(memoryview(tail))
        first = start >> _SHIFT
        try:
            if len(segs) == 1 and len(segs[0]) == BLOCK:  # one block: the 4 KiB random-write case
                c = crc32c(segs[0])
                _pwrite_all(self._data_fd, segs[0], start)
                _pwrite_all(self._crc_fd, _U32.pack(c), first << 2)
                self._crcs[first] = c
                return
            new = array("I", [crc32c(s[i:i + BLOCK]) for s in segs for i in range(0, len(s), BLOCK)])
            if len(segs) == 1:
                _pwrite_all(self._data_fd, segs[0], start)
            else:
                _pwritev_all(self._data_fd, segs, start)
            _pwrite_all(self._crc_fd, memoryview(new).cast("B"), first << 2)
            self._crcs[first:first + len(new)] = new
        finally:
            self._dirty = True  # even a failed write may have dirtied pages; sync surfaces their errors

    def _read_block(self, at: int) -> bytearray:
        """The verified content of the block at ``at``, for read-modify-write."""
        blk = bytearray(BLOCK)
        self._pread_verified([memoryview(blk)], at)
        return blk

    def write_zeroes(self, offset: int, length: int, punch: bool = True) -> None:
        """Make [offset, offset+length) read as zeros. Whole blocks are punched out
        (``punch``; thin again) or zeroed in place keeping their allocation (``punch=False``,
        NBD's NO_HOLE), and their crcs set to 0; partial edge blocks get zeros written."""
        self._check_range(offset, length)
        if length == 0:
            return
        with self._io_lock:
            if self._state is not _OPEN:
                self._ensure_open()
            end = offset + length
            lo = (offset + _MASK) & ~_MASK     # the whole blocks inside: [lo, hi)
            hi = end & ~_MASK
            if lo >= hi:
                self._write_locked(offset, _ZEROS[:length])
                return
            self._zero_blocks(lo, hi, punch)
            if offset < lo:
                self._write_locked(offset, _ZEROS[:lo - offset])
            if hi < end:
                self._write_locked(hi, _ZEROS[:end - hi])

    def trim(self, offset: int, length: int) -> None:
        """Advisory discard: punch out the whole aligned blocks inside the range (they then
        read as zeros); partial edge blocks are left alone, and so is everything on a
        filesystem that cannot punch holes."""
        self._check_range(offset, length)
        lo = (offset + _MASK) & ~_MASK
        hi = (offset + length) & ~_MASK
        if lo >= hi:
            return
        with self._io_lock:
            if self._state is not _OPEN:
                self._ensure_open()
            try:
                punched = _fallocate(self._data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, lo, hi - lo)
            except OSError:
                self._dirty = True
                raise
            if punched:
                self._set_zero_crcs(lo >> _SHIFT, hi >> _SHIFT, punch=True)

    def _zero_blocks(self, lo: int, hi: int, punch: bool) -> None:
        try:
            _zero_file_range(self._data_fd, lo, hi - lo, punch)
        except OSError:
            self._dirty = True  # partly zeroed: those blocks now fail verification, not read as stale
            raise
        self._set_zero_crcs(lo >> _SHIFT, hi >> _SHIFT, punch)

    def _set_zero_crcs(self, first: int, last: int, punch: bool) -> None:
        """Store crc 0 ("zero block") for blocks [first, last), punching the sidecar's whole
        pages too so a trimmed extent gives its crc space back as well."""
        try:
            _zero_file_range(self._crc_fd, first << 2, (last - first) << 2, punch)
            self._crcs[first:last] = array("I", [0]) * (last - first)
        finally:
            self._dirty = True

    # -- allocation

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """The data file's allocation over [offset, offset+length) as ``(start, length,
        allocated)`` runs in order, from lseek SEEK_DATA/SEEK_HOLE (filesystem granularity;
        a filesystem without hole tracking reports everything allocated). Holes read as
        zeros; allocated ranges may hold zeros too."""
        self._check_range(offset, length)
        end = offset + length
        runs: list[tuple[int, int, bool]] = []

        def add(lo: int, hi: int, allocated: bool) -> None:
            if hi <= lo:
                return
            if runs and runs[-1][2] == allocated and runs[-1][0] + runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi - runs[-1][0], allocated)
            else:
                runs.append((lo, hi - lo, allocated))

        with self._io_lock:
            if self._state is not _OPEN:
                self._ensure_open()
            pos = offset
            while pos < end:
                try:
                    data = os.lseek(self._data_fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: only a hole from pos to EOF
                        raise
                    data = end
                add(pos, min(data, end), False)
                if data >= end:
                    break
                hole = os.lseek(self._data_fd, data, os.SEEK_HOLE)
                add(data, min(hole, end), True)
                pos = hole
        return runs

    def chunk_digests(self, chunk: int) -> list[bytes]:
        """One 8-byte digest per ``chunk`` bytes (a multiple of 4 KiB) of the block
        checksums: two replicas whose digests of a chunk differ differ there (a resync
        compares them; see ``storage_daemon.changes``)."""
        if chunk <= 0 or chunk % BLOCK:
            raise ValueError(f"chunk must be a positive multiple of {BLOCK}, not {chunk}")
        per = chunk >> _SHIFT
        with self._io_lock:
            if self._state is not _OPEN:
                self._ensure_open()
            raw = memoryview(self._crcs).cast("B")
            return [_digest(raw[i * 4:(i + per) * 4]) for i in range(0, self._nblocks, per)]

    def allocated_bytes(self) -> int:
        """Bytes the data file occupies on disk (st_blocks * 512)."""
        with self._io_lock:
            st = os.fstat(self._data_fd) if self._state is _OPEN else os.stat(self.path)
        return st.st_blocks * 512


def _digest(crcs) -> bytes:
    return hashlib.blake2b(crcs, digest_size=8).digest()


def blank_digests(size: int, chunk: int) -> list[bytes]:
    """``ReplicaFile.chunk_digests`` of a replica of ``size`` bytes never written."""
    per, nblocks = chunk >> _SHIFT, size >> _SHIFT
    return [_digest(bytes(min(per, nblocks - i) * 4)) for i in range(0, nblocks, per)]


# --- one disk -------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` durably: write a temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _pwrite_all(fd, content, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _index_of(stem: str) -> int | None:
    """``"12"`` -> 12; None for anything but a canonical decimal."""
    return int(stem) if stem.isdigit() and stem.isascii() and str(int(stem)) == stem else None


class DiskStore:
    """One local disk (a directory) of a storage daemon. Layout: <root>/braid-disk.json
    (disk id, created, format version), <root>/replicas/<volume>/<index>.data, .crc,
    .meta (JSON of ReplicaMeta, replaced atomically: write tmp, fsync, rename, fsync dir).

    Each replica has one ReplicaFile for the life of the store; at most
    ``max_open_replicas`` of them hold open fds and crc arrays (least recently used
    are synced and released; they reopen on their next I/O). The directory is
    flock()ed: a second DiskStore on the same root fails with EBUSY.
    """

    def __init__(self, root: Path | str, name: str, capacity_bytes: int = 0, *,
                 max_open_replicas: int = DEFAULT_MAX_OPEN_REPLICAS) -> None:
        """Open the disk at ``root``, creating its layout if needed. ``capacity_bytes``
        is how much of the filesystem Braid may use (0: all of it)."""
        _check_uint("capacity_bytes", capacity_bytes)
        if max_open_replicas < 1:
            raise ValueError("max_open_replicas must be at least 1")
        self.root = Path(root)
        self.name = name
        self._max_open = max_open_replicas
        if not self.root.is_dir():
            self.root.mkdir(parents=True)
            _fsync_dir(self.root.parent)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(self._root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(errno.EBUSY, "disk is in use by another DiskStore", str(self.root)) from None
            self._replicas = self.root / REPLICAS_DIR
            if not self._replicas.is_dir():
                self._replicas.mkdir()
                os.fsync(self._root_fd)
            self.disk_id, self.created = self._load_label()
            vfs = os.statvfs(self.root)
            self.capacity_bytes = capacity_bytes or vfs.f_blocks * vfs.f_frsize
            self._lock = threading.Lock()  # guards _handles/_lru/_closed; never held during I/O
            # Per-replica serialisation of create/open/set_generation/delete (which fsync),
            # striped so it needs no per-replica bookkeeping.
            self._stripes = [threading.Lock() for _ in range(64)]
            self._handles: dict[tuple[str, int], ReplicaFile] = {}
            self._lru: OrderedDict[tuple[str, int], ReplicaFile] = OrderedDict()  # those with open fds
            self._closed = False
            self._sweep()
        except BaseException:
            os.close(self._root_fd)
            raise

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DiskStore {self.name} {self.disk_id} {self.root}>"

    # -- layout

    def _load_label(self) -> tuple[str, str]:
        label = self.root / LABEL_FILE
        try:
            raw = label.read_bytes()
        except FileNotFoundError:
            d = {"disk_id": str(uuid.uuid4()), "format_version": FORMAT_VERSION,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            _atomic_write(label, json.dumps(d, sort_keys=True).encode() + b"\n")
            log.info("initialised disk %s at %s (id %s)", self.name, self.root, d["disk_id"])
            return d["disk_id"], d["created"]
        try:
            d = json.loads(raw)
            disk_id, version, created = d["disk_id"], d["format_version"], d["created"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"{label} is not a Braid disk label: {exc!r}") from None
        if version != FORMAT_VERSION:
            raise ValueError(f"{label}: disk format version {version!r}, this Braid reads {FORMAT_VERSION}")
        return disk_id, created

    def _sweep(self) -> None:
        """Remove what a crash can leave behind: temp files, and data/crc files without a
        .meta (a create or delete that did not finish), then empty volume directories."""
        for vol in os.scandir(self._replicas):
            if not vol.is_dir(follow_symlinks=False) or not VOLUME_RE.match(vol.name):
                log.warning("disk %s: ignoring unexpected %s", self.name, vol.path)
                continue
            names = os.listdir(vol.path)
            committed = {n[:-5] for n in names if n.endswith(".meta")}
            for n in names:
                stem, _, ext = n.partition(".")
                if ext == "meta.tmp" or (ext in ("data", "crc") and stem not in committed):
                    log.info("disk %s: removing leftover %s/%s", self.name, vol.name, n)
                    os.unlink(os.path.join(vol.path, n))
            self._rmdir_if_empty(Path(vol.path))

    def _rmdir_if_empty(self, d: Path) -> None:
        try:
            d.rmdir()
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return
            raise
        _fsync_dir(self._replicas)

    def _path(self, volume: str, index: int) -> Path:
        """The data file of a replica (validating the name: this is the traversal guard)."""
        _check_volume(volume)
        _check_uint("index", index)
        return self._replicas / volume / f"{index}.data"

    def _read_meta(self, volume: str, index: int) -> ReplicaMeta | None:
        p = self._path(volume, index).with_suffix(".meta")
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        meta = ReplicaMeta.from_json(raw)
        if (meta.volume, meta.index) != (volume, index):
            raise ValueError(f"{p} describes {meta.volume}/{meta.index}")
        return meta

    # -- the open-replica cache

    def _stripe(self, key: tuple[str, int]) -> threading.Lock:
        return self._stripes[hash(key) % len(self._stripes)]

    def _cached(self, key: tuple[str, int]) -> ReplicaFile | None:
        with self._lock:
            if self._closed:
                raise ValueError(f"disk store {self.name} is closed")
            h = self._handles.get(key)
            if h is not None and key in self._lru:
                self._lru.move_to_end(key)
            return h

    def _register(self, h: ReplicaFile) -> None:
        key = (h.meta.volume, h.meta.index)
        with self._lock:
            closed = self._closed
            if not closed:
                self._handles[key] = h
                victims = self._track_open(key, h)
        if closed:  # close() ran while we were opening it
            h.close()
            raise ValueError(f"disk store {self.name} is closed")
        self._evict(victims)

    def _on_reopen(self, h: ReplicaFile) -> None:
        """A released replica reopened for I/O (called under its _io_lock)."""
        key = (h.meta.volume, h.meta.index)
        with self._lock:
            if self._handles.get(key) is not h:  # deleted meanwhile: not ours to track
                return
            victims = self._track_open(key, h)
        self._evict(victims)

    def _track_open(self, key: tuple[str, int], h: ReplicaFile) -> list[tuple[ReplicaFile, int]]:
        """Mark ``h`` most recently used; return the replicas to release (caller holds _lock)."""
        self._lru[key] = h
        self._lru.move_to_end(key)
        victims = []
        while len(self._lru) > self._max_open:
            _, v = self._lru.popitem(last=False)
            victims.append((v, v._epoch))
        return victims

    def _evict(self, victims: list[tuple[ReplicaFile, int]]) -> None:
        for v, epoch in victims:  # outside _lock: this syncs
            v._release(epoch)

    # -- replicas

    def open_replica(self, volume: str, index: int, extent_size: int, generation: int,
                     create: bool, complete: bool = True) -> ReplicaFile:
        """The replica's ReplicaFile, opening it if needed. With ``create``, a missing
        replica is created (thin, all zeros) with ``generation`` (and ``complete``:
        False for a copy about to be filled); without, it is
        FileNotFoundError. An existing replica keeps its stored generation (see
        ``.meta.generation``; change it with set_generation). ValueError if it exists
        with another extent_size."""
        path = self._path(volume, index)
        _check_extent_size(extent_size)
        _check_uint("generation", generation)
        key = (volume, index)
        h = self._cached(key)
        if h is None:
            with self._stripe(key):
                h = self._cached(key)
                if h is None:
                    meta = self._read_meta(volume, index)
                    if meta is not None:
                        h = ReplicaFile(path, meta, on_reopen=self._on_reopen)
                    elif create:
                        h = self._create(path, ReplicaMeta(volume, index, extent_size, generation,
                                                           complete))
                    else:
                        raise FileNotFoundError(errno.ENOENT, f"no replica {volume}/{index} on disk "
                                                f"{self.name}", str(path.with_suffix(".meta")))
                    self._register(h)
        if h.meta.extent_size != extent_size:
            raise ValueError(f"replica {volume}/{index} has extent_size {h.meta.extent_size}, "
                             f"not {extent_size}")
        return h

    def _create(self, path: Path, meta: ReplicaMeta) -> ReplicaFile:
        vol_dir = path.parent
        if not vol_dir.is_dir():
            vol_dir.mkdir(exist_ok=True)  # two extents of a volume may be created at once
            _fsync_dir(self._replicas)
        h = ReplicaFile.create(path, meta, on_reopen=self._on_reopen)
        try:
            _atomic_write(path.with_suffix(".meta"), meta.to_json())  # the commit point
        except BaseException:
            h._discard()
            raise
        log.info("disk %s: created replica %s/%s (%d bytes, generation %d)", self.name,
                 meta.volume, meta.index, meta.extent_size, meta.generation)
        return h

    def clone_replica(self, src: ReplicaFile, volume: str, index: int, generation: int) -> ReplicaFile:
        """Create replica ``volume``/``index`` on this disk as a copy of ``src``
        (a replica of this or another local disk, which nobody writes any more:
        the base of a snapshot or clone). Only the allocated ranges of the data
        file are copied (``copy_file_range``: in-kernel, no round trip through
        Python), then the checksum sidecar; both are fsynced before the
        ``.meta`` commit record is written, so a crash leaves either nothing or
        a complete copy. Returns the existing replica if there is one."""
        path = self._path(volume, index)
        _check_uint("generation", generation)
        key = (volume, index)
        with self._stripe(key):
            h = self._cached(key)
            if h is None and self._read_meta(volume, index) is None:
                vol_dir = path.parent
                if not vol_dir.is_dir():
                    vol_dir.mkdir(exist_ok=True)
                    _fsync_dir(self._replicas)
                src.sync()
                meta = ReplicaMeta(volume, index, src.size, generation)
                _copy_sparse(src.path, path, src.size)
                _copy_sparse(src.crc_path, path.with_suffix(".crc"), src.size >> _SHIFT << 2)
                try:
                    _atomic_write(path.with_suffix(".meta"), meta.to_json())   # the commit point
                except BaseException:
                    for p in (path, path.with_suffix(".crc")):
                        p.unlink(missing_ok=True)
                    raise
                log.info("disk %s: cloned replica %s/%s from %s", self.name, volume, index, src.path)
        return self.get(volume, index)

    def get(self, volume: str, index: int) -> ReplicaFile | None:
        """The replica's ReplicaFile if it exists on this disk, else None."""
        path = self._path(volume, index)
        key = (volume, index)
        h = self._cached(key)
        if h is not None:
            return h
        with self._stripe(key):
            h = self._cached(key)
            if h is None:
                meta = self._read_meta(volume, index)
                if meta is None:
                    return None
                h = ReplicaFile(path, meta, on_reopen=self._on_reopen)
                self._register(h)
        return h

    def drop_cache(self, volume: str, index: int) -> None:
        """Ask the kernel to drop the replica's cached pages (a copy kept for a later
        resync is not read meanwhile: it should cost no memory)."""
        path = self._path(volume, index)
        for p in (path, path.with_suffix(".crc")):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)   # (dirty pages are not dropped)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def set_generation(self, volume: str, index: int, generation: int) -> None:
        """Persist the replica's generation atomically and durably. Writes made before
        the call are synced first, so a replica never claims a generation its data
        has not reached."""
        _check_uint("generation", generation)
        self.set_meta(volume, index, generation=generation)

    def set_meta(self, volume: str, index: int, **changes) -> None:
        """Persist changed fields of the replica's meta (``generation``, ``complete``)
        atomically and durably, after syncing what was written before."""
        path = self._path(volume, index)
        key = (volume, index)
        with self._stripe(key):
            h = self._cached(key)
            if h is not None:
                h.sync()
                meta = h.meta
            else:
                meta = self._read_meta(volume, index)
                if meta is None:
                    raise FileNotFoundError(errno.ENOENT, f"no replica {volume}/{index} on disk {self.name}",
                                            str(path.with_suffix(".meta")))
            new = replace(meta, **changes)
            new.validate()
            _atomic_write(path.with_suffix(".meta"), new.to_json())
            if h is not None:
                h.meta = new

    def _indexes(self, volume: str) -> list[int]:
        """Indexes of the committed replicas (those with a .meta) of ``volume``."""
        try:
            names = os.listdir(self._replicas / volume)
        except FileNotFoundError:
            return []
        return sorted(i for n in names if n.endswith(".meta") and (i := _index_of(n[:-5])) is not None)

    def replicas(self) -> list[ReplicaMeta]:
        """Every replica on this disk (from the .meta files), sorted by volume and index."""
        out = []
        for volume in sorted(os.listdir(self._replicas)):
            if not VOLUME_RE.match(volume) or not (self._replicas / volume).is_dir():
                continue
            for index in self._indexes(volume):
                try:
                    meta = self._read_meta(volume, index)
                except ValueError as exc:
                    log.error("disk %s: unreadable record of replica %s/%s: %s", self.name, volume, index, exc)
                    continue
                if meta is not None:  # else deleted while we listed
                    out.append(meta)
        return out

    def delete_replica(self, volume: str, index: int) -> None:
        """Remove the replica (no-op if absent): close it, drop the .meta (durably), then
        unlink data and crc, which frees their space."""
        path = self._path(volume, index)
        key = (volume, index)
        with self._stripe(key):
            with self._lock:
                h = self._handles.pop(key, None)
                self._lru.pop(key, None)
            if h is not None:
                h._discard()
            meta_path = path.with_suffix(".meta")
            if meta_path.exists():
                meta_path.unlink()
                _fsync_dir(path.parent)
                log.info("disk %s: deleted replica %s/%s", self.name, volume, index)
            for p in (path, path.with_suffix(".crc"), meta_path.with_name(meta_path.name + ".tmp")):
                p.unlink(missing_ok=True)

    def delete_volume(self, volume: str) -> None:
        """Delete every replica of ``volume`` on this disk and its directory."""
        _check_volume(volume)
        vol_dir = self._replicas / volume
        indexes = set(self._indexes(volume))
        with self._lock:
            indexes |= {i for v, i in self._handles if v == volume}
        for index in sorted(indexes):
            self.delete_replica(volume, index)
        if vol_dir.is_dir():
            for f in os.scandir(vol_dir):  # orphans of interrupted creates
                stem, _, ext = f.name.partition(".")
                if ext in ("data", "crc", "meta.tmp") and _index_of(stem) is not None:
                    os.unlink(f.path)
            self._rmdir_if_empty(vol_dir)

    # -- whole disk

    def usage(self) -> dict:
        """``capacity_bytes``; ``used_bytes``: allocated by replica files (data, crc, meta);
        ``free_bytes``: what may still be allocated, min(capacity - used, filesystem free)."""
        used = 0
        for vol in os.scandir(self._replicas):
            if vol.is_dir(follow_symlinks=False):
                for f in os.scandir(vol.path):
                    try:
                        used += f.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:  # deleted while we counted
                        pass
        vfs = os.statvfs(self.root)
        fs_free = vfs.f_bavail * vfs.f_frsize
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": used,
                "free_bytes": max(0, min(self.capacity_bytes - used, fs_free))}

    def replica_allocations(self) -> dict[tuple[str, int], int]:
        """Allocated bytes of every replica's data file, keyed by (volume, index), from a
        stat of each file: unlike get(...).allocated_bytes() it opens nothing, so a
        periodic report does not churn the open-replica cache."""
        out = {}
        for volume in os.listdir(self._replicas):
            if not VOLUME_RE.match(volume) or not (self._replicas / volume).is_dir():
                continue
            for index in self._indexes(volume):
                try:
                    out[(volume, index)] = os.stat(self._path(volume, index)).st_blocks * 512
                except FileNotFoundError:  # deleted while we listed
                    pass
        return out

    def sync_all(self) -> None:
        """sync() every replica; raises the first error after trying them all."""
        with self._lock:
            handles = list(self._handles.values())
        first: OSError | None = None
        for h in handles:
            try:
                h.sync()
            except OSError as exc:
                log.error("disk %s: sync of %s failed: %s", self.name, h.path, exc)
                first = first or exc
        if first is not None:
            raise first

    def close(self) -> None:
        """Sync and close every replica and release the disk; raises the first sync error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles.values())
            self._handles.clear()
            self._lru.clear()
        first: OSError | None = None
        try:
            for h in handles:
                try:
                    h.close()
                except OSError as exc:
                    log.error("disk %s: closing %s failed: %s", self.name, h.path, exc)
                    first = first or exc
        finally:
            os.close(self._root_fd)  # drops the flock
        if first is not None:
            raise first
