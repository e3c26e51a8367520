"""Scrubbing: background verification of the replicas this node holds.

Every ``interval`` seconds a pass reads each replica of which this node is
a member, chunk by chunk, throttled to ``rate`` bytes/s:

* every read verifies the CRC32C of each 4 KiB block (extent_store); a block
  that fails is rewritten with the same range read from another member
  (which verifies its own copy) — unless a write reached this replica
  meanwhile (``StorageNode.writes``): then the range is read again, as the
  write may have replaced the bad block already;
* the first member of each extent's set also compares its chunk with the
  other members' (read at the current generation). Different bytes with
  valid checksums on both sides cannot be judged by checksums: they are
  counted as ``mismatches`` and logged (after re-reading, to let in-flight
  writes land), not "repaired" by guessing.

Results go to the DiskPool status (``status.scrub``) and to metrics.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

from prometheus_client import Counter

from braid import extents as X
from braid.v1 import storage_pb2
from storage_daemon import peer as P
from storage_daemon.datapath import StorageNode
from storage_daemon.extent_store import ChecksumError

log = logging.getLogger("braid.storaged.scrub")

SCRUBBED = Counter("braid_scrub_bytes_total", "Bytes of replicas verified by scrubbing")
BAD_BLOCKS = Counter("braid_scrub_checksum_errors_total", "Blocks that failed their checksum in a scrub")
REPAIRED = Counter("braid_scrub_repaired_total", "Bad ranges rewritten from a good replica")
MISMATCHES = Counter("braid_scrub_mismatches_total", "Ranges where replicas with valid checksums differ")

CHUNK = 1 << 20
BLOCK = 4096


class Scrubber:
    def __init__(self, sn: StorageNode, rate: float = 16 << 20, interval: float = 86400.0,
                 chunk: int = CHUNK):
        self.sn = sn
        self.rate = rate
        self.interval = interval
        self.chunk = chunk
        self.status = storage_pb2.ScrubStatus()
        self._budget_t = time.monotonic()
        self._pass_bytes = 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scrub_pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scrub pass failed; next one in %.0fs", self.interval)

    async def _throttle(self, n: int) -> None:
        now = time.monotonic()
        self._budget_t = max(self._budget_t, now) + n / self.rate
        if self._budget_t - now > 0.001:
            await asyncio.sleep(self._budget_t - now)

    async def scrub_pass(self) -> storage_pb2.ScrubStatus:
        t0, self._pass_bytes = time.monotonic(), 0
        for rec in sorted(self.sn.view.records.values(), key=lambda r: (r.volume, r.index)):
            if rec.holds(self.sn.node) is not None:
                await self.scrub_extent(rec.volume, rec.index, rec.data_id)
        st = self.status
        st.passes += 1
        st.last_pass_seconds = round(time.monotonic() - t0, 3)
        st.last_pass_end = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        st.bytes_verified = self._pass_bytes
        log.info("scrub pass %d: %d bytes in %.1fs; checksum errors %d (repaired %d, unrepaired %d), "
                 "mismatches %d", st.passes, st.bytes_verified, st.last_pass_seconds, st.checksum_errors,
                 st.repaired, st.unrepaired, st.mismatches)
        return st

    def _current(self, volume: str, index: int, data: str) -> X.ExtentRecord | None:
        """The record while this node holds the same data of it (``data``: its data_id)."""
        rec = self.sn.view.get(volume, index)
        if rec is None or rec.data_id != data or rec.holds(self.sn.node) is None:
            return None
        return rec

    async def scrub_extent(self, volume: str, index: int, uid: str) -> None:
        off = -self.chunk
        while True:
            off += self.chunk
            rec = self._current(volume, index, uid)
            if rec is None or off >= rec.size:
                return
            rf = await self.sn.replica(rec, create=False, base_ok=False)
            if rf is None:
                return   # never written here (or still the snapshot's data: scrubbed as the snapshot's)
            n = min(self.chunk, rec.size - off)
            await self._throttle(n)
            rec = self._current(volume, index, uid)
            if rec is None:
                return
            local = await self._verify(rec, off, n)
            self._pass_bytes += n
            SCRUBBED.inc(n)
            if local is not None and rec.replicas[0].node == self.sn.node and len(rec.replicas) > 1:
                await self._compare(rec, off, n, local)

    async def _verify(self, rec: X.ExtentRecord, off: int, n: int) -> bytes | None:
        """The chunk, checksums verified; bad blocks repaired first."""
        rf = await self.sn.replica(rec, create=False, base_ok=False)
        if rf is None:
            return None
        try:
            return bytes(rf.read(off, n))
        except ChecksumError:
            pass
        for b in range(off, off + n, BLOCK):   # find the bad blocks
            try:
                rf.read(b, BLOCK)
            except ChecksumError:
                self.status.checksum_errors += 1
                BAD_BLOCKS.inc()
                await self._repair(rec, b, BLOCK)
        try:
            return bytes(rf.read(off, n))
        except ChecksumError:
            return None

    async def _repair(self, rec: X.ExtentRecord, off: int, n: int) -> None:
        key = (rec.data_id, rec.index)
        for _attempt in range(5):
            rec = self._current(rec.volume, rec.index, rec.data_id) or rec
            seq = self.sn.writes.get(key, 0)
            data = None
            for src in rec.replicas:
                if src.node == self.sn.node:
                    continue
                try:
                    _, data = await self.sn.peer(src.node).call(P.OP_READ, rec.volume, rec.uid, rec.index,
                                                                rec.generation, off, n)
                    break
                except (P.PeerError, P.PeerUnavailable, asyncio.TimeoutError, OSError) as exc:
                    log.warning("scrub repair of %s at %d: %s: %s", rec.key, off, src.node, exc)
            rf = await self.sn.replica(rec, create=False, base_ok=False)
            if rf is None:
                return
            if self.sn.writes.get(key, 0) != seq:   # a write came meanwhile: look again
                try:
                    rf.read(off, n)
                    return   # the write replaced the bad block
                except ChecksumError:
                    continue
            if data is None:
                break
            rf.write(off, memoryview(data))   # same loop step as the check above
            await asyncio.to_thread(rf.sync)
            self.status.repaired += 1
            REPAIRED.inc()
            log.warning("scrub: %s bytes %d-%d failed their checksum; rewritten from a peer's copy",
                        rec.key, off, off + n)
            return
        self.status.unrepaired += 1
        log.error("scrub: %s bytes %d-%d failed their checksum and no replica could repair them "
                  "(reads of that range come from the other members)", rec.key, off, off + n)

    async def _compare(self, rec: X.ExtentRecord, off: int, n: int, local: bytes) -> None:
        """Compare the chunk with the other members'. Writes in flight may land
        on one side first: a difference counts only when it stays, and no write
        reached this replica meanwhile (else no verdict: a later pass looks again)."""
        key = (rec.data_id, rec.index)
        for src in rec.replicas[1:]:
            seq = self.sn.writes.get(key, 0)
            for attempt in range(3):
                try:
                    _, theirs = await self.sn.peer(src.node).call(P.OP_READ, rec.volume, rec.uid, rec.index,
                                                                  rec.generation, off, n)
                except (P.PeerError, P.PeerUnavailable, asyncio.TimeoutError, OSError):
                    break   # a stale view, a peer away: judged in a later pass
                if bytes(theirs) == local:
                    break
                if self.sn.writes.get(key, 0) != seq:   # being written: no verdict now
                    if attempt == 2:
                        log.debug("scrub: %s bytes %d-%d busy; compared in a later pass", rec.key, off, off + n)
                        break
                    seq = self.sn.writes.get(key, 0)
                elif attempt == 2:
                    self.status.mismatches += 1
                    MISMATCHES.inc()
                    log.error("scrub: %s bytes %d-%d differ between %s and %s (both checksums valid)",
                              rec.key, off, off + n, self.sn.node, src.node)
                    break
                await asyncio.sleep(0.2)
                rec2 = self._current(rec.volume, rec.index, rec.data_id)
                if rec2 is None:
                    return
                rec = rec2
                local = await self._verify(rec, off, n)
                if local is None:
                    return
