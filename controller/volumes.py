"""Volume reconciler of the controller: places extents, reports status.

Runs only on the replica that leads the ``controller`` election; every
write carries the election guard. For each volume it

* places every extent that has no record yet (new volume, or the volume
  grew) on ``spec.replicas`` distinct nodes, balancing by the free space the
  storage daemons report in their DiskPool status (``braid.extents.place``),
  and creates the records (create-if-absent, generation 1);
* deletes all records of a deleted volume (the storage daemons then reclaim
  the space of replicas that no record names);
* writes the status: phase (Pending: not placeable yet, Healthy, Degraded:
  some extent lost replicas, Failed: some extent has none), extent counts,
  allocated bytes (what the storage daemons report in ``storage/usage/``),
  and the NBD URIs of the volume on every node whose storage daemon is live.

Level-triggered: ``reconcile(name)`` re-reads everything it needs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

from braid import extents as X
from braid import keys
from braid import kinds as K
from braid.reconcile import Controller, Result
from braid.store import KV, AlreadyExists, Conflict, Election, Informer, NotFound, Store
from braid.v1 import node_pb2, storage_pb2

log = logging.getLogger("braid.controller.volumes")

KIND = K.KINDS["volume"]
POOL = K.KINDS["diskpool"]


def volume_status(vol: storage_pb2.Volume, records: dict[int, X.ExtentRecord],
                  usage: dict[str, dict[str, int]], placement_error: str,
                  exports: list[storage_pb2.VolumeExport],
                  progress: dict[str, tuple[int, int]] | None = None) -> storage_pb2.VolumeStatus:
    """Pure: the status a volume should show, from its extent records."""
    want = X.extent_count(vol.spec.size_bytes, vol.spec.extent_size_bytes)
    st = storage_pb2.VolumeStatus(extents=want, observed_generation=vol.metadata.generation)
    have = [records[i] for i in range(want) if i in records]
    st.healthy_extents = sum(1 for r in have if len(r.replicas) >= vol.spec.replicas)
    allocated = physical = 0
    for r in have:  # the largest replica of each extent (they converge to the same data)
        def used(data: str) -> int | None:
            got = [usage[rep.node][f"{data}/{r.index}"] for rep in r.replicas
                   if f"{data}/{r.index}" in usage.get(rep.node, {})]
            return max(got) if got else None
        own = used(r.data_id)
        physical += own or 0
        if own is None:   # not written since the snapshot it derives from: the snapshot's data
            own = next((u for u in map(used, r.base) if u is not None), 0)
        allocated += own
    st.allocated_bytes = allocated
    st.physical_bytes = physical
    st.exports.extend(exports)
    empty = [r.index for r in have if not r.replicas]
    short = [r for r in have if 0 < len(r.replicas) < vol.spec.replicas]
    if len(have) < want:
        st.phase = "Pending"
        st.message = placement_error or f"{want - len(have)} of {want} extents not placed yet"
    elif empty:
        st.phase = "Failed"
        st.message = f"extents without any replica: {_ranges(empty)}"
    elif any(r.joining for r in have):
        joining = [r for r in have if r.joining]
        done = total = 0
        for r in joining:
            d, t = (progress or {}).get(f"{r.volume}/{r.index}", (0, r.size))
            done, total = done + min(d, t), total + t
        st.phase = "Rebuilding"
        st.rebuild_progress = done / total if total else 0.0
        st.message = (f"rebuilding {len(joining)} of {want} extents: {st.rebuild_progress:.0%} "
                      f"(to {', '.join(sorted({j.node for r in joining for j in r.joining}))})")
    elif vol.spec.full_clone and any(r.base for r in have):
        st.phase = "Cloning"
        st.clone_progress = sum(1 for r in have if not r.base) / len(have)
        st.message = (f"copying the extents of snapshot {vol.spec.source_snapshot}: "
                      f"{st.clone_progress:.0%}")
    elif short:
        st.phase = "Degraded"
        lost = sorted({d.node for r in short for d in r.dropped})
        st.message = (f"{len(short)} of {want} extents below {vol.spec.replicas} replicas "
                      f"(lost: {', '.join(lost) or '?'})")
    else:
        st.phase = "Healthy"
    return st


def _ranges(idx: list[int]) -> str:
    return ", ".join(str(i) for i in idx[:10]) + (" ..." if len(idx) > 10 else "")


def export_uris(volume: str, live: dict[str, node_pb2.DaemonStatus]) -> list[storage_pb2.VolumeExport]:
    """NBD URIs of the volume on every node with a live storage daemon: the
    unix socket (what QEMU on that node uses) and, if it serves TCP, the
    loopback/storage-network address."""
    out = []
    for node in sorted(live):
        info = live[node]
        if info.nbd_socket_dir:
            out.append(storage_pb2.VolumeExport(
                node=node, uri=f"nbd+unix:///{volume}?socket={info.nbd_socket_dir}/{volume}.sock"))
        if info.nbd_address:
            out.append(storage_pb2.VolumeExport(node=node, uri=f"nbd://{info.nbd_address}/{volume}"))
    return out


RACE = -1.0   # _repair: a record changed under it


class VolumeReconciler:
    def __init__(self, store: Store, election: Election, rebuild_delay: float = 60.0):
        """``rebuild_delay``: seconds a storage daemon may be away before its
        replicas are rebuilt elsewhere (a restart should not trigger copies)."""
        self.store = store
        self.election = election
        self.rebuild_delay = rebuild_delay
        self._absent_since: dict[str, float] = {}
        self.controller = Controller("volumes", self.reconcile, workers=1, resync_period=30.0,
                                     list_keys=self._names)
        self.informers = [
            Informer(store, "volume/", self._on_volume, name="volumes"),
            Informer(store, keys.EXTENT, self._on_extent, name="extents"),
            Informer(store, "diskpool/", self._on_other, name="volumes-pools"),
            Informer(store, keys.LIVE, self._on_other, name="volumes-live"),
            Informer(store, keys.USAGE, self._on_other, name="volumes-usage"),
            Informer(store, keys.REBUILD, self._on_other, name="volumes-rebuilds"),
        ]

    def _names(self):
        return sorted({k.split("/", 2)[2] for k in self.informers[0].keys() if k.count("/") == 2})

    def _on_volume(self, key: str, kv: KV | None) -> None:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1] in ("spec", "status"):
            self.controller.enqueue(parts[2])

    def _on_extent(self, key: str, kv: KV | None) -> None:
        parsed = X.parse_key(key)
        if parsed:
            self.controller.enqueue(parsed[0])

    def _on_other(self, key: str, kv: KV | None) -> None:
        if key.startswith(keys.LIVE) and not key.endswith("/storaged"):
            return
        for name in self._names() + self._snapshot_groups():
            self.controller.enqueue(name)

    def _snapshot_groups(self) -> list[str]:
        """``@<snapshot>`` of every snapshot with extent records (they are repaired too)."""
        return sorted({p[0] for k in self.informers[1].keys()
                       if (p := X.parse_key(k)) and p[0].startswith(X.SNAPSHOT_MARK)})

    def start(self) -> None:
        self.controller.start()
        for inf in self.informers:
            inf.start()

    def stop(self) -> None:
        for inf in self.informers:  # all at once: each takes a moment to leave its watch
            inf.request_stop()
        for inf in self.informers:
            inf.stop()
        self.controller.stop()

    # -- inputs ----------------------------------------------------------------

    def _live_storaged(self) -> dict[str, node_pb2.DaemonStatus]:
        out = {}
        for key in self.informers[3].keys():
            parsed = keys.parse_live(key)
            if parsed and parsed[1] == "storaged":
                kv = self.informers[3].get(key)
                if kv is None:
                    continue
                try:
                    out[parsed[0]] = K.from_json(kv.value, node_pb2.DaemonStatus, key)
                except K.CorruptObject as exc:
                    log.warning("ignoring %s", exc)
        return out

    def _candidates(self, live: dict[str, node_pb2.DaemonStatus]) -> list[X.DiskCandidate]:
        """Healthy disks of pools whose storage daemon is live."""
        out = []
        for key in self.informers[2].keys():
            if not key.startswith(POOL.status_prefix):
                continue
            name = key[len(POOL.status_prefix):]
            spec_kv, status_kv = self.informers[2].get(POOL.spec_key(name)), self.informers[2].get(key)
            if spec_kv is None or status_kv is None:
                continue
            try:
                pool = K.assemble(POOL, name, spec_kv, status_kv)
            except K.CorruptObject as exc:
                log.warning("disk pool %s: %s", name, exc)
                continue
            if pool.spec.node not in live:
                continue
            spares = {d.name for d in pool.spec.disks if d.hot_spare}
            for d in pool.status.disks:
                if d.health == "Healthy":
                    out.append(X.DiskCandidate(pool.spec.node, d.name,
                                               max(0, d.capacity_bytes - d.used_bytes), d.name in spares))
        return out

    def _disk_health(self) -> dict[tuple[str, str], str]:
        out = {}
        for key in self.informers[2].keys():
            if not key.startswith(POOL.status_prefix):
                continue
            name = key[len(POOL.status_prefix):]
            spec_kv, status_kv = self.informers[2].get(POOL.spec_key(name)), self.informers[2].get(key)
            if spec_kv is None or status_kv is None:
                continue
            try:
                pool = K.assemble(POOL, name, spec_kv, status_kv)
            except K.CorruptObject:
                continue
            for d in pool.status.disks:
                out[(pool.spec.node, d.name)] = d.health
        return out

    def _progress(self) -> dict[str, tuple[int, int]]:
        out = {}
        for key in self.informers[5].keys():
            kv = self.informers[5].get(key)
            try:
                for ext, (done, total) in (json.loads(kv.value) if kv else {}).items():
                    out[str(ext)] = (int(done), int(total))
            except (ValueError, TypeError, AttributeError):
                log.warning("ignoring malformed %s", key)
        return out

    def _repair(self, name: str, records, policy: int, live, guard) -> float | None:
        """Rebuild what lacks replicas, evacuate what is on lost nodes or bad
        disks (``braid.extents.repair``). Returns when to look again (a node
        inside its grace period), or None."""
        now = time.monotonic()
        for node in list(self._absent_since):
            if node in live:
                del self._absent_since[node]
        health = self._disk_health()
        wake = None

        def usable(rep: X.Replica) -> bool:
            nonlocal wake
            if health.get((rep.node, rep.disk), "Healthy") not in ("Healthy", ""):
                return False
            if rep.node in live:
                return True
            since = self._absent_since.setdefault(rep.node, now)
            left = self.rebuild_delay - (now - since)
            if left > 0:
                wake = left if wake is None else min(wake, left)
                return True
            return False

        disks = self._candidates(live)
        started = {node: _unix(st.started_at) for node, st in live.items()}
        for rec, kv in records.values():
            if kv is None:
                continue
            step = X.repair(rec, policy, usable, disks, now=time.time(), started=started)
            if step is None:
                continue
            if step[0] == "join":
                new = rec.join(step[1])
                what = f"rebuilding extent {rec.index} on {step[1].node}/{step[1].disk}"
            else:
                reasons = ["surplus replica" if usable(r) else
                           ("disk " + health.get((r.node, r.disk), "?")) if r.node in live
                           else "storage daemon gone" for r in step[1]]
                new = rec.without(step[1], "evacuated: " + ", ".join(
                    f"{r.node} ({why})" for r, why in zip(step[1], reasons)))
                what = f"extent {rec.index}: {', '.join(r.node for r in step[1])} left the set ({', '.join(reasons)})"
            try:
                self.store.update(rec.key, new.to_json(), kv.mod_revision, guards=[guard])
            except (Conflict, NotFound):
                return RACE   # the record moved meanwhile: look again
            log.info("volume %s: %s (generation %d)", name, what, new.generation)
        return wake

    def _usage(self) -> dict[str, dict[str, int]]:
        out = {}
        for key in self.informers[4].keys():
            kv = self.informers[4].get(key)
            try:
                data = json.loads(kv.value) if kv else {}
                out[key[len(keys.USAGE):]] = {str(k): int(v) for k, v in data.items()}
            except (ValueError, TypeError, AttributeError):
                log.warning("ignoring malformed %s", key)
        return out

    def _records(self, name: str) -> dict[int, tuple[X.ExtentRecord, KV]]:
        kvs, _ = self.store.list(X.volume_prefix(name))
        out = {}
        for kv in kvs:
            parsed = X.parse_key(kv.key)
            if parsed is None:
                continue
            try:
                out[parsed[1]] = (X.ExtentRecord.from_json(kv.value), kv)
            except X.BadRecord as exc:
                log.warning("extent record %s is malformed (%s); left alone", kv.key, exc)
        return out

    # -- reconcile -------------------------------------------------------------

    def _reconcile_snapshot(self, group: str, guard) -> Result | None:
        """A snapshot's extents: rebuilt like a volume's (its own reconciler
        takes it and removes them when it is deleted)."""
        snap_kind = K.KINDS["snapshot"]
        status_kv = self.store.get(snap_kind.status_key(group[len(X.SNAPSHOT_MARK):]))
        try:
            st = K.from_json(status_kv.value, snap_kind.status_message()) if status_kv else None
        except K.CorruptObject:
            st = None
        if st is None or st.phase != "Ready":
            return None
        wake = self._repair(group, self._records(group), st.replicas or 2, self._live_storaged(), guard)
        if wake == RACE:
            return Result(requeue_after=0.05)
        return Result(requeue_after=wake + 0.1) if wake is not None else None

    def _place_clone(self, vol, missing: list[int], guard) -> list[int]:
        """Extents of a clone that its snapshot has: records derived from the
        snapshot's (same replicas, new data that starts as the snapshot's).
        Returns the extents left to place normally (beyond the snapshot)."""
        source = self._records(X.snapshot_extents(vol.spec.source_snapshot))
        derived = {i: source[i][0].derive(vol.metadata.name, vol.metadata.uid, X.new_data_id())
                   for i in missing if i in source}
        items = list(derived.values())
        for i in range(0, len(items), 100):
            try:
                self.store.create_many({r.key: r.to_json() for r in items[i:i + 100]}, guards=[guard])
            except AlreadyExists:
                pass   # placed meanwhile (another pass): the next pass sees them
        if derived:
            log.info("volume %s: %d extents derived from snapshot %s", vol.metadata.name, len(derived),
                     vol.spec.source_snapshot)
        return [i for i in missing if i not in derived]

    def reconcile(self, name: str) -> Result | None:
        if not self.election.is_leader:
            return None
        guard = self.election.guard()
        if name.startswith(X.SNAPSHOT_MARK):
            return self._reconcile_snapshot(name, guard)
        spec_kv = self.store.get(KIND.spec_key(name))
        status_kv = self.store.get(KIND.status_key(name))
        records = self._records(name)
        if spec_kv is None:  # deleted: drop the extent map, the storage daemons reclaim space
            for _, kv in records.values():
                self.store.delete(kv.key, guards=[guard])
            if status_kv is not None:
                self.store.delete(KIND.status_key(name), guards=[guard])
            if records:
                log.info("volume %s deleted: removed %d extent records", name, len(records))
            return None
        try:
            vol = K.assemble(KIND, name, spec_kv, status_kv)
        except K.CorruptObject as exc:
            log.warning("volume %s: %s", name, exc)
            return None
        stale = [kv for rec, kv in records.values() if rec.uid != vol.metadata.uid]
        for kv in stale:  # records of an earlier volume of the same name
            self.store.delete(kv.key, guards=[guard])
            log.info("volume %s: removed %s of an earlier volume of this name", name, kv.key)
        records = {i: rk for i, rk in records.items() if rk[0].uid == vol.metadata.uid}
        extent_size = vol.spec.extent_size_bytes or X.DEFAULT_EXTENT_SIZE
        want = X.extent_count(vol.spec.size_bytes, extent_size)
        missing = [i for i in range(want) if i not in records]
        live = self._live_storaged()
        error = ""
        retry = None
        if missing and vol.spec.source_snapshot:
            left = self._place_clone(vol, missing, guard)
            if len(left) < len(missing):
                return Result(requeue_after=0.01)
            snap_count = len(self._records(X.snapshot_extents(vol.spec.source_snapshot)))
            if any(i < snap_count for i in left) or not snap_count:
                error = f"snapshot {vol.spec.source_snapshot} has no extent records (deleted?)"
                missing = []
        if missing:
            try:
                plan = X.place(missing, vol.spec.replicas or 2, extent_size, self._candidates(live),
                               seed=vol.metadata.uid)
            except X.PlacementError as exc:
                error = f"cannot place: {exc}"
                retry = Result(requeue_after=5.0)
            else:
                for idx, reps in plan.items():
                    rec = X.ExtentRecord(name, vol.metadata.uid, idx, extent_size, 1, reps)
                    try:
                        self.store.create(rec.key, rec.to_json(), guards=[guard])
                    except AlreadyExists:
                        return Result(requeue_after=0.05)
                    records[idx] = (rec, None)
                log.info("volume %s: placed %d extents (%d replicas each)", name, len(plan),
                         vol.spec.replicas)
        if not missing:
            wake = self._repair(name, records, vol.spec.replicas or 2, live, guard)
            if wake == RACE:
                return Result(requeue_after=0.05)
            if wake is not None:
                retry = Result(requeue_after=min(wake + 0.1, retry.requeue_after if retry else wake + 0.1))
        status = volume_status(vol, {i: r for i, (r, _) in records.items()}, self._usage(), error,
                               export_uris(name, live), self._progress())
        if status != vol.status or status_kv is None:
            self.store.put(KIND.status_key(name), K.to_json(status), guards=[guard])
        return retry


def _unix(iso: str) -> float:
    """A daemon's started_at (ISO 8601) as unix time; 0 when missing or malformed."""
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except (ValueError, TypeError):
        return 0.0
