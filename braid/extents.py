"""The extent map of replicated volumes: records, keys and the placement planner.

A volume of ``size_bytes`` is cut into extents of ``extent_size_bytes``
(default 64 MiB; the last one may be shorter). Each extent has one record in
etcd::

    extent/<volume>/<index:06d>  ->  {"volume": "vol1", "uid": "<volume uid>",
                                      "index": 3, "size": 67108864,
                                      "generation": 5,
                                      "replicas": [{"node": "n1", "disk": "d1"}, ...],
                                      "dropped": [{"node": "n3", "disk": "d1",
                                                   "generation": 4, "reason": "..."}]}

``generation`` goes up by one every time the replica set changes (a replica
is dropped; a new one starts to be rebuilt (``joining``) or joins after it). Every replication request
carries the generation its sender believes in; a replica whose record has a
newer generation refuses it (ESTALE), and a storage daemon that is not in
``replicas`` any more refuses all I/O for that extent. Records are written
only with compare-and-set on their mod_revision, so two writers can never
both bump from the same generation. Replica files on disk are named by the
volume's uid, so a volume re-created under an old name never sees old data.

The controller writes records when it places a volume (and grows it); a
storage daemon that serves a volume writes a record when a replica stops
answering (drop + bump) before it acks the write that needed it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field

from braid import keys

PREFIX = keys.EXTENT
DEFAULT_EXTENT_SIZE = 64 << 20
BLOCK = 4096


class BadRecord(ValueError):
    """An extent record in etcd that is not what Braid writes."""


@dataclass(frozen=True)
class Replica:
    node: str
    disk: str


@dataclass(frozen=True)
class Dropped:
    node: str
    disk: str
    generation: int   # the generation the replica last belonged to
    reason: str = ""
    at: float = 0.0   # when (unix time; 0: unknown)


@dataclass(frozen=True)
class ExtentRecord:
    volume: str
    uid: str
    index: int
    size: int
    generation: int
    replicas: tuple[Replica, ...]
    dropped: tuple[Dropped, ...] = field(default=())
    fenced: tuple[str, ...] = field(default=())   # nodes that must not write (HA fencing)
    # replicas being rebuilt: every write goes to them too (failing one drops it),
    # no read comes from them; they join ``replicas`` once their copy is complete
    joining: tuple[Replica, ...] = field(default=())
    # snapshots and linked clones (redirect-on-write at extent granularity):
    # ``data`` names the replica files of this extent (default: ``uid``); ``base``
    # lists the data of the extents it was derived from, nearest first. A replica
    # whose own files do not exist yet reads from the first base it holds, and
    # its first write copies that base into its own files (the base itself,
    # owned by a snapshot, never changes).
    data: str = ""
    base: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return extent_key(self.volume, self.index)

    @property
    def data_id(self) -> str:
        """The name of this extent's replica files on the disks."""
        return self.data or self.uid

    def holds(self, node: str) -> Replica | None:
        """This node's replica in the current set, if any."""
        return next((r for r in self.replicas if r.node == node), None)

    def joiner(self, node: str) -> Replica | None:
        """This node's replica being rebuilt, if any."""
        return next((r for r in self.joining if r.node == node), None)

    def writable(self, node: str) -> Replica | None:
        """The replica on ``node`` that takes writes (member or joining)."""
        return self.holds(node) or self.joiner(node)

    def _next(self, **changes) -> "ExtentRecord":
        return dataclasses.replace(self, generation=self.generation + 1, **changes)

    def bump(self) -> "ExtentRecord":
        """The same set at the next generation (refuses what was in flight)."""
        return self._next()

    def without(self, lost: list[Replica], reason: str) -> "ExtentRecord":
        """The next generation with ``lost`` (members or joining) moved to ``dropped``."""
        everyone = self.replicas + self.joining
        now = round(time.time(), 3)
        gone = tuple(Dropped(r.node, r.disk, self.generation, reason, now) for r in everyone if r in lost)
        dropped = tuple(d for d in self.dropped if (d.node, d.disk) not in {(g.node, g.disk) for g in gone})
        return self._next(replicas=tuple(r for r in self.replicas if r not in lost),
                          joining=tuple(r for r in self.joining if r not in lost),
                          dropped=dropped + gone)

    def join(self, rep: Replica) -> "ExtentRecord":
        """The next generation with a new replica being rebuilt on ``rep``."""
        return self._next(joining=self.joining + (rep,))

    def promote(self, rep: Replica) -> "ExtentRecord":
        """The next generation with the rebuilt ``rep`` a member of the set."""
        return self._next(joining=tuple(r for r in self.joining if r != rep),
                          replicas=self.replicas + (rep,),
                          dropped=tuple(d for d in self.dropped if (d.node, d.disk) != (rep.node, rep.disk)))

    def fence(self, node: str) -> "ExtentRecord":
        """The next generation with ``node`` fenced: its storage daemon no
        longer writes this extent for its VMs (in-flight writes it sends with
        the old generation are refused by the replicas)."""
        return self._next(fenced=tuple(sorted({*self.fenced, node})))

    def unfence(self, node: str) -> "ExtentRecord":
        return self._next(fenced=tuple(n for n in self.fenced if n != node))

    def freeze(self, snapshot: str, snapshot_uid: str, new_data: str) -> tuple["ExtentRecord", "ExtentRecord"]:
        """Taking a snapshot: (the snapshot's record, this extent's next record).
        The snapshot keeps the current data (same files, same generation: the
        replicas need not change anything); the volume continues on
        ``new_data``, derived from it, at the next generation (what was in
        flight with the old one is refused)."""
        snap = dataclasses.replace(self, volume=snapshot_extents(snapshot), uid=snapshot_uid,
                                   data=self.data_id, joining=(), dropped=(), fenced=())
        return snap, self._next(data=new_data, base=(self.data_id,) + self.base)

    def derive(self, volume: str, uid: str, new_data: str, generation: int = 1,
               fenced: tuple[str, ...] = ()) -> "ExtentRecord":
        """A record of ``volume`` whose data starts as this one's (a linked
        clone of a snapshot, or a volume reverted to it): same replicas, new
        files that are copied from this record's on their first write."""
        return dataclasses.replace(self, volume=volume, uid=uid, data=new_data,
                                   base=(self.data_id,) + self.base, generation=generation,
                                   joining=(), dropped=(), fenced=fenced)

    def to_json(self) -> bytes:
        return json.dumps({
            "volume": self.volume, "uid": self.uid, "index": self.index, "size": self.size,
            "generation": self.generation,
            "replicas": [{"node": r.node, "disk": r.disk} for r in self.replicas],
            "dropped": [{"node": d.node, "disk": d.disk, "generation": d.generation, "reason": d.reason,
                         **({"at": d.at} if d.at else {})} for d in self.dropped],
            **({"fenced": list(self.fenced)} if self.fenced else {}),
            **({"joining": [{"node": r.node, "disk": r.disk} for r in self.joining]} if self.joining else {}),
            **({"data": self.data} if self.data and self.data != self.uid else {}),
            **({"base": list(self.base)} if self.base else {}),
        }, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "ExtentRecord":
        """Parse and validate a record; BadRecord says what is wrong."""
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRecord(f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise BadRecord("not a JSON object")
        try:
            rec = cls(
                volume=_str(d, "volume"), uid=_str(d, "uid"), index=_int(d, "index"),
                size=_int(d, "size"), generation=_int(d, "generation"),
                replicas=tuple(Replica(_str(r, "node"), _str(r, "disk")) for r in _list(d, "replicas")),
                dropped=tuple(Dropped(_str(r, "node"), _str(r, "disk"), _int(r, "generation"),
                                      str(r.get("reason", "")), _time(r))
                              for r in _list(d, "dropped", True)),
                fenced=tuple(_names(d)),
                joining=tuple(Replica(_str(r, "node"), _str(r, "disk")) for r in _list(d, "joining", True)),
                data=_opt_id(d, "data"),
                base=tuple(_ids(d)),
            )
        except (TypeError, AttributeError) as exc:
            raise BadRecord(str(exc)) from None
        if rec.size <= 0 or rec.size % BLOCK or rec.index < 0 or rec.generation < 1:
            raise BadRecord(f"bad size/index/generation ({rec.size}, {rec.index}, {rec.generation})")
        if len({r.node for r in rec.replicas + rec.joining}) != len(rec.replicas) + len(rec.joining):
            raise BadRecord("two replicas on one node")
        return rec


def _str(d, key: str) -> str:
    v = d[key] if isinstance(d, dict) and key in d else None
    if not isinstance(v, str) or not v:
        raise BadRecord(f"field {key!r} must be a non-empty string")
    return v


_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")   # a directory name on the disks


def _opt_id(d, key: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str) or (v and not _ID_RE.match(v)):
        raise BadRecord(f"field {key!r} must be a data id (lowercase letters, digits, '-')")
    return v


def _ids(d) -> list[str]:
    v = d.get("base", [])
    if not isinstance(v, list) or not all(isinstance(x, str) and _ID_RE.match(x) for x in v):
        raise BadRecord("field 'base' must be a list of data ids")
    return v


def _time(d) -> float:
    v = d.get("at", 0.0) if isinstance(d, dict) else 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise BadRecord("field 'at' must be a non-negative number")
    return float(v)


def _names(d) -> list[str]:
    v = d.get("fenced", [])
    if not isinstance(v, list) or not all(isinstance(n, str) and n for n in v):
        raise BadRecord("field 'fenced' must be a list of node names")
    return v


def _int(d, key: str) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRecord(f"field {key!r} must be an integer")
    return v


def _list(d, key: str, optional: bool = False) -> list:
    v = d.get(key, [] if optional else None)
    if not isinstance(v, list):
        raise BadRecord(f"field {key!r} must be a list")
    return v


SNAPSHOT_MARK = keys.SNAPSHOT_MARK


def snapshot_extents(snapshot: str) -> str:
    """The ``volume`` part of a snapshot's extent records."""
    return SNAPSHOT_MARK + snapshot


def new_data_id() -> str:
    import uuid
    return str(uuid.uuid4())


extent_key = keys.extent          # the record keys are braid.keys'
volume_prefix = keys.extent_prefix
parse_key = keys.parse_extent


def extent_count(size_bytes: int, extent_size: int) -> int:
    return (size_bytes + extent_size - 1) // extent_size


def extent_length(size_bytes: int, extent_size: int, index: int) -> int:
    """Bytes of extent ``index`` that lie inside the volume (the last may be short)."""
    return max(0, min(extent_size, size_bytes - index * extent_size))


@dataclass
class DiskCandidate:
    """A disk the planner may put replicas on."""
    node: str
    disk: str
    free_bytes: int
    hot_spare: bool = False


class PlacementError(Exception):
    pass


def place(indexes: list[int], replicas: int, extent_size: int, disks: list[DiskCandidate],
          seed: str = "") -> dict[int, tuple[Replica, ...]]:
    """Pure planner: choose ``replicas`` disks on distinct nodes for every
    extent in ``indexes``, balancing by free space.

    Each pick takes, per node, the disk with the most projected free space,
    then the ``replicas`` nodes with the most; the chosen disks' projected
    free space drops by ``extent_size`` (we plan for fully written extents,
    although they are thin). Ties break on a hash of ``seed`` so volumes do
    not all start on the same node. Hot spares are kept out (they are for
    rebuilds). Raises PlacementError when fewer than ``replicas`` nodes have
    room."""
    if replicas < 1:
        raise PlacementError("replicas must be at least 1")
    pool = [DiskCandidate(d.node, d.disk, d.free_bytes) for d in disks if not d.hot_spare]
    nodes = sorted({d.node for d in pool})
    if len(nodes) < replicas:
        raise PlacementError(f"{replicas} replicas need {replicas} nodes with disks; "
                             f"{len(nodes)} available ({', '.join(nodes) or 'none'})")
    rot = sum(seed.encode()) % max(1, len(nodes))
    order = {n: (i - rot) % len(nodes) for i, n in enumerate(nodes)}
    out: dict[int, tuple[Replica, ...]] = {}
    for idx in indexes:
        best_per_node: dict[str, DiskCandidate] = {}
        for d in pool:
            cur = best_per_node.get(d.node)
            if cur is None or (d.free_bytes, d.disk) > (cur.free_bytes, cur.disk):
                best_per_node[d.node] = d
        ranked = sorted(best_per_node.values(),
                        key=lambda d: (-d.free_bytes, (order[d.node] + idx) % len(nodes)))
        chosen = [d for d in ranked if d.free_bytes >= extent_size][:replicas]
        if len(chosen) < replicas:
            raise PlacementError(f"not enough free space: extent {idx} needs {replicas} nodes with "
                                 f"{extent_size >> 20} MiB free, {len(chosen)} have it")
        for d in chosen:
            d.free_bytes -= extent_size
        out[idx] = tuple(Replica(d.node, d.disk) for d in chosen)
    return out


def unfence(store, volumes, node: str) -> int:
    """Lift ``node``'s HA fence on every extent of ``volumes`` (the node
    now runs the VM that uses them). One CAS per fenced extent; returns how
    many records changed. ``store`` is a ``braid.store.Store``."""
    from braid.store import Conflict
    changed = 0
    for vol in sorted(set(volumes)):
        kvs, _ = store.list(volume_prefix(vol))
        for kv in kvs:
            for _attempt in range(5):
                try:
                    rec = ExtentRecord.from_json(kv.value)
                except BadRecord:
                    break
                if node not in rec.fenced:
                    break
                try:
                    store.update(kv.key, rec.unfence(node).to_json(), kv.mod_revision)
                    changed += 1
                    break
                except Conflict:
                    kv = store.get(kv.key)
                    if kv is None:
                        break
    return changed



DROP_COOLDOWN = 60.0   # seconds a node dropped from an extent is not chosen to rebuild it


def repair(rec: ExtentRecord, policy: int, usable, disks: list[DiskCandidate],
           now: float = 0.0, cooldown: float = DROP_COOLDOWN, started: dict[str, float] | None = None):
    """Pure planner of one extent's repair. ``usable(replica)`` says whether a
    member can be counted on (its storage daemon is live, or was until the
    grace ran out, and its disk is healthy). Returns one step:

    * ``("join", Replica)``: fewer usable members + joiners than ``policy``:
      rebuild on the disk of another node (hot spares first, then the most
      free space), not on a node dropped from this extent less than
      ``cooldown`` seconds before ``now`` (its lease may outlive it: choosing
      it again would only be dropped again by the next write), unless its
      storage daemon started after the drop (``started``: node -> unix time):
      then it is back for real. A disk this extent was dropped from comes
      first of all: its old copy is resynced, only what changed since is
      copied (``storage_daemon.changes``);
    * ``("drop", [Replica, ...])``: joiners that are not usable (their copy
      cannot finish); once enough usable members exist, the unusable ones (a
      bad disk is evacuated only after its data lives elsewhere, never
      before); members beyond ``policy`` (the newest);
    * None: nothing to do (or nowhere to go).
    Never plans a rebuild without a member to copy from.
    """
    lost_joiners = [r for r in rec.joining if not usable(r)]
    if lost_joiners:   # a copy that cannot finish: make room for another
        return ("drop", lost_joiners)
    good = [r for r in rec.replicas if usable(r)]
    bad = [r for r in rec.replicas if not usable(r)]
    if len(good) >= policy and bad:
        return ("drop", bad)
    if len(good) > policy and not rec.joining:   # e.g. a disk that was bad is fine again
        return ("drop", good[policy:])
    if not rec.replicas or len(good) + len(rec.joining) >= policy:
        return None
    taken = {r.node for r in rec.replicas + rec.joining}
    started = started or {}
    taken |= {d.node for d in rec.dropped if d.at and now - d.at < cooldown and started.get(d.node, 0) <= d.at}
    old_copies = {(d.node, d.disk) for d in rec.dropped}
    options = [d for d in disks if d.node not in taken
               and (d.free_bytes >= rec.size or (d.node, d.disk) in old_copies)]
    if not options:
        return None
    best = min(options, key=lambda d: ((d.node, d.disk) not in old_copies, not d.hot_spare, -d.free_bytes,
                                       d.node, d.disk))
    return ("join", Replica(best.node, best.disk))
