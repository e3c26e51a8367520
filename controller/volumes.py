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

import json
import logging

from braid import extents as X
from braid import kinds as K
from braid.reconcile import Controller, Result
from braid.store import KV, AlreadyExists, Election, Informer, Store
from braid.v1 import node_pb2, storage_pb2

log = logging.getLogger("braid.controller.volumes")

KIND = K.KINDS["volume"]
POOL = K.KINDS["diskpool"]
USAGE_PREFIX = "storage/usage/"   # storage/usage/<node> -> {"<uid>/<index>": allocated bytes}


def volume_status(vol: storage_pb2.Volume, records: dict[int, X.ExtentRecord],
                  usage: dict[str, dict[str, int]], placement_error: str,
                  exports: list[storage_pb2.VolumeExport]) -> storage_pb2.VolumeStatus:
    """Pure: the status a volume should show, from its extent records."""
    want = X.extent_count(vol.spec.size_bytes, vol.spec.extent_size_bytes)
    st = storage_pb2.VolumeStatus(extents=want, observed_generation=vol.metadata.generation)
    have = [records[i] for i in range(want) if i in records]
    st.healthy_extents = sum(1 for r in have if len(r.replicas) >= vol.spec.replicas)
    allocated = 0
    for r in have:  # the largest replica of each extent (they converge to the same data)
        allocated += max((usage.get(rep.node, {}).get(f"{r.uid}/{r.index}", 0) for rep in r.replicas),
                         default=0)
    st.allocated_bytes = allocated
    st.exports.extend(exports)
    empty = [r.index for r in have if not r.replicas]
    short = [r for r in have if 0 < len(r.replicas) < vol.spec.replicas]
    if len(have) < want:
        st.phase = "Pending"
        st.message = placement_error or f"{want - len(have)} of {want} extents not placed yet"
    elif empty:
        st.phase = "Failed"
        st.message = f"extents without any replica: {_ranges(empty)}"
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


class VolumeReconciler:
    def __init__(self, store: Store, election: Election):
        self.store = store
        self.election = election
        self.controller = Controller("volumes", self.reconcile, workers=1, resync_period=30.0,
                                     list_keys=self._names)
        self.informers = [
            Informer(store, "volume/", self._on_volume, name="volumes"),
            Informer(store, X.PREFIX, self._on_extent, name="extents"),
            Informer(store, "diskpool/", self._on_other, name="volumes-pools"),
            Informer(store, "node/live/", self._on_other, name="volumes-live"),
            Informer(store, USAGE_PREFIX, self._on_other, name="volumes-usage"),
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
        if key.startswith("node/live/") and not key.endswith("/storaged"):
            return
        for name in self._names():
            self.controller.enqueue(name)

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
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "storaged":
                kv = self.informers[3].get(key)
                if kv is None:
                    continue
                try:
                    out[parts[2]] = K.from_json(kv.value, node_pb2.DaemonStatus, key)
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

    def _usage(self) -> dict[str, dict[str, int]]:
        out = {}
        for key in self.informers[4].keys():
            kv = self.informers[4].get(key)
            try:
                data = json.loads(kv.value) if kv else {}
                out[key[len(USAGE_PREFIX):]] = {str(k): int(v) for k, v in data.items()}
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

    def reconcile(self, name: str) -> Result | None:
        if not self.election.is_leader:
            return None
        guard = self.election.guard()
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
        status = volume_status(vol, {i: r for i, (r, _) in records.items()}, self._usage(), error,
                               export_uris(name, live))
        status.rebuild_progress = vol.status.rebuild_progress
        if status != vol.status or status_kv is None:
            self.store.put(KIND.status_key(name), K.to_json(status), guards=[guard])
        return retry
