"""Rebuilding replicas on this node (the storage daemon's side of a rebuild).

The controller adds a replica to an extent's ``joining`` list (a generation
bump). From then on every write to the extent goes to the joining replica
too, and fails the write's ack unless it lands there or the joiner is
dropped (``VolumeEngine._mutate``). Here, the node that holds the joining
replica copies the extent from a member, chunk by chunk, throttled to
``rate`` bytes/s so client I/O keeps priority:

* every chunk is read from a member *at the current generation*: a member
  that answers has seen that generation, so it refuses writes sent with an
  older one (those writers come back with the joiner in the set);
* the copy never writes a range a mirrored write has covered since the copy
  began (``StorageNode.joins``): the mirrored data is newer than what the
  member returned, whatever the order in which they arrive;
* all-zero chunks are not written (the new replica stays thin).

When the last chunk is in, the replica is synced and joins the set by CAS (``promote``: generation bump). A replica file found here for
a joining extent, when this node learns it joins, is either resynced (a
copy complete when this node was dropped: only the chunks that changed since
are copied, over it; see ``storage_daemon.changes``) or deleted before any
write of that record can land (``StorageNode.track_joins``) and copied afresh
(a copy interrupted by a restart: which writes it missed is unknown).
Progress: ``progress[(volume, index)] = (done, total)``, reported to etcd by
the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter

from braid import extents as X
from storage_daemon import changes as C
from storage_daemon import peer as P
from storage_daemon.datapath import StorageNode

log = logging.getLogger("braid.storaged.rebuild")

CHUNK = 1 << 20
COPIES = Counter("braid_rebuild_copies_total", "Replicas this node rebuilt and joined, by kind "
                 "(full: copied whole; resync: only what changed since it was dropped)", ["kind"])
COPIED = Counter("braid_rebuild_bytes_total", "Bytes this node read from members for rebuilds", ["kind"])
_ZERO = bytes(CHUNK)


class Rebuilder:
    def __init__(self, sn: StorageNode, rate: float = 64 << 20, chunk: int = CHUNK):
        self.sn = sn
        self.rate = rate          # bytes per second, for all copies of this node together
        self.chunk = chunk
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}
        self.progress: dict[tuple[str, int], tuple[int, int]] = {}
        self.completed = 0
        self.resynced = 0         # of them, copies that were resynced (only what changed)
        self.resync_bytes = 0     # bytes those copied
        self._budget_t = time.monotonic()

    def poke(self) -> None:
        """On the loop, after the extent view changed: start a copy for every
        extent where this node is joining and none runs yet."""
        for rec in list(self.sn.view.records.values()):
            key = (rec.data_id, rec.index)
            if rec.joiner(self.sn.node) is not None and key not in self.tasks:
                t = asyncio.get_running_loop().create_task(self._run(rec.volume, rec.index, rec.data_id))
                self.tasks[key] = t
                t.add_done_callback(lambda _t, key=key: self.tasks.pop(key, None))

    async def _throttle(self, n: int) -> None:
        """Pace all copies of this node to ``rate`` bytes/s."""
        now = time.monotonic()
        self._budget_t = max(self._budget_t, now) + n / self.rate
        if self._budget_t - now > 0.001:
            await asyncio.sleep(self._budget_t - now)

    def _current(self, volume: str, index: int, data: str) -> X.ExtentRecord | None:
        """The record while this node still rebuilds the same data of it."""
        rec = self.sn.view.get(volume, index)
        if rec is None or rec.data_id != data or rec.joiner(self.sn.node) is None:
            return None
        return rec

    async def _run(self, volume: str, index: int, uid: str) -> None:
        """Copy extent ``index`` of ``volume`` whose data is ``uid`` (the record's data_id)."""
        sn, key = self.sn, (uid, index)
        try:
            rec = self._current(volume, index, uid)
            if rec is None:
                return
            rep = rec.joiner(sn.node)
            disk = sn.disks.get(rep.disk)
            if disk is None:
                log.error("rebuild of %s: disk %s is not on this node", rec.key, rep.disk)
                return
            sn.track_joins(rec)   # (done already when the view learnt the record)
            rf = await sn.replica(rec, create=True)
            t0, copied = time.monotonic(), 0
            resync = sn.resync.get(key)
            if resync is None:   # a fresh (thin) file: zeros need no writing
                spans = [(0, rec.size)]
                log.info("rebuild of %s on %s/%s: copying %d bytes", rec.key, sn.node, rep.disk, rec.size)
            else:
                spans = await self._changed(rec, rf, *resync)
                if spans is None:
                    return
                log.info("resync of %s on %s/%s from generation %d: copying %d of %d bytes",
                         rec.key, sn.node, rep.disk, resync[0], sum(b - a for a, b in spans), rec.size)
            total, done = sum(b - a for a, b in spans), 0
            self.progress[(volume, index)] = (0, total)
            for lo, hi in spans:
                for off in range(lo, hi, self.chunk):
                    n = min(self.chunk, hi - off)
                    await self._throttle(n)
                    got = await self._read(volume, index, uid, off, n)
                    if got is None:
                        return
                    rec, data = got
                    notes = sn.joins.get(key)
                    if notes is None:   # no longer joining (the view moved on)
                        return
                    rf = await sn.replica(rec, create=True)
                    for a, b in notes.gaps(off, off + n):
                        piece = memoryview(data)[a - off:b - off]
                        if piece != _ZERO[:b - a]:
                            rf.write(a, piece)
                            copied += b - a
                        elif resync is not None:   # (the old copy may hold data there)
                            rf.write_zeroes(a, b - a, punch=True)
                    done += n
                    self.progress[(volume, index)] = (done, total)
            rf = await sn.replica(rec, create=True)
            await asyncio.to_thread(rf.sync)
            # (its meta says complete once it persists a generation as a member: no fsync more here)
            kind = "full" if resync is None else "resync"
            if resync is not None:
                self.resynced += 1
                self.resync_bytes += total
            while True:
                rec = self._current(volume, index, uid)
                if rec is None:
                    return
                if await asyncio.to_thread(sn.etcd_cas, rec, rec.promote(rec.joiner(sn.node))):
                    break
                await sn.refresh(volume, index)
            await sn.refresh(volume, index)
            self.completed += 1
            COPIES.labels(kind).inc()
            COPIED.labels(kind).inc(total)
            took = time.monotonic() - t0
            log.info("rebuild of %s done: %d bytes of data in %.1fs; joined at generation %d",
                     rec.key, copied, took, rec.generation + 1)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rebuild of %s/%d failed; retried on the next change", volume, index)
        finally:
            if self._current(volume, index, uid) is None:
                self.progress.pop((volume, index), None)

    async def _changed(self, rec: X.ExtentRecord, rf, since: int, dropped_at: float):
        """Byte spans of ``rec`` to copy over this node's old copy (``storage_daemon.changes``):
        what a member logged since generation ``since`` and where the checksums differ;
        the whole extent when no member can tell. None when this node no longer joins."""
        mine = await asyncio.to_thread(rf.chunk_digests, C.CHUNK)
        nchunks = len(mine)
        while True:
            rec = self._current(rec.volume, rec.index, rec.data_id)
            if rec is None:
                return None
            answer, stale = None, False
            for src in self.sn.read_order(rec.replicas):
                if src.node == self.sn.node:
                    continue
                try:
                    _, raw = await self.sn.peer(src.node).call(
                        P.OP_CHANGES, rec.volume, rec.uid, rec.index, rec.generation, int(dropped_at * 1000),
                        since, timeout=max(10.0, 5 * self.sn.peer_timeout))
                    answer = C.decode_answer(raw, nchunks)
                    if answer[0] is None:
                        log.info("resync of %s: %s cannot tell what changed; copying it all",
                                 rec.key, src.node)
                    break
                except P.PeerError as exc:
                    stale = stale or exc.stale
                    log.warning("resync of %s: %s: %s", rec.key, src.node, exc)
                except (P.PeerUnavailable, asyncio.TimeoutError, OSError, ValueError) as exc:
                    log.warning("resync of %s: %s: %s", rec.key, src.node, exc or type(exc).__name__)
            if answer is None and stale:
                await self.sn.refresh(rec.volume, rec.index)
                continue
            chunks = C.plan(*answer, mine) if answer is not None else list(range(nchunks))
            if answer is not None and answer[0] is not None:
                logged = bin(answer[0]).count("1")
                differ = sum(a != b for a, b in zip(answer[1], mine))
                log.info("resync of %s: %d chunks changed since generation %d (a member's log), "
                         "%d differ by checksums", rec.key, logged, since, differ)
            return _spans(chunks, C.CHUNK, rec.size)

    async def _read(self, volume: str, index: int, uid: str, off: int, n: int):
        """(record, data) of a chunk read from a member at the current
        generation; None when this node no longer joins the extent."""
        delay = 0.2
        while True:
            rec = self._current(volume, index, uid)
            if rec is None:
                return None
            stale, errors = False, []
            for src in self.sn.read_order(rec.replicas):   # a member that hangs: asked last
                if src.node == self.sn.node:
                    continue
                try:
                    _, data = await self.sn.peer(src.node).call(
                        P.OP_READ, volume, rec.uid, index, rec.generation, off, n,
                        timeout=max(10.0, 5 * self.sn.peer_timeout))
                    return rec, data
                except P.PeerError as exc:
                    stale = stale or exc.stale
                    errors.append(f"{src.node}: {exc}")
                except (P.PeerUnavailable, asyncio.TimeoutError, OSError) as exc:
                    if isinstance(exc, asyncio.TimeoutError):
                        self.sn.suspect(src.node)
                    errors.append(f"{src.node}: {exc or type(exc).__name__}")
            if stale:
                await self.sn.refresh(volume, index)
                continue
            log.warning("rebuild of %s/%d: no member could be read (%s); retrying",
                        volume, index, "; ".join(errors) or "no member")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            await self.sn.refresh(volume, index)


def _spans(chunks: list[int], chunk: int, size: int) -> list[tuple[int, int]]:
    """Byte spans of the given chunk indexes, neighbours merged."""
    out: list[tuple[int, int]] = []
    for i in chunks:
        a, b = i * chunk, min((i + 1) * chunk, size)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
