"""The storage daemon's data path: replica server and volume engines.

One asyncio event loop (uvloop) runs everything here: the replication
server that other storage daemons write to (``serve_peers``, ``dispatch``), and one
``VolumeEngine`` per volume, which is what the NBD server calls. Local
replica files are read and written synchronously on the loop (page cache
writes take microseconds); fdatasync and etcd writes go to worker threads.

Write path (``VolumeEngine.write``): split by extent; for each extent send
the data to every replica of its current set at once (the local one
directly, the others through ``PeerClient``); ack when all have it. A
replica that errs or does not answer within ``peer_timeout`` is dropped
from the set by a generation bump (CAS on the extent record) *before* the
write is acked, so the survivors hold every acked write and the dropped
replica is refused from then on. ESTALE from a peer means our map is old:
re-read the record from etcd and send again (writes are idempotent).

Read path: the local replica if this node is in the set, else (or on a
checksum error) a peer's.

Flush: fdatasync every local replica written since the last flush and ask
every peer written to since then to do the same (SYNC), so a flush on any
connection covers every write completed before it (multi-conn safe).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from braid import extents as X
from storage_daemon import peer as P
from storage_daemon.changes import ChangeLog, encode_answer
from storage_daemon.extent_store import ChecksumError, DiskStore, ReplicaFile, blank_digests
from storage_daemon.nbd import NbdError
from storage_daemon.qos import VolumeQos

log = logging.getLogger("braid.storaged.datapath")

NBD_STATE_HOLE, NBD_STATE_ZERO = 1, 2


class ExtentView:
    """This daemon's copy of the extent map (fed by an etcd informer thread,
    read on the loop). Generations only move forward per key, so a refresh
    racing an older informer event never goes back."""

    def __init__(self):
        self.records: dict[tuple[str, int], X.ExtentRecord] = {}
        self.mod_revisions: dict[tuple[str, int], int] = {}

    def put(self, rec: X.ExtentRecord, mod_revision: int) -> X.ExtentRecord:
        key = (rec.volume, rec.index)
        old = self.records.get(key)
        if old is None or old.uid != rec.uid or mod_revision >= self.mod_revisions.get(key, 0):
            self.records[key] = rec
            self.mod_revisions[key] = mod_revision
            return rec
        return old

    def delete(self, volume: str, index: int) -> None:
        self.records.pop((volume, index), None)
        self.mod_revisions.pop((volume, index), None)

    def get(self, volume: str, index: int) -> X.ExtentRecord | None:
        return self.records.get((volume, index))

    def by_uid(self) -> dict[str, list[X.ExtentRecord]]:
        out: dict[str, list[X.ExtentRecord]] = {}
        for rec in list(self.records.values()):
            out.setdefault(rec.uid, []).append(rec)
        return out


@dataclass
class VolumeInfo:
    name: str
    uid: str
    size: int
    extent_size: int
    replicas: int
    iops: int = 0                 # QoS limits (0: none)
    bytes_per_second: int = 0
    full_clone: bool = False      # copy every extent shared with the source snapshot


@dataclass
class Counters:
    peer_requests: dict[str, int] = field(default_factory=dict)
    peer_errors: int = 0
    stale_refusals: int = 0
    drops: int = 0
    checksum_errors: int = 0
    clones: int = 0               # extents copied from their snapshot base (first writes)


class StorageNode:
    """Everything of one storage daemon that the data path needs."""

    def __init__(self, node: str, disks: dict[str, DiskStore], view: ExtentView,
                 peer_addresses: Callable[[str], str | None],
                 etcd_get: Callable[[str, int], tuple[X.ExtentRecord | None, int]],
                 etcd_cas: Callable[[X.ExtentRecord, X.ExtentRecord], bool],
                 peer_timeout: float = 2.0, tls=None):
        """``etcd_get(volume, index)`` -> (record or None, mod_revision) read
        from etcd now; ``etcd_cas(old, new)`` writes ``new`` if the record is
        still ``old`` (True) — both blocking, run in threads. ``tls``
        (``braid.auth.pki.TlsFiles``): replication over mutual TLS, only with
        storage daemons of the cluster (their certificates say so)."""
        self.node = node
        self.disks = disks
        self.view = view
        self.peer_addresses = peer_addresses
        self.etcd_get = etcd_get
        self.etcd_cas = etcd_cas
        self.peer_timeout = peer_timeout
        self.tls = tls
        self._ssl_server = self._ssl_client = None
        if tls is not None:
            from braid.auth.pki import ReloadingSSLContext
            self._ssl_server = ReloadingSSLContext(tls, server=True)
            self._ssl_client = ReloadingSSLContext(tls, server=False)
        self.peers: dict[str, P.PeerClient] = {}
        self.volumes: dict[str, VolumeInfo] = {}
        self.engines: dict[str, VolumeEngine] = {}
        self.counters = Counters()
        # replicas written through the replication server since their last sync, per volume uid
        self._peer_dirty: dict[str, set[ReplicaFile]] = {}
        self._open: dict[tuple[str, int], ReplicaFile] = {}  # fast path past DiskStore.get's locks
        # replicas being rebuilt here, by (uid, index): the ranges written to them by
        # mirrored writes since the copy started (the copy must never overwrite those)
        self.joins: dict[tuple[str, int], Intervals] = {}
        self.writes: dict[tuple[str, int], int] = {}   # local writes per replica (data, index)
        self._suspect: dict[str, float] = {}   # peer -> until when it is asked last (it did not answer)
        self._cloning: dict[tuple[str, int], asyncio.Future] = {}   # copies of a base under way
        self.changes = ChangeLog()   # what was written under which generation (resyncs ask)
        # joining replicas kept for a resync (an old complete copy of this node): their
        # (uid, index) -> the generation they were dropped at and when (``changes``)
        self.resync: dict[tuple[str, int], tuple[int, float]] = {}

    # -- shared helpers --------------------------------------------------------

    async def refresh(self, volume: str, index: int) -> X.ExtentRecord | None:
        rec, rev = await asyncio.to_thread(self.etcd_get, volume, index)
        if rec is None:
            self.view.delete(volume, index)
            return None
        return self.track_joins(self.view.put(rec, rev))

    def track_joins(self, rec: X.ExtentRecord) -> X.ExtentRecord:
        """Called with the newest record the view holds, whenever it changes.
        When this node starts joining an extent, every later write to its
        replica is noted for the copy; a file already there (an earlier
        attempt, or a replica this node lost) missed unknown writes: it is
        deleted now, on the loop, before any write of this record can land.
        When it stops joining (joined, or dropped), the notes go."""
        key = (rec.data_id, rec.index)
        if rec.writable(self.node) is not None:
            self.changes.member(key, rec.generation)
        else:
            self.changes.forget(key)
        rep = rec.joiner(self.node)
        if rep is not None and key not in self.joins:
            self.joins[key] = Intervals()
            self._open.pop(key, None)
            self.resync.pop(key, None)
            disk = self.disks.get(rep.disk)
            old = disk.get(rec.data_id, rec.index) if disk is not None else None
            if old is not None:
                drop = _last_drop(rec, rep)
                if drop is not None and old.meta.complete and old.meta.generation <= drop.generation:
                    # a copy complete when this node was dropped: resync it (only what
                    # changed since). Marked incomplete first: a crash mid-resync must
                    # not leave it looking whole.
                    disk.set_meta(rec.data_id, rec.index, complete=False)
                    self.resync[key] = (drop.generation, drop.at)
                    log.info("%s: resyncing this node's copy from generation %d", rec.key, drop.generation)
                else:
                    log.info("%s: discarding an old copy on this node before rebuilding it", rec.key)
                    disk.delete_replica(rec.data_id, rec.index)
        elif rep is None and key in self.joins:
            del self.joins[key]
            self.resync.pop(key, None)
        return rec

    async def replica(self, rec: X.ExtentRecord, create: bool, base_ok: bool = True) -> ReplicaFile | None:
        """This node's replica file of ``rec`` (None: never written here and
        not ``create``). The common case (open, same generation) stays on
        the loop; creating a replica and persisting a new generation fsync,
        so they run in a worker thread.

        An extent derived from a snapshot (``rec.base``) has no files of its
        own until its first write: reads get the base's replica (read only:
        with ``base_ok``; else None), and ``create`` copies the base into the
        extent's own files first (redirect-on-write). As for any replica, no
        file at all means never written: zeros."""
        mine = rec.holds(self.node) or (rec.joiner(self.node) if create else None)
        if mine is None:
            raise NbdError(errno.ESTALE, f"{self.node} is not in the replica set of {rec.key}")
        disk = self.disks.get(mine.disk)
        if disk is None:
            raise OSError(errno.ENODEV, f"disk {mine.disk} of {rec.key} is not on this node")
        key = (rec.data_id, rec.index)
        rf = self._open.get(key)
        if rf is None or rf.closed:
            rf = disk.get(rec.data_id, rec.index)
            src = self.base_replica(rec, disk) if rf is None and rec.base and rec.holds(self.node) else None
            if src is not None:   # (no base file either: never written since, like any replica)
                if not create:
                    return src if base_ok else None
                rf = await self._clone(disk, src, rec)
            if rf is None and create:   # (a joiner's copy is complete only once it joins)
                rf = await asyncio.to_thread(disk.open_replica, rec.data_id, rec.index, rec.size,
                                             rec.generation, True, rec.holds(self.node) is not None)
            if rf is None:
                return None
            self._open[key] = rf
        if rf.meta.generation < rec.generation:   # (a late request may carry an older one)
            # a member's copy is whole (a joiner's became so before it joined): said in the same
            # durable meta write, so that a later resync may start from it
            await asyncio.to_thread(disk.set_meta, rec.data_id, rec.index, generation=rec.generation,
                                    complete=rf.meta.complete or rec.holds(self.node) is not None)
        return rf

    def base_replica(self, rec: X.ExtentRecord, disk: DiskStore) -> ReplicaFile | None:
        """The nearest base of ``rec`` held on this node (its own disk first)."""
        for data in rec.base:
            for d in [disk] + [d for d in self.disks.values() if d is not disk]:
                rf = d.get(data, rec.index)
                if rf is not None:
                    return rf
        return None

    async def _clone(self, disk: DiskStore, src: ReplicaFile, rec: X.ExtentRecord) -> ReplicaFile:
        """Copy ``src`` into ``rec``'s own files (once, however many writes wait for it)."""
        key = (rec.data_id, rec.index)
        fut = self._cloning.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(
                disk.clone_replica, src, rec.data_id, rec.index, rec.generation))
            self._cloning[key] = fut
            fut.add_done_callback(lambda _f: self._cloning.pop(key, None))
            self.counters.clones += 1
        return await asyncio.shield(fut)

    def note_write(self, rec: X.ExtentRecord, offset: int, length: int) -> None:
        """A write/zero/trim applied to this node's replica of ``rec``: counted
        (a scrub repair must not overwrite what came meanwhile), and if that
        replica is being rebuilt, the copy must leave the range alone."""
        key = (rec.data_id, rec.index)
        self.writes[key] = self.writes.get(key, 0) + 1
        self.changes.note(key, rec.generation, offset, length)
        if rec.joining:
            iv = self.joins.get(key)
            if iv is not None:
                iv.add(offset, offset + length)

    def suspect(self, node: str, seconds: float = 30.0) -> None:
        """``node`` did not answer a read in time (e.g. its disk hangs): ask the
        other members first for a while, instead of waiting for it every time."""
        self._suspect[node] = time.monotonic() + seconds

    def read_order(self, replicas) -> list:
        """Members to read from: the ones that answered lately first (stable otherwise)."""
        now = time.monotonic()
        return sorted(replicas, key=lambda r: self._suspect.get(r.node, 0.0) > now)

    def forget(self, uid: str, index: int) -> None:
        self._open.pop((uid, index), None)

    def peer(self, node: str) -> P.PeerClient:
        addr = self.peer_addresses(node)
        if not addr:
            raise P.PeerUnavailable(f"storage daemon of node {node} is not live")
        client = self.peers.get(node)
        if client is None or client.address != addr:  # new, or the daemon came back elsewhere
            if client is not None:
                asyncio.ensure_future(client.close())
            client = self.peers[node] = P.PeerClient(
                node, addr, connect_timeout=self.peer_timeout,
                ssl_context=self._ssl_client.get if self._ssl_client else None)
        return client

    # -- replication server ------------------------------------------------------

    async def serve_peers(self, host: str, port: int) -> asyncio.AbstractServer:
        """Listen for peer connections (the replication server)."""
        loop = asyncio.get_running_loop()
        if self._ssl_server is None:
            return await loop.create_server(lambda: P.ServerProtocol(self.dispatch), host, port)
        return await loop.create_server(lambda: P.ServerProtocol(self.dispatch, admit=_storage_peer_only),
                                        host, port, ssl=self._ssl_server.server_context())

    def replica_now(self, rec: X.ExtentRecord) -> ReplicaFile | None:
        """The fast path of ``replica``: this node's open replica of ``rec``
        at its generation, or None when that needs the slow path."""
        rf = self._open.get((rec.data_id, rec.index))
        if rf is None or rf.closed or rf.meta.generation != rec.generation or rec.holds(self.node) is None:
            return None
        return rf

    def dispatch(self, out: P.ServerProtocol, op, flags, req_id, gen, name, uid, index, length, offset,
                 payload) -> None:
        """One request from a peer. The common case (a plain READ or WRITE of
        an open replica at the current generation) is served right here;
        anything else (refresh from etcd, first write, FUA, SYNC, errors)
        in a task of ``_serve``."""
        if op in (P.OP_WRITE, P.OP_READ) and not flags & P.F_FUA:
            rec = self.view.get(name, index)
            if rec is not None and rec.uid == uid and rec.generation == gen and 0 <= offset \
                    and offset + length <= rec.size:
                rf = self.replica_now(rec)
                if rf is not None:
                    try:
                        if op == P.OP_WRITE:
                            rf.write(offset, memoryview(payload))
                            self.note_write(rec, offset, length)
                            self._peer_dirty.setdefault(uid, set()).add(rf)
                            self._reply(out, req_id, 0, gen)
                        else:
                            self._reply(out, req_id, 0, gen, rf.read(offset, length))
                        c = self.counters.peer_requests
                        c[P.OPS[op]] = c.get(P.OPS[op], 0) + 1
                        return
                    except Exception:  # noqa: BLE001 - the slow path answers with the right error
                        pass
        t = asyncio.get_running_loop().create_task(
            self._serve(out, op, flags, req_id, gen, name, uid, index, length, offset, payload))
        out.tasks.add(t)
        t.add_done_callback(out.tasks.discard)

    def _reply(self, writer, req_id: int, status: int, gen: int, payload=b"") -> None:
        if writer.is_closing():
            return
        head = P.REP.pack(P.REP_MAGIC, status, req_id, gen, len(payload))
        if payload:
            writer.writelines([head, payload])
        else:
            writer.write(head)

    async def _serve(self, writer, op, flags, req_id, gen, name, uid, index, length, offset, payload):
        c = self.counters.peer_requests
        c[P.OPS[op]] = c.get(P.OPS[op], 0) + 1
        try:
            if op == P.OP_PING:
                return self._reply(writer, req_id, 0, 0)
            if op == P.OP_SYNC:
                await self.sync_peer_writes(uid)
                return self._reply(writer, req_id, 0, gen)
            if op == P.OP_CHANGES:
                return await self._changes(writer, req_id, gen, name, uid, index, since=length,
                                           dropped_at=offset / 1000)
            rec = self.view.get(name, index)
            if rec is None or rec.uid != uid or rec.generation < gen:
                rec = await self.refresh(name, index)
            if rec is None or rec.uid != uid:
                return self._reply(writer, req_id, errno.ENOENT, 0, f"no extent {name}/{index}".encode())
            member = rec.holds(self.node) is not None or (
                op in (P.OP_WRITE, P.OP_ZERO, P.OP_TRIM) and rec.joiner(self.node) is not None)
            if gen != rec.generation or not member:
                self.counters.stale_refusals += 1
                why = (f"generation {gen} is stale (current {rec.generation})" if gen < rec.generation
                       else f"generation {gen} unknown here (current {rec.generation})"
                       if gen > rec.generation else f"{self.node} is not in the replica set")
                return self._reply(writer, req_id, errno.ESTALE, rec.generation, why.encode())
            if offset < 0 or offset + length > rec.size:
                return self._reply(writer, req_id, errno.EINVAL, rec.generation, b"range outside the extent")
            if op == P.OP_READ:
                rf = await self.replica(rec, create=False)
                data = rf.read(offset, length) if rf is not None else bytes(length)
                return self._reply(writer, req_id, 0, rec.generation, data)
            rf = await self.replica(rec, create=True)   # (an empty write only makes the replica)
            if op == P.OP_WRITE:
                rf.write(offset, memoryview(payload))
            elif op == P.OP_ZERO:
                rf.write_zeroes(offset, length, punch=bool(flags & P.F_PUNCH))
            elif op == P.OP_TRIM:
                rf.trim(offset, length)
            self.note_write(rec, offset, length)
            if flags & P.F_FUA:
                await asyncio.to_thread(rf.sync)
            else:
                self._peer_dirty.setdefault(uid, set()).add(rf)
            self._reply(writer, req_id, 0, rec.generation)
        except NbdError as exc:
            self._reply(writer, req_id, exc.errno, gen, str(exc).encode())
        except ChecksumError as exc:
            self.counters.checksum_errors += 1
            self._reply(writer, req_id, errno.EIO, gen, str(exc).encode())
        except OSError as exc:
            log.warning("peer request %s %s/%d failed: %s", P.OPS[op], name, index, exc)
            self._reply(writer, req_id, exc.errno or errno.EIO, gen, str(exc).encode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not take the connection (or the daemon) down
            log.exception("peer request %s %s/%d crashed", P.OPS.get(op), name, index)
            self._reply(writer, req_id, errno.EIO, gen, f"internal error: {exc}".encode())

    async def _changes(self, writer, req_id: int, gen: int, name: str, uid: str, index: int,
                       since: int, dropped_at: float) -> None:
        """A joining copy asks what changed since it was dropped (``storage_daemon.changes``)."""
        rec = self.view.get(name, index)
        if rec is None or rec.uid != uid or rec.generation < gen:
            rec = await self.refresh(name, index)
        if rec is None or rec.uid != uid:
            return self._reply(writer, req_id, errno.ENOENT, 0, f"no extent {name}/{index}".encode())
        if gen != rec.generation or rec.holds(self.node) is None:
            self.counters.stale_refusals += 1
            return self._reply(writer, req_id, errno.ESTALE, rec.generation,
                               f"{self.node} is not a member at generation {gen}".encode())
        key = (rec.data_id, rec.index)
        rf = await self.replica(rec, create=False, base_ok=False)
        mask = self.changes.since(key, since, dropped_at)
        if rf is not None:
            digests = await asyncio.to_thread(rf.chunk_digests, self.changes.chunk)
        else:   # never written here: zeros, their crcs too (or a snapshot's base: copy it all)
            digests = blank_digests(rec.size, self.changes.chunk)
            mask = None if rec.base else mask
        self._reply(writer, req_id, 0, rec.generation, encode_answer(mask, digests))

    async def sync_peer_writes(self, uid: str) -> None:
        dirty = self._peer_dirty.pop(uid, set())
        if dirty:
            await asyncio.gather(*(asyncio.to_thread(rf.sync) for rf in dirty))


class VolumeEngine:
    """One volume as served by this node (the ``nbd.Export`` of its NBD
    exports). Shared by all NBD connections to the volume on this node."""

    def __init__(self, sn: StorageNode, info: VolumeInfo):
        self.sn = sn
        self.info = info
        self.qos = VolumeQos(info.iops, info.bytes_per_second)
        self.read_only = False
        self._dirty_local: set[ReplicaFile] = set()
        self._dirty_peers: set[str] = set()
        # writes are held while a snapshot or revert freezes the extent map (``hold``)
        self.gate = asyncio.Event()
        self.gate.set()
        self.inflight = 0
        self._settling: set[int] = set()

    # -- holding writes (snapshots) ----------------------------------------------

    async def hold(self, timeout: float = 10.0) -> None:
        """Hold every new write, zero and trim; return once those in flight
        are done (acked or failed). What was acked before is in the extent
        map's current data, what comes after waits for ``release``."""
        self.gate.clear()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.inflight:
            if asyncio.get_running_loop().time() > deadline:
                self.gate.set()
                raise TimeoutError(f"volume {self.info.name}: {self.inflight} writes still in flight")
            await asyncio.sleep(0.001)

    def release(self) -> None:
        self.gate.set()

    async def settle(self, rec: X.ExtentRecord) -> None:
        """A write under ``rec`` reached every replica of this derived extent:
        each holds its own copy now, so the base is forgotten (the snapshot's
        data may go) — only if the record is still exactly ``rec``."""
        if rec.index in self._settling or not rec.base:
            return
        self._settling.add(rec.index)
        try:
            if await asyncio.to_thread(self.sn.etcd_cas, rec, dataclasses.replace(rec, base=())):
                await self.sn.refresh(self.info.name, rec.index)
        except Exception as exc:  # noqa: BLE001 - the next write tries again
            log.debug("volume %s extent %d: base kept (%s)", self.info.name, rec.index, exc)
        finally:
            self._settling.discard(rec.index)

    async def materialize(self, index: int) -> bool:
        """Give every replica of the extent its own copy of its base (a full
        clone): an empty write makes each copy it, then ``settle``. True
        when the extent has no base (any more)."""
        if not self._record(index).base:
            return True
        rec = await self._mutate(index, P.OP_WRITE, 0, 0, b"", False, settle=False)
        await self.settle(rec)
        return not self._record(index).base

    @property
    def size(self) -> int:
        return self.info.size

    def update(self, info: VolumeInfo) -> None:
        """A new spec (grown, new QoS limits): applies to the next request."""
        self.info = info
        self.qos.set(info.iops, info.bytes_per_second)

    @property
    def description(self) -> str:
        return f"Braid volume {self.info.name} ({self.info.replicas} replicas)"

    def _pieces(self, offset: int, length: int):
        es = self.info.extent_size
        end = offset + length
        while offset < end:
            idx, off = divmod(offset, es)
            n = min(es - off, end - offset)
            yield idx, off, n
            offset += n

    def _record(self, index: int) -> X.ExtentRecord:
        rec = self.sn.view.get(self.info.name, index)
        if rec is None or rec.uid != self.info.uid:
            raise NbdError(errno.EIO, f"extent {index} of volume {self.info.name} is not placed")
        return rec

    # -- writes ------------------------------------------------------------------

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.qos.limited:
            await self.qos.admit(len(data))
        idx, off = divmod(offset, self.info.extent_size)
        if off + len(data) <= self.info.extent_size:  # the common case: one extent
            return await self._mutate(idx, P.OP_WRITE, off, len(data), data, fua)
        pos = 0
        jobs = []
        for idx, off, n in self._pieces(offset, len(data)):
            jobs.append(self._mutate(idx, P.OP_WRITE, off, n, data[pos:pos + n], fua))
            pos += n
        await _all(jobs)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        if self.qos.limited:
            await self.qos.admit(0)
        await _all([self._mutate(idx, P.OP_ZERO, off, n, None, fua, punch=may_trim)
                    for idx, off, n in self._pieces(offset, length)])

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await _all([self._mutate(idx, P.OP_TRIM, off, n, None, fua)
                    for idx, off, n in self._pieces(offset, length)])

    async def _mutate(self, index: int, op: int, off: int, n: int, data, fua: bool,
                      punch: bool = False, settle: bool = True) -> X.ExtentRecord:
        while not self.gate.is_set():   # a snapshot is being taken
            await self.gate.wait()
        self.inflight += 1
        try:
            rec = await self._mutate_held(index, op, off, n, data, fua, punch)
        finally:
            self.inflight -= 1
        if rec.base and settle:
            asyncio.ensure_future(self.settle(rec))
        return rec

    async def _mutate_held(self, index: int, op: int, off: int, n: int, data, fua: bool,
                           punch: bool = False) -> X.ExtentRecord:
        """Apply one write/zero/trim to every replica of the extent's current
        set; return (the record it was applied under) when all have it (or the
        failed ones are dropped)."""
        wrote_locally = False
        for _attempt in range(8):
            rec = self._record(index)
            if not rec.replicas:
                raise NbdError(errno.EIO, f"extent {index} of {self.info.name} has no replica left")
            if self.sn.node in rec.fenced:  # HA moved its VM away: this node must not write any more
                mine = rec.holds(self.sn.node)
                if wrote_locally and mine is not None:
                    # our replica took a write the others refused: it must not be read again
                    await self._drop(rec, [(mine, NbdError(errno.EPERM, "written after fencing"))])
                raise NbdError(errno.EPERM, f"node {self.sn.node} is fenced from volume {self.info.name}")
            started = [(rep, self._start_one(rec, rep, op, off, n, data, fua, punch))
                       for rep in rec.replicas + rec.joining]
            results: list = []
            for rep, f in started:  # all are in flight: wait for each
                if f is None or isinstance(f, BaseException):
                    results.append(f)
                    wrote_locally = wrote_locally or (f is None and rep.node == self.sn.node
                                                      and rep in rec.replicas)
                    continue
                try:
                    await f
                    results.append(None)
                    wrote_locally = wrote_locally or (rep.node == self.sn.node and rep in rec.replicas)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure is judged below
                    results.append(exc)
            stale = [r for r in results if isinstance(r, P.PeerError) and r.stale]
            failed = [(rep, r) for (rep, _), r in zip(started, results)
                      if isinstance(r, BaseException) and not (isinstance(r, P.PeerError) and r.stale)]
            if failed:  # the write stands on the survivors once the record no longer lists the rest
                if await self._drop(rec, failed) and not stale:
                    return dataclasses.replace(rec, base=())   # (the set changed: no settling now)
                continue
            if stale:
                await self.sn.refresh(self.info.name, index)
                continue
            for rep, _ in started:
                if rep.node != self.sn.node and not fua:
                    self._dirty_peers.add(rep.node)
            return rec
        raise NbdError(errno.EIO, f"extent {index} of {self.info.name}: replica set keeps changing")

    def _start_one(self, rec: X.ExtentRecord, rep: X.Replica, op: int, off: int, n: int, data, fua: bool,
                   punch: bool):
        """Start the operation on one replica: None when done already (the
        local replica, inline), an awaitable while in flight, or the
        exception that stopped it."""
        try:
            if rep.node == self.sn.node:
                rf = None if fua else self.sn.replica_now(rec)
                if rf is None:
                    return asyncio.ensure_future(self._mutate_local(rec, op, off, n, data, fua, punch))
                _apply(rf, op, off, n, data, punch)
                self.sn.note_write(rec, off, n)
                self._dirty_local.add(rf)
                return None
            flags = (P.F_FUA if fua else 0) | (P.F_PUNCH if punch else 0)
            client = self.sn.peer(rep.node)
            payload = data if data is not None else b""
            if client.connected:
                return client.submit(op, self.info.name, self.info.uid, rec.index, rec.generation, off, n,
                                     payload, flags)
            return asyncio.ensure_future(client.call(op, self.info.name, self.info.uid, rec.index,
                                                     rec.generation, off, n, payload, flags))
        except Exception as exc:  # noqa: BLE001 - judged by _mutate
            return exc

    async def _mutate_local(self, rec: X.ExtentRecord, op: int, off: int, n: int, data, fua: bool,
                            punch: bool) -> None:
        rf = await self.sn.replica(rec, create=True)
        _apply(rf, op, off, n, data, punch)
        self.sn.note_write(rec, off, n)
        if fua:
            await asyncio.to_thread(rf.sync)
        else:
            self._dirty_local.add(rf)

    async def _drop(self, rec: X.ExtentRecord, failed: list) -> bool:
        """Remove the failed replicas from the extent's set (generation bump)
        before anything that needed them is acked."""
        lost = [rep for rep, _ in failed]
        reason = "; ".join(f"{rep.node}: {_why(exc)}" for rep, exc in failed)
        if all(rep in lost for rep in rec.replicas):
            raise NbdError(errno.EIO, f"extent {rec.index} of {self.info.name}: every replica failed "
                                      f"({reason})")
        new = rec.without(lost, reason)
        try:
            ok = await asyncio.to_thread(self.sn.etcd_cas, rec, new)
        except NbdError:
            raise
        except Exception as exc:  # etcd unreachable: nobody may be dropped, nothing acknowledged
            raise NbdError(errno.EIO, f"extent {rec.index} of {self.info.name}: replica(s) "
                                      f"{', '.join(r.node for r in lost)} failed and etcd cannot be "
                                      f"reached to drop them ({exc}); write not acknowledged") from None
        await self.sn.refresh(self.info.name, rec.index)
        if ok:
            self.sn.counters.drops += 1
            log.warning("volume %s extent %d: dropped %s, generation %d -> %d (%s)", self.info.name,
                        rec.index, ", ".join(r.node for r in lost), rec.generation, new.generation, reason)
        return ok

    # -- reads -------------------------------------------------------------------

    async def read(self, offset: int, length: int):
        if self.qos.limited:
            await self.qos.admit(length)
        idx, off = divmod(offset, self.info.extent_size)
        if off + length <= self.info.extent_size:  # the common case: one extent
            return await self._read_extent(idx, off, length)
        pieces = list(self._pieces(offset, length))
        if len(pieces) == 1:
            return await self._read_extent(*pieces[0])
        parts = await asyncio.gather(*(self._read_extent(*p) for p in pieces))
        return b"".join(parts)

    async def _read_extent(self, index: int, off: int, n: int):
        last: Exception | None = None
        for _attempt in range(4):
            rec = self._record(index)
            if rec.holds(self.sn.node) is not None:
                try:
                    rf = await self.sn.replica(rec, create=False)
                    return rf.read(off, n) if rf is not None else bytes(n)
                except ChecksumError as exc:
                    self.sn.counters.checksum_errors += 1
                    log.error("volume %s: %s; reading a peer's copy", self.info.name, exc)
                    last = exc
            stale = False
            for rep in self.sn.read_order(rec.replicas):
                if rep.node == self.sn.node:
                    continue
                try:
                    _, data = await self.sn.peer(rep.node).call(P.OP_READ, self.info.name, self.info.uid,
                                                                index, rec.generation, off, n)
                    return data
                except P.PeerError as exc:
                    last = exc
                    stale = stale or exc.stale
                except (P.PeerUnavailable, asyncio.TimeoutError, OSError) as exc:
                    if isinstance(exc, asyncio.TimeoutError):
                        self.sn.suspect(rep.node)
                    last = exc
            if not stale:
                break
            await self.sn.refresh(self.info.name, index)
        raise NbdError(errno.EIO, f"extent {index} of {self.info.name}: no replica could be read "
                                  f"({_why(last)})")

    # -- flush and allocation ----------------------------------------------------

    async def flush(self) -> None:
        local, self._dirty_local = self._dirty_local, set()
        peers, self._dirty_peers = self._dirty_peers, set()
        jobs = [asyncio.to_thread(rf.sync) for rf in local]
        jobs += [self._sync_peer(node) for node in peers]
        await _all(jobs)

    async def _sync_peer(self, node: str) -> None:
        try:
            # fdatasync of many dirty extents may take a while: a longer deadline than for writes
            await self.sn.peer(node).call(P.OP_SYNC, self.info.name, self.info.uid, P.ALL_EXTENTS, 0,
                                          timeout=max(30.0, 10 * self.sn.peer_timeout))
        except (P.PeerError, P.PeerUnavailable, asyncio.TimeoutError, OSError) as exc:
            # its unsynced writes may be gone: it leaves every set of this volume it is in
            for rec in [r for r in self.sn.view.by_uid().get(self.info.uid, []) if r.holds(node)]:
                await self._drop(rec, [(rec.holds(node), exc)])

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        idx, off, n = next(self._pieces(offset, min(length, self.size - offset)))
        rec = self._record(idx)
        if rec.holds(self.sn.node) is None:
            return [(n, 0)]  # no local copy to ask: report data (always correct)
        rf = await self.sn.replica(rec, create=False)
        if rf is None:
            return [(n, NBD_STATE_HOLE | NBD_STATE_ZERO)]
        return [(ln, 0 if alloc else NBD_STATE_HOLE | NBD_STATE_ZERO)
                for _, ln, alloc in rf.allocation(off, n)]


class Intervals:
    """A set of byte ranges [start, end), merged; what mirrored writes covered."""

    def __init__(self):
        self.spans: list[list[int]] = []   # sorted, disjoint, not touching

    def add(self, a: int, b: int) -> None:
        if b <= a:
            return
        i = bisect.bisect_left(self.spans, [a, a])
        if i and self.spans[i - 1][1] >= a:
            i -= 1
        j = i
        while j < len(self.spans) and self.spans[j][0] <= b:
            a, b = min(a, self.spans[j][0]), max(b, self.spans[j][1])
            j += 1
        self.spans[i:j] = [[a, b]]

    def gaps(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of [a, b) not covered."""
        out, pos = [], a
        i = bisect.bisect_left(self.spans, [a, a])
        if i and self.spans[i - 1][1] > a:
            i -= 1
        for s, e in self.spans[i:]:
            if s >= b:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < b:
            out.append((pos, b))
        return out


def _storage_peer_only(transport) -> str:
    """Replication takes only storage daemons of the cluster (the TLS layer
    has verified the certificate; here: whose it is)."""
    from braid.auth.pki import identity_from_ssl
    who = identity_from_ssl(transport)
    if who is None or who.kind != "service" or who.service != "storaged":
        return f"{who or 'no Braid certificate'} is not a storage daemon"
    return ""


def _last_drop(rec: X.ExtentRecord, rep: X.Replica) -> X.Dropped | None:
    """The newest time ``rep`` was dropped from ``rec`` (None: it never was)."""
    drops = [d for d in rec.dropped if d.node == rep.node and d.disk == rep.disk]
    return max(drops, key=lambda d: d.generation) if drops else None


def _apply(rf: ReplicaFile, op: int, off: int, n: int, data, punch: bool) -> None:
    if op == P.OP_WRITE:
        rf.write(off, data)
    elif op == P.OP_ZERO:
        rf.write_zeroes(off, n, punch=punch)
    else:
        rf.trim(off, n)


def _why(exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def _all(jobs: list) -> None:
    if len(jobs) == 1:
        await jobs[0]
    elif jobs:
        await asyncio.gather(*jobs)
