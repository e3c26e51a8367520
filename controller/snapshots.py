"""Snapshots, reverts and the hold that makes them crash-consistent.

A snapshot copies no data. Each extent record of the volume is split in
two (``ExtentRecord.freeze``): the snapshot keeps the current data (the same
replica files, under ``extent/@<snapshot>/<index>``) and the volume goes on
with new, empty data derived from it (``base``); each replica copies the
base into the new files on the first write to that extent (redirect-on-write
at extent granularity, a local file copy on every replica).

Crash consistency: the records of a volume are many keys, and its writes
come from storage daemons that learn about new records asynchronously. So
before the records change, every live storage daemon *holds* the volume's
writes (``storage/quiesce/<volume>``): new writes wait, those in flight
finish, then it answers (``storage/quiesced/<volume>/<node>``). With every
daemon answering, every write acknowledged so far is in the current data and
nothing else moves; the records are rewritten (a few etcd transactions), the
hold is lifted, and the daemons re-read the records before writing again.
What the snapshot holds is therefore exactly what the volume held at one
instant: what a crash at that instant would have left. Writes wait for the
length of the hold (``status.pause_seconds``; tens of milliseconds).

A daemon that does not answer within ``ACK_TIMEOUT`` fails the snapshot
(writes go on, nothing changed). A hold is lifted by the daemons themselves
after ``HOLD_TIMEOUT`` if the controller vanished; the controller only marks
a snapshot Ready when it finished well inside that time.

Reverting a volume rewrites its records the same way, deriving them from the
snapshot's; a volume that grew since gets empty extents past the snapshot.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import time
import uuid

import grpc

from braid import extents as X
from braid import keys
from braid import kinds as K
from braid.reconcile import Controller, Result
from braid.store import KV, AlreadyExists, Conflict, Election, Informer, NotFound, Store
from braid.v1 import storage_pb2
from controller.resources import ApiError

log = logging.getLogger("braid.controller.snapshots")

SNAPSHOT = K.KINDS["snapshot"]
VOLUME = K.KINDS["volume"]
ACK_TIMEOUT = 10.0     # seconds every live storage daemon has to hold a volume's writes
HOLD_TIMEOUT = 30.0    # a daemon lifts a hold by itself after this
MARGIN = 5.0           # the records must be rewritten this long before a daemon would give up
BATCH = 50             # extents per etcd transaction (2 operations each; etcd allows 128)


class HoldFailed(Exception):
    pass


def _live_storaged(store: Store) -> set[str]:
    kvs, _ = store.list(keys.LIVE)
    return {p[0] for kv in kvs if (p := keys.parse_live(kv.key)) and p[1] == "storaged"}


@contextlib.contextmanager
def held(store: Store, volume: str, why: str, guards=(), ack_timeout: float = ACK_TIMEOUT,
         timeout: float = HOLD_TIMEOUT):
    """Hold the writes of ``volume`` on every live storage daemon for the
    body of the ``with``; yields the monotonic deadline the body must finish
    by. HoldFailed when another hold is in force or a daemon does not answer."""
    op = f"{why} {uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    try:
        store.create(keys.quiesce(volume), json.dumps({"op": op, "timeout": timeout}).encode(), guards=guards)
    except AlreadyExists:
        raise HoldFailed(f"volume {volume} is held for another snapshot or revert; try again") from None
    try:
        missing: set[str] = set()
        while True:
            acks, _ = store.list(keys.quiesced_prefix(volume))
            done = {kv.key.rsplit("/", 1)[1] for kv in acks if kv.value.decode(errors="replace") == op}
            missing = _live_storaged(store) - done
            if not missing:
                break
            if time.monotonic() - t0 > ack_timeout:
                raise HoldFailed(f"the storage daemons of {', '.join(sorted(missing))} did not hold the "
                                 f"writes of {volume} within {ack_timeout:.0f}s")
            time.sleep(0.005)
        yield t0 + timeout - MARGIN
    finally:
        store.delete_prefix(keys.quiesced_prefix(volume))
        with contextlib.suppress(NotFound):
            store.delete(keys.quiesce(volume))


def _records(store: Store, name: str) -> dict[int, tuple[X.ExtentRecord, KV]]:
    kvs, _ = store.list(X.volume_prefix(name))
    out = {}
    for kv in kvs:
        parsed = X.parse_key(kv.key)
        if parsed is None:
            continue
        try:
            out[parsed[1]] = (X.ExtentRecord.from_json(kv.value), kv)
        except X.BadRecord as exc:
            raise HoldFailed(f"extent record {kv.key} is malformed ({exc})") from None
    return out


def _rewrite(store: Store, name: str, plan, deadline: float, guards=()) -> int:
    """Apply ``plan(records, done) -> [((key, value) to create | None, (record, kv, new record))]``
    in transactions of BATCH extents, re-planning the extents not ``done``
    when some changed meanwhile (a rebuild may promote a replica during the
    hold). Returns how many extents were rewritten."""
    done: set[int] = set()
    for _attempt in range(20):
        steps = plan(_records(store, name), done)
        if not steps:
            return len(done)
        conflict = False
        for i in range(0, len(steps), BATCH):
            creates, updates = {}, {}
            for create, (rec, kv, new) in steps[i:i + BATCH]:
                if create:
                    creates[create[0]] = create[1]
                updates[rec.key] = (new.to_json(), kv.mod_revision)
            try:
                store.apply_many(creates, updates, guards=guards)
                done.update(rec.index for _, (rec, _, _) in steps[i:i + BATCH])
            except Conflict:
                conflict = True
            if time.monotonic() > deadline:
                raise HoldFailed("rewriting the extent map took too long")
        if not conflict:
            return len(done)
    raise HoldFailed("the extent map kept changing")


def take(store: Store, snap: storage_pb2.Snapshot, vol: storage_pb2.Volume, guards=()) -> float:
    """Freeze ``vol`` into ``snap`` (see the module doc). Returns the pause in seconds."""
    name, snapshot = vol.metadata.name, snap.metadata.name
    t0 = time.monotonic()
    with held(store, name, f"snapshot {snapshot}", guards) as deadline:
        def plan(records, done):
            out = []
            for i, (rec, kv) in sorted(records.items()):
                if rec.uid != vol.metadata.uid or i in done:
                    continue
                frozen, nxt = rec.freeze(snapshot, snap.metadata.uid, X.new_data_id())
                out.append(((frozen.key, frozen.to_json()), (rec, kv, nxt)))
            return out

        _rewrite(store, name, plan, deadline, guards)
    return time.monotonic() - t0


def revert(store: Store, volume: str, snapshot: str) -> tuple[int, float]:
    """Make ``volume``'s data that of ``snapshot`` (which must be of it and
    Ready). Refused while a running VM uses the volume. (extents, pause s)."""
    vol = _get(store, VOLUME, volume)
    snap = _get(store, SNAPSHOT, snapshot)
    if snap.spec.volume != volume or snap.status.volume_uid != vol.metadata.uid:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"snapshot {snapshot} is not a snapshot of volume {volume}")
    if snap.status.phase != "Ready":
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"snapshot {snapshot} is {snap.status.phase or 'Pending'}, not Ready")
    users = _running_users(store, volume)
    if users:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"volume {volume} is used by running VMs ({', '.join(users)}): stop them first "
                       "(a guest would see its disk change under it)")
    source = {i: rec for i, (rec, _) in _records(store, X.snapshot_extents(snapshot)).items()}
    if len(source) < snap.status.extents:
        raise ApiError(grpc.StatusCode.DATA_LOSS, f"snapshot {snapshot} lacks extent records "
                                                  f"({len(source)} of {snap.status.extents})")
    t0 = time.monotonic()

    def plan(records, done):
        out = []
        for i, (rec, kv) in sorted(records.items()):
            if rec.uid != vol.metadata.uid or i in done:
                continue
            src = source.get(i)
            if src is not None:
                new = src.derive(volume, vol.metadata.uid, X.new_data_id(),
                                 generation=max(rec.generation, src.generation) + 1, fenced=rec.fenced)
            else:   # the volume grew after the snapshot: that part reads as zeros again
                new = X.ExtentRecord(volume, rec.uid, i, rec.size, rec.generation + 1, rec.replicas,
                                     rec.dropped, rec.fenced, rec.joining, X.new_data_id())
            out.append((None, (rec, kv, new)))
        return out

    try:
        with held(store, volume, f"revert to {snapshot}") as deadline:
            n = _rewrite(store, volume, plan, deadline)
    except HoldFailed as exc:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    log.info("volume %s reverted to snapshot %s (%d extents)", volume, snapshot, n)
    return n, time.monotonic() - t0


def _get(store: Store, kind: K.Kind, name: str):
    spec, status = store.get(kind.spec_key(name)), store.get(kind.status_key(name))
    if spec is None:
        raise ApiError(grpc.StatusCode.NOT_FOUND, f"{kind.name} {name!r} not found")
    try:
        return K.assemble(kind, name, spec, status)
    except K.CorruptObject as exc:
        raise ApiError(grpc.StatusCode.DATA_LOSS, str(exc)) from None


def _running_users(store: Store, volume: str) -> list[str]:
    vm_kind = K.KINDS["vm"]
    kvs, _ = store.list(vm_kind.spec_prefix)
    out = []
    for kv in kvs:
        try:
            vm = K.from_json(kv.value, vm_kind.message, kv.key)
        except K.CorruptObject:
            continue
        if vm.spec.power_state == 1 and any(d.volume == volume for d in vm.spec.disks):
            out.append(vm.metadata.name or kv.key.rsplit("/", 1)[1])
    return sorted(out)


def allocated(records, usage: dict[str, dict[str, int]]) -> int:
    """Bytes written to the data of ``records`` (one copy: the largest replica)."""
    total = 0
    for r in records:
        total += max((usage.get(rep.node, {}).get(f"{r.data_id}/{r.index}", 0) for rep in r.replicas),
                     default=0)
    return total


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class SnapshotReconciler:
    """Takes Pending snapshots, removes the records of deleted ones, keeps
    ``status.allocated_bytes`` current. Runs on the elected controller."""

    def __init__(self, store: Store, election: Election):
        self.store = store
        self.election = election
        self.controller = Controller("snapshots", self.reconcile, workers=1, resync_period=30.0,
                                     list_keys=self._names)
        self.informers = [
            Informer(store, "snapshot/", self._on_snapshot, name="snapshots"),
            Informer(store, keys.USAGE, self._on_usage, name="snapshots-usage"),
        ]

    def _names(self):
        return sorted({k.split("/", 2)[2] for k in self.informers[0].keys() if k.count("/") == 2})

    def _on_snapshot(self, key: str, kv: KV | None) -> None:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1] in ("spec", "status"):
            self.controller.enqueue(parts[2])

    def _on_usage(self, key: str, kv: KV | None) -> None:
        for name in self._names():
            self.controller.enqueue(name)

    def start(self) -> None:
        self.controller.start()
        for inf in self.informers:
            inf.start()

    def stop(self) -> None:
        for inf in self.informers:
            inf.request_stop()
        for inf in self.informers:
            inf.stop()
        self.controller.stop()

    def _usage(self) -> dict[str, dict[str, int]]:
        out = {}
        for key in self.informers[1].keys():
            kv = self.informers[1].get(key)
            try:
                out[key[len(keys.USAGE):]] = {str(k): int(v) for k, v in json.loads(kv.value).items()}
            except (ValueError, TypeError, AttributeError):
                pass
        return out

    def reconcile(self, name: str) -> Result | None:
        if not self.election.is_leader:
            return None
        guard = self.election.guard()
        spec_kv, status_kv = self.store.get(SNAPSHOT.spec_key(name)), self.store.get(SNAPSHOT.status_key(name))
        prefix = X.volume_prefix(X.snapshot_extents(name))
        if spec_kv is None:   # deleted: its records go; the daemons reclaim data nothing derives from
            n = self.store.delete_prefix(prefix)
            if status_kv is not None:
                self.store.delete(SNAPSHOT.status_key(name), guards=[guard])
            if n:
                log.info("snapshot %s deleted: removed %d extent records", name, n)
            return None
        try:
            snap = K.assemble(SNAPSHOT, name, spec_kv, status_kv)
        except K.CorruptObject as exc:
            log.warning("snapshot %s: %s", name, exc)
            return None
        st = storage_pb2.SnapshotStatus()
        st.CopyFrom(snap.status)
        if st.phase == "Ready":
            recs, _ = self.store.list(prefix)
            parsed = []
            for kv in recs:
                with contextlib.suppress(X.BadRecord):
                    parsed.append(X.ExtentRecord.from_json(kv.value))
            st.allocated_bytes = allocated(parsed, self._usage())
        elif st.phase != "Failed":
            retry = self._take(snap, st, guard)
            if retry is not None:
                return retry
        if st != snap.status or status_kv is None:
            self.store.put(SNAPSHOT.status_key(name), K.to_json(st), guards=[guard])
        return None

    def _take(self, snap, st: storage_pb2.SnapshotStatus, guard) -> Result | None:
        name = snap.metadata.name
        if self.store.list(X.volume_prefix(X.snapshot_extents(name)))[0]:
            st.phase, st.message = "Failed", ("interrupted while being taken (controller restart); "
                                              "delete it and take it again")
            return None
        try:
            vol = _get(self.store, VOLUME, snap.spec.volume)
        except ApiError as exc:
            st.phase, st.message = "Failed", exc.message
            return None
        want = X.extent_count(vol.spec.size_bytes, vol.spec.extent_size_bytes or X.DEFAULT_EXTENT_SIZE)
        placed = [r for r, _ in _records(self.store, vol.metadata.name).values() if r.uid == vol.metadata.uid]
        if len(placed) < want:
            st.phase, st.message = "Pending", f"volume {vol.metadata.name} is not placed yet"
            self.store.put(SNAPSHOT.status_key(name), K.to_json(st), guards=[guard])
            return Result(requeue_after=1.0)
        try:
            pause = take(self.store, snap, vol, guards=[guard])
        except HoldFailed as exc:
            st.phase, st.message = "Failed", str(exc)
            log.warning("snapshot %s of %s failed: %s", name, vol.metadata.name, exc)
            return None
        st.phase, st.message = "Ready", ""
        st.volume_uid = vol.metadata.uid
        st.size_bytes = vol.spec.size_bytes
        st.extent_size_bytes = vol.spec.extent_size_bytes or X.DEFAULT_EXTENT_SIZE
        st.extents = want
        st.replicas = vol.spec.replicas or 2
        st.created_at = _now()
        st.pause_seconds = round(pause, 4)
        log.info("snapshot %s of volume %s taken: %d extents, writes held %.0f ms", name,
                 vol.metadata.name, want, pause * 1000)
        return None
