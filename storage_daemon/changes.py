"""What changed in an extent since a generation: lets a returning replica be resynced
(only the changed chunks copied) instead of copied whole.

A replica is dropped from its extent's set when a write cannot reach it (its node
went away, its disk failed, it did not answer in time): the generation goes up
and the writes go on without it. When the same node later rebuilds that extent
(``storage_daemon.rebuild``), its old copy misses exactly the writes the members
applied from the failed one on. Two sources tell which chunks those are:

* **the members' change logs** (``ChangeLog``): every write, zero and trim a
  storage daemon applies to a replica is noted by the generation it was applied
  under and when (in buckets of half the margin), as a bitmask of ``CHUNK``-sized pieces,
  in memory. The copy dropped at generation g missed the writes of later
  generations and those of g from the one that failed on it on: a write that
  fails on a member drops it before it is acked, within the peer timeout, so
  those came at most ``MARGIN`` seconds before the drop was recorded (the margin
  also covers clock skew between nodes). A member answers only when its log
  holds all of them: it has been in the extent's set (member or joining)
  without a break since generation g, as seen by this process, and its log
  began at least ``MARGIN`` seconds before the drop. Otherwise (a daemon that
  restarted since, a member that was itself rebuilt after g, a log trimmed past
  g) it answers "unknown";
* **the block checksums** (``ReplicaFile.chunk_digests``): a digest of each
  chunk's CRC32Cs on both sides. Chunks whose digests differ are copied too.
  This catches what no log can: a write that reached only the old copy (its
  ack was lost, the write failed elsewhere) or blocks a crash tore.

Only a replica that was complete when it was dropped (``ReplicaMeta.complete``:
not a copy interrupted half way) resyncs; when a member answers "unknown",
every chunk is copied (over the old file, zeros written where the member has
zeros): the plain rebuild. Either way the replica joins only when every chunk
is the members'.
"""

from __future__ import annotations

import json
import time

CHUNK = 1 << 20
MARGIN = 60.0             # seconds a log must predate a drop to answer for it
MAX_GENERATIONS = 64      # generations kept per extent (older ones: "unknown")
MAX_BUCKETS = 10          # masks of BUCKET seconds (margin / 2) kept apart per generation


class _Gen:
    """The chunks written under one generation: per ``bucket`` seconds for the last
    ``MAX_BUCKETS`` buckets written, older ones merged (with the end of the newest
    of them). A generation stops taking writes once it is not the current one, so
    the buckets before a drop stay apart."""

    __slots__ = ("bucket", "buckets", "old_mask", "old_end")

    def __init__(self, bucket: float):
        self.bucket = bucket
        self.buckets: dict[int, int] = {}
        self.old_mask = 0
        self.old_end = float("-inf")

    def add(self, bucket: int, mask: int) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0) | mask
        if len(self.buckets) > MAX_BUCKETS:
            first = min(self.buckets)
            self.old_mask |= self.buckets.pop(first)
            self.old_end = max(self.old_end, (first + 1) * self.bucket)

    def since(self, t: float) -> int:
        """Chunks written at or after unix time ``t`` (and some before: whole buckets)."""
        mask = self.old_mask if self.old_end >= t else 0
        for b, m in self.buckets.items():
            if (b + 1) * self.bucket >= t:
                mask |= m
        return mask


class ChangeLog:
    """Chunks written per (data id, extent index), generation and time, since this daemon started."""

    def __init__(self, chunk: int = CHUNK, margin: float = MARGIN, clock=time.time,
                 max_generations: int = MAX_GENERATIONS):
        self.chunk = chunk
        self.margin = margin   # (settable until the first write)
        self.clock = clock
        self.started = clock()
        self.max_generations = max_generations
        self._gens: dict[tuple[str, int], dict[int, _Gen]] = {}
        # oldest generation whose writes the log holds all of: from the first record seen
        # with this node in the set (on), raised when old generations are trimmed
        self._floor: dict[tuple[str, int], int] = {}

    def member(self, key: tuple[str, int], generation: int) -> None:
        """This node is in the set of ``key``'s record at ``generation`` (called for
        every record the daemon learns); the log answers from there on."""
        self._floor.setdefault(key, generation)

    def note(self, key: tuple[str, int], generation: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        gens = self._gens.setdefault(key, {})
        g = gens.get(generation)
        if g is None:
            g = gens[generation] = _Gen(max(1.0, self.margin / 2))
            if len(gens) > self.max_generations:
                oldest = min(gens)
                del gens[oldest]
                if key in self._floor:
                    self._floor[key] = max(self._floor[key], oldest + 1)
        g.add(int(self.clock() // g.bucket), ((1 << (last - first + 1)) - 1) << first)

    def since(self, key: tuple[str, int], generation: int, dropped_at: float) -> int | None:
        """Bitmask of the chunks a replica that last belonged to the set at
        ``generation`` and was dropped at unix time ``dropped_at`` misses: written
        under that generation from ``margin`` seconds before the drop on (before,
        every write reached it too: a write that fails on a member drops it before
        it is acked), and under every later one. None when this log cannot know
        (it began too late, or no longer holds that generation)."""
        if dropped_at <= 0 or dropped_at < self.started + self.margin:
            return None
        floor = self._floor.get(key)
        if floor is None or generation < floor:
            return None
        mask = 0
        for gen, g in self._gens.get(key, {}).items():
            if gen > generation:
                mask |= g.since(float("-inf"))
            elif gen == generation:
                mask |= g.since(dropped_at - self.margin)
        return mask

    def forget(self, key: tuple[str, int]) -> None:
        """This node left ``key``'s set (dropped, or the extent is gone): the log
        starts afresh if it comes back."""
        self._gens.pop(key, None)
        self._floor.pop(key, None)


def encode_answer(mask: int | None, digests: list[bytes]) -> bytes:
    """A member's answer to "what changed since": the log's mask (or unknown) and
    the chunk digests of its replica."""
    return json.dumps({"known": mask is not None, "mask": format(mask or 0, "x"),
                       "digests": [d.hex() for d in digests]}).encode()


def decode_answer(raw: bytes, chunks: int) -> tuple[int | None, list[bytes]]:
    """(mask or None, digests); ValueError when the answer is not one."""
    try:
        d = json.loads(raw)
        mask = int(d["mask"], 16) if d["known"] else None
        digests = [bytes.fromhex(x) for x in d["digests"]]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a changes answer: {exc!r}") from None
    if len(digests) != chunks:
        raise ValueError(f"changes answer has {len(digests)} digests, expected {chunks}")
    return mask, digests


def plan(mask: int | None, theirs: list[bytes], mine: list[bytes] | None) -> list[int]:
    """Indexes of the chunks to copy: all of them without a usable log or own
    digests; else the logged ones and those whose digests differ."""
    n = len(theirs)
    if mask is None or mine is None or len(mine) != n:
        return list(range(n))
    return [i for i in range(n) if mask >> i & 1 or theirs[i] != mine[i]]
