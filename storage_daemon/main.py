"""braid-storaged: owns the node's disks, stores extent replicas, serves
volumes over NBD and replicates writes to the peer storage daemons.

Threads: the daemon frame (gRPC health/metrics, presence), etcd informers
(extent map, volumes, live peers), a reporter (DiskPool status, per-replica
allocation in ``storage/usage/<node>``; it waits on no disk's data I/O and at
most a moment for the loop, so a hung disk is reported), a garbage collector (replicas no
extent record names), and one asyncio loop (uvloop) for the data path: the
replication server, the NBD TCP server and one NBD unix socket per volume
(``<nbd_socket_dir>/<volume>.sock``, what QEMU on this node opens).
"""

from __future__ import annotations

import asyncio
import datetime
import grp
import json
import logging
import os
import threading
import uuid
from pathlib import Path

from braid import extents as X
from braid import keys
from braid import kinds as K
from braid.nodedaemon import NODE_OPTIONS, node_daemon_body, node_name
from braid.service import ConfigError, Option, run_main
from braid.store import AlreadyExists, Conflict, Informer, NotFound, StoreError
from braid.v1 import node_pb2, storage_pb2
from storage_daemon.datapath import ExtentView, StorageNode, VolumeEngine, VolumeInfo
from storage_daemon.extent_store import DiskStore
from storage_daemon.health import DiskHealth, probe_file
from storage_daemon.nbd import NbdServer
from storage_daemon.rebuild import Rebuilder
from storage_daemon.scrub import Scrubber

log = logging.getLogger("braid.storaged")

POOL = K.KINDS["diskpool"]
VOLUME = K.KINDS["volume"]

NBD_TCP_DEFAULT = "127.0.0.1:10809"

OPTIONS = NODE_OPTIONS + [
    Option("disks", "", "local disks: name=/dir[:capacity] comma-separated, e.g. "
                        "'d1=/var/lib/braid/disks/d1:20G' (capacity: 0/empty = the filesystem's size)"),
    Option("nbd_socket_dir", "", "directory of the volumes' NBD unix sockets "
                                 "(default /run/braid/<node>/nbd)"),
    Option("nbd_socket_group", "kvm", "group that may open the NBD sockets (QEMU runs in it)"),
    Option("nbd_listen", NBD_TCP_DEFAULT, "NBD TCP address host:port (loopback or the storage "
                                            "network; '' disables)"),
    Option("peer_listen", "127.0.0.1:7410", "replication server address host:port"),
    Option("peer_timeout", 2.0, "seconds a replica may take to answer before it is dropped", float),
    Option("report_interval", 5.0, "seconds between disk usage reports", float),
    Option("rebuild_rate", 64.0, "MiB/s this node copies for rebuilds (client I/O keeps the rest)", float),
    Option("scrub_interval", 86400.0, "seconds between scrub passes over this node's replicas (0: never)",
           float),
    Option("scrub_rate", 16.0, "MiB/s a scrub pass reads", float),
    Option("resync_margin", 60.0, "seconds this daemon must have run before a replica's drop to tell "
           "what changed since (a returning copy then resyncs only that)", float),
]
# snapshots: the controller asks every storage daemon to hold the writes of a volume
# (storage/quiesce/<volume> -> {"op", "timeout"}); each answers once nothing is in flight
# (storage/quiesced/<volume>/<node> -> op) and goes on when the key is deleted

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = int(t[:-1] if unit else t)
    except ValueError:
        raise ConfigError(f"bad size {text!r} (e.g. 512M, 20G)") from None
    if value < 0:
        raise ConfigError(f"bad size {text!r}")
    return value * _UNITS[unit]


def parse_disks(text: str) -> list[storage_pb2.PoolDisk]:
    """``d1=/path[:20G],d2=/other`` -> PoolDisk list (config errors are clear)."""
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, sep, rest = item.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"disk {item!r}: expected name=/dir[:capacity]")
        path, _, cap = rest.partition(":")
        if not path.startswith("/"):
            raise ConfigError(f"disk {name}: {path!r} is not an absolute path")
        if any(d.name == name for d in out):
            raise ConfigError(f"disk {name} given twice")
        out.append(storage_pb2.PoolDisk(name=name, path=path, capacity_bytes=parse_size(cap) if cap else 0))
    return out


def _hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what} {text!r}: expected host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class StorageDaemon:
    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sn: StorageNode | None = None
        self.nbd: NbdServer | None = None
        self.sockets: dict[str, tuple[str, asyncio.AbstractServer]] = {}  # volume -> (uid, server)
        self.live: dict[str, node_pb2.DaemonStatus] = {}
        self._stop = threading.Event()
        self._last_scrub = storage_pb2.ScrubStatus()
        self.held: dict[str, str] = {}   # volume -> op of the hold in force (on the loop)

    # -- set-up (before presence: the bound addresses go into it) --------------------

    def presence_info(self, d, store) -> dict:
        cfg = d.cfg
        self.node = node_name(cfg)
        self.store = store
        self.pool_disks = parse_disks(cfg["disks"])
        self.disks = {}
        for pd in self.pool_disks:
            try:
                self.disks[pd.name] = DiskStore(Path(pd.path), pd.name, pd.capacity_bytes)
            except OSError as exc:
                raise ConfigError(f"disk {pd.name} at {pd.path}: {exc}") from None
        self.socket_dir = cfg["nbd_socket_dir"] or f"/run/braid/{self.node}/nbd"
        os.makedirs(self.socket_dir, exist_ok=True)
        os.chmod(self.socket_dir, 0o755)
        try:
            self.gid = grp.getgrnam(cfg["nbd_socket_group"]).gr_gid if cfg["nbd_socket_group"] else -1
        except KeyError:
            log.warning("group %s does not exist; NBD sockets stay root-only", cfg["nbd_socket_group"])
            self.gid = -1
        self.view = ExtentView()
        self.sn = StorageNode(self.node, self.disks, self.view, self._peer_address, self._etcd_get,
                              self._etcd_cas, peer_timeout=cfg["peer_timeout"], tls=d.tls)
        if cfg["rebuild_rate"] <= 0:
            raise ConfigError(f"rebuild_rate: {cfg['rebuild_rate']} must be > 0 (MiB/s)")
        self.rebuilder = Rebuilder(self.sn, rate=cfg["rebuild_rate"] * (1 << 20))
        if cfg["resync_margin"] < 0:
            raise ConfigError(f"resync_margin: {cfg['resync_margin']} must be >= 0 (seconds)")
        self.sn.changes.margin = cfg["resync_margin"]
        if cfg["scrub_interval"] < 0 or cfg["scrub_rate"] <= 0:
            raise ConfigError("scrub_interval must be >= 0 (0: off) and scrub_rate > 0")
        self.scrubber = Scrubber(self.sn, rate=cfg["scrub_rate"] * (1 << 20),
                                 interval=cfg["scrub_interval"] or 86400.0)
        self.scrub_on = cfg["scrub_interval"] > 0
        self.nbd = NbdServer(self._lookup, self._names, log=logging.getLogger("braid.storaged.nbd"))
        ready = threading.Event()
        self._loop_thread = threading.Thread(target=self._run_loop, args=(ready,), name="datapath",
                                             daemon=True)
        self._loop_thread.start()
        ready.wait()
        info = {}
        host, port = _hostport(cfg["peer_listen"], "peer_listen")
        srv = self._call(self.sn.serve_peers(host, port))
        info["peer_address"] = f"{host}:{srv.sockets[0].getsockname()[1]}"
        nbd_listen = cfg["nbd_listen"]
        if nbd_listen and d.tls is not None and nbd_listen == NBD_TCP_DEFAULT:
            # QEMU on this node uses the unix sockets; TCP only when asked for (and then TLS only)
            log.info("TLS on: NBD over TCP stays off unless --nbd-listen is given (volumes are served "
                     "on %s/<volume>.sock)", self.socket_dir)
            nbd_listen = ""
        if nbd_listen:
            host, port = _hostport(nbd_listen, "nbd_listen")
            if d.tls is not None:   # NBD_OPT_STARTTLS required, with a client certificate of the cluster
                from braid.auth.pki import ReloadingSSLContext
                self.nbd.tls = ReloadingSSLContext(d.tls, server=True).server_context()
                self.nbd.tls_admit = _cluster_peer
            srv = self._call(self.nbd.serve_tcp(host, port))
            info["nbd_address"] = f"{host}:{srv.sockets[0].getsockname()[1]}"
        info["nbd_socket_dir"] = self.socket_dir
        log.info("data path up: peers on %s, NBD on %s and %s/<volume>.sock", info["peer_address"],
                 info.get("nbd_address", "-"), self.socket_dir)
        return info

    def _run_loop(self, ready: threading.Event) -> None:
        try:
            import uvloop
            loop = uvloop.new_event_loop()
        except ImportError:  # uvloop is a dependency; this only guards odd platforms
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        loop.call_soon(ready.set)
        loop.run_forever()

    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- etcd access for the data path (worker threads) ---------------------------

    def _etcd_get(self, volume: str, index: int):
        kv = self.store.get(keys.extent(volume, index))
        if kv is None:
            return None, 0
        try:
            return X.ExtentRecord.from_json(kv.value), kv.mod_revision
        except X.BadRecord as exc:
            log.error("extent record %s is malformed: %s", kv.key, exc)
            return None, 0

    def _etcd_cas(self, old: X.ExtentRecord, new: X.ExtentRecord) -> bool:
        kv = self.store.get(old.key)
        if kv is None:
            return False
        try:
            if X.ExtentRecord.from_json(kv.value) != old:
                return False
            self.store.update(old.key, new.to_json(), mod_revision=kv.mod_revision)
            return True
        except (X.BadRecord, Conflict, NotFound):
            return False

    def _peer_address(self, node: str) -> str | None:
        info = self.live.get(node)
        return info.peer_address if info else None

    # -- NBD exports -------------------------------------------------------------

    def _lookup(self, name: str):
        return self.sn.engines.get(name) if self.sn else None

    def _names(self) -> list[str]:
        return sorted(self.sn.engines) if self.sn else []

    async def _open_socket(self, name: str, uid: str) -> None:
        cur = self.sockets.get(name)
        if cur and cur[0] == uid:
            return
        if cur:
            await self._close_socket(name)
        path = os.path.join(self.socket_dir, f"{name}.sock")
        server = NbdServer(lambda n, v=name: self.sn.engines.get(v) if n in ("", v) else None,
                           lambda v=name: [v] if v in self.sn.engines else [],
                           default_export=name, log=logging.getLogger("braid.storaged.nbd"))
        srv = await server.serve_unix(path, mode=0o660,
                                      group=self.cfg_group if self.gid >= 0 else None)
        self.sockets[name] = (uid, srv)

    async def _close_socket(self, name: str) -> None:
        cur = self.sockets.pop(name, None)
        if cur:
            cur[1].close()
            try:
                os.unlink(os.path.join(self.socket_dir, f"{name}.sock"))
            except FileNotFoundError:
                pass

    # -- informers (threads) -> loop ------------------------------------------------

    def _on_extent(self, key: str, kv) -> None:
        parsed = keys.parse_extent(key)
        if parsed is None:
            return
        if kv is None:
            self.loop.call_soon_threadsafe(self.view.delete, *parsed)
            return
        try:
            rec = X.ExtentRecord.from_json(kv.value)
        except X.BadRecord as exc:
            log.error("ignoring malformed extent record %s: %s", key, exc)
            return
        self.loop.call_soon_threadsafe(self._extent_seen, rec, kv.mod_revision)

    def _extent_seen(self, rec: X.ExtentRecord, mod_revision: int) -> None:
        rec = self.sn.track_joins(self.view.put(rec, mod_revision))
        if rec.joining:
            self.rebuilder.poke()

    def _on_volume(self, key: str, kv) -> None:
        if not key.startswith(VOLUME.spec_prefix):
            return
        name = key[len(VOLUME.spec_prefix):]
        if kv is None:
            self.loop.call_soon_threadsafe(self._volume_gone, name)
            return
        try:
            vol = K.assemble(VOLUME, name, kv, None)
        except K.CorruptObject as exc:
            log.error("ignoring volume %s: %s", name, exc)
            return
        info = VolumeInfo(name, vol.metadata.uid, vol.spec.size_bytes,
                          vol.spec.extent_size_bytes or X.DEFAULT_EXTENT_SIZE, vol.spec.replicas or 2,
                          vol.spec.qos.iops, vol.spec.qos.bytes_per_second,
                          full_clone=bool(vol.spec.source_snapshot and vol.spec.full_clone))
        asyncio.run_coroutine_threadsafe(self._volume_seen(info), self.loop)

    async def _volume_seen(self, info: VolumeInfo) -> None:
        eng = self.sn.engines.get(info.name)
        if eng is not None and eng.info.uid == info.uid:
            eng.update(info)  # resize, QoS: visible to the next request
        else:
            eng = self.sn.engines[info.name] = VolumeEngine(self.sn, info)
            if info.name in self.held:   # made while a snapshot of it is being taken
                eng.gate.clear()
        try:
            await self._open_socket(info.name, info.uid)
        except OSError as exc:
            log.error("cannot open the NBD socket of volume %s: %s", info.name, exc)

    def _volume_gone(self, name: str) -> None:
        self.sn.engines.pop(name, None)
        asyncio.ensure_future(self._close_socket(name))

    # -- holding writes for snapshots -------------------------------------------------

    def _on_quiesce(self, key: str, kv) -> None:
        volume = key[len(keys.QUIESCE):]
        if not volume or "/" in volume:
            return
        if kv is None:
            asyncio.run_coroutine_threadsafe(self._release(volume), self.loop)
            return
        try:
            d = json.loads(kv.value)
            op, timeout = str(d["op"]), float(d.get("timeout", 30.0))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring malformed %s: %s", key, exc)
            return
        asyncio.run_coroutine_threadsafe(self._hold(volume, op, max(1.0, min(timeout, 300.0))), self.loop)

    async def _hold(self, volume: str, op: str, timeout: float) -> None:
        if self.held.get(volume) == op:
            return
        self.held[volume] = op
        eng = self.sn.engines.get(volume)
        try:
            if eng is not None:
                await eng.hold(timeout=min(10.0, timeout))
            await asyncio.to_thread(self.store.put, keys.quiesced(volume, self.node), op.encode())
        except Exception as exc:  # noqa: BLE001 - no answer: the snapshot fails, writes go on
            log.error("volume %s: cannot hold writes for %s: %s", volume, op, exc)
            await self._release(volume)
            return
        log.info("volume %s: writes held (%s)", volume, op)
        self.loop.call_later(timeout, lambda: self._expire(volume, op, timeout))

    def _expire(self, volume: str, op: str, timeout: float) -> None:
        if self.held.get(volume) == op:
            log.error("volume %s: writes held for %.0fs without a release (controller gone?); "
                      "going on", volume, timeout)
            asyncio.ensure_future(self._release(volume))

    async def _release(self, volume: str) -> None:
        if self.held.pop(volume, None) is None:
            return
        try:   # the new extent map was written before the release: have it before any write goes out
            kvs, _ = await asyncio.to_thread(self.store.list, X.volume_prefix(volume))
            for kv in kvs:
                try:
                    self._extent_seen(X.ExtentRecord.from_json(kv.value), kv.mod_revision)
                except X.BadRecord:
                    pass
        except StoreError as exc:   # stale records get refused (ESTALE) and re-read
            log.warning("volume %s: re-reading its extents after a hold: %s", volume, exc)
        eng = self.sn.engines.get(volume)
        if eng is not None:
            eng.release()
        log.info("volume %s: writes go on", volume)

    async def _materialize_forever(self) -> None:
        """Full clones: copy every extent still shared with the snapshot into
        the clone's own files (on the extents whose first member is this node)."""
        while True:
            await asyncio.sleep(1.0)
            for eng in list(self.sn.engines.values()):
                if not eng.info.full_clone:
                    continue
                for rec in [r for r in list(self.view.records.values())
                            if r.volume == eng.info.name and r.base and r.replicas
                            and r.replicas[0].node == self.node]:
                    try:
                        await eng.materialize(rec.index)
                    except Exception as exc:  # noqa: BLE001 - tried again in a moment
                        log.warning("full clone %s extent %d: %s", eng.info.name, rec.index, exc)

    def _on_live(self, key: str, kv) -> None:
        parsed = keys.parse_live(key)
        if not parsed or parsed[1] != "storaged":
            return
        if kv is None:
            self.live.pop(parsed[0], None)
            return
        try:
            self.live[parsed[0]] = K.from_json(kv.value, node_pb2.DaemonStatus, key)
        except K.CorruptObject as exc:
            log.warning("ignoring %s", exc)

    # -- hook: once registered --------------------------------------------------------

    def hook(self, d, store, presence):
        self.cfg_group = d.cfg["nbd_socket_group"]
        self.interval = d.cfg["report_interval"]
        self._ensure_pool()
        self.informers = [Informer(store, keys.LIVE, self._on_live, name="storaged-live").start(),
                          Informer(store, keys.EXTENT, self._on_extent, name="storaged-extents").start()]
        for inf in self.informers:
            inf.synced.wait(30)
        self.informers.append(Informer(store, keys.spec_prefix("volume"), self._on_volume,
                                       name="storaged-volumes").start())
        self.informers.append(Informer(store, keys.QUIESCE, self._on_quiesce,
                                       name="storaged-quiesce").start())
        self._materializer = asyncio.run_coroutine_threadsafe(self._materialize_forever(), self.loop)
        if self.scrub_on:
            self._scrub_task = asyncio.run_coroutine_threadsafe(self.scrubber.run_forever(), self.loop)
        self._reporter = threading.Thread(target=self._report_loop, name="storaged-report", daemon=True)
        self._reporter.start()
        self._kept: set[tuple[str, str, int]] = set()   # (disk, uid, index) kept for a resync
        self._collector = threading.Thread(target=self._gc_loop, name="storaged-gc", daemon=True)
        self._collector.start()
        return self.stop

    def _ensure_pool(self) -> None:
        """The DiskPool named after this node: its spec is this daemon's
        configuration (created or corrected at start-up)."""
        spec = storage_pb2.DiskPoolSpec(node=self.node, disks=self.pool_disks)
        for _ in range(5):
            kv = self.store.get(POOL.spec_key(self.node))
            if kv is None:
                if not self.pool_disks:
                    return
                obj = storage_pb2.DiskPool(spec=spec)
                obj.metadata.name = self.node
                obj.metadata.generation = 1
                obj.metadata.uid = str(uuid.uuid4())
                obj.metadata.created_at = datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")
                try:
                    self.store.create(POOL.spec_key(self.node), K.encode_spec(POOL, obj))
                    return
                except AlreadyExists:
                    continue
            try:
                cur = K.assemble(POOL, self.node, kv, None)
            except K.CorruptObject as exc:
                log.error("disk pool %s: %s; not touching it", self.node, exc)
                return
            if cur.spec == spec:
                return
            cur.spec.CopyFrom(spec)
            cur.metadata.generation += 1
            try:
                self.store.update(POOL.spec_key(self.node), K.encode_spec(POOL, cur), kv.mod_revision)
                log.info("disk pool %s updated from this daemon's configuration", self.node)
                return
            except Conflict:
                continue

    async def _scrub_status(self) -> storage_pb2.ScrubStatus:
        return storage_pb2.ScrubStatus(**{f.name: getattr(self.scrubber.status, f.name)
                                          for f in storage_pb2.ScrubStatus.DESCRIPTOR.fields})

    def _scrub_snapshot(self) -> storage_pb2.ScrubStatus:
        """The scrubber's status, read on the data-path loop. A loop that does not answer
        at once (e.g. stuck in I/O of a hung disk) must not hold up the health report:
        then the last status read."""
        fut = asyncio.run_coroutine_threadsafe(self._scrub_status(), self.loop)
        try:
            self._last_scrub = fut.result(timeout=0.5)
        except TimeoutError:
            fut.cancel()
        return self._last_scrub

    def _report_rebuilds(self, last: dict | None) -> dict:
        progress = {f"{v}/{i}": list(p) for (v, i), p in list(self.rebuilder.progress.items())}
        if progress != last:
            if progress:
                self.store.put(keys.rebuild(self.node), json.dumps(progress, sort_keys=True).encode())
            elif last:
                self.store.delete(keys.rebuild(self.node))
        return progress

    def _report_loop(self) -> None:
        last_status = last_usage = None
        last_rebuild: dict | None = None
        health = {name: DiskHealth(probe_file(disk.root)) for name, disk in self.disks.items()}
        while not self._stop.wait(0 if last_status is None else self.interval):
            try:
                status = storage_pb2.DiskPoolStatus(phase="Ready")
                usage = {}
                for name, disk in self.disks.items():
                    h = health[name]
                    h.tick()
                    verdict, why = h.verdict()
                    if verdict != "Healthy":
                        log.warning("disk %s: %s (%s)", name, verdict, why)
                    u = disk.usage()
                    # latency in 10 ms steps: a status write per change, not per probe
                    status.disks.add(name=name, capacity_bytes=u["capacity_bytes"], used_bytes=u["used_bytes"],
                                     health=verdict, avg_latency_ms=round(h.avg_latency_ms, -1))
                    for (uid, index), allocated in disk.replica_allocations().items():
                        usage[f"{uid}/{index}"] = allocated
                status.scrub.CopyFrom(self._scrub_snapshot())
                if self.disks and status != last_status:
                    self.store.put(POOL.status_key(self.node), K.to_json(status))
                    last_status = status
                if usage != last_usage:
                    self.store.put(keys.usage(self.node), json.dumps(usage, sort_keys=True).encode())
                    last_usage = usage
                last_rebuild = self._report_rebuilds(last_rebuild)
            except StoreError as exc:
                log.warning("report: %s", exc)
            except Exception:
                log.exception("report failed")

    def _gc_loop(self) -> None:
        """Garbage collection in a thread of its own: it reads the record of every replica
        on every disk (and waits for the loop), which blocks while a disk hangs; the
        health reports that say so must go on meanwhile."""
        while not self._stop.wait(self.interval):
            try:
                self._collect_garbage()
            except StoreError as exc:
                log.warning("garbage collection: %s", exc)
            except Exception:
                log.exception("garbage collection failed")

    def _collect_garbage(self) -> None:
        """Delete replicas that no extent record names any more on this node:
        of volumes that were deleted, and abandoned ones (dropped from their
        set: e.g. this node was away; a rebuild makes a fresh copy if one is
        needed). Re-checked against a fresh etcd listing, deleted on the loop
        (never one a rebuild is filling)."""
        recs = list(self.view.records.values())
        mine = {(r.data_id, r.index) for r in recs if r.writable(self.node)}
        mine |= {(b, r.index) for r in recs for b in r.base}   # bases of snapshots' derivatives
        suspects = [(disk, m) for disk in self.disks.values() for m in disk.replicas()
                    if (m.volume, m.index) not in mine]
        if not suspects:
            return
        kvs, _ = self.store.list(keys.EXTENT)
        records, bases = {}, set()
        for kv in kvs:
            try:
                rec = X.ExtentRecord.from_json(kv.value)
            except X.BadRecord:
                return  # cannot be sure what is referenced: keep everything
            records[(rec.data_id, rec.index)] = rec
            bases |= {(b, rec.index) for b in rec.base}
        for disk, m in suspects:
            rec = records.get((m.volume, m.index))
            if (rec is not None and rec.writable(self.node)) or (m.volume, m.index) in bases:
                continue
            if self._kept_for_resync(rec, disk, m):
                if (disk.name, m.volume, m.index) not in self._kept:
                    self._kept.add((disk.name, m.volume, m.index))
                    disk.drop_cache(m.volume, m.index)
                    log.info("keeping replica %s/%d on disk %s for a resync (dropped from %s)",
                             m.volume, m.index, disk.name, rec.key)
                continue
            self._kept.discard((disk.name, m.volume, m.index))
            why = "its volume is gone" if rec is None else f"dropped from {rec.key}"
            if self._call(self._reclaim(disk, m.volume, m.index)):
                log.info("reclaimed replica %s/%d on disk %s (%s)", m.volume, m.index, disk.name, why)

    def _kept_for_resync(self, rec: X.ExtentRecord | None, disk: DiskStore, meta) -> bool:
        """A complete copy this node held when it was dropped is kept while its extent
        is short of members: when this node rebuilds it, only what changed since is
        copied (``storage_daemon.changes``). Once the set is whole again, it goes."""
        if rec is None or not meta.complete or rec.volume.startswith(X.SNAPSHOT_MARK):   # (a snapshot's: no)
            return False
        drops = [d for d in rec.dropped if d.node == self.node and d.disk == disk.name]
        if not drops or meta.generation > max(d.generation for d in drops):
            return False
        eng = self.sn.engines.get(rec.volume)
        if eng is None or eng.info.uid != rec.uid:   # its volume not learnt yet (just started)
            return True
        return len(rec.replicas) < eng.info.replicas

    async def _reclaim(self, disk: DiskStore, uid: str, index: int) -> bool:
        recs = list(self.view.records.values())
        rec = next((r for r in recs if r.data_id == uid and r.index == index), None)
        if (uid, index) in self.sn.joins or (rec is not None and rec.writable(self.node)) \
                or any(r.index == index and uid in r.base for r in recs) or (uid, index) in self.sn._cloning:
            return False
        rf = disk.get(uid, index)
        if rf is not None and self._kept_for_resync(rec, disk, rf.meta):
            return False
        self.sn.forget(uid, index)
        disk.delete_replica(uid, index)
        return True

    def stop(self) -> None:
        self._stop.set()
        for inf in getattr(self, "informers", []):
            inf.request_stop()
        for inf in getattr(self, "informers", []):
            inf.stop()
        if self.loop is not None:
            async def shutdown():
                for name in list(self.sockets):
                    await self._close_socket(name)
                # make every replica on this node durable (what this node coordinated and what
                # peers wrote here). No engine flush: that would drop peers that are stopping
                # with us (a cluster shutdown) from the replica sets; they sync their own disks.
                for disk in self.disks.values():
                    try:
                        await asyncio.to_thread(disk.sync_all)
                    except OSError as exc:
                        log.error("disk %s: final sync failed: %s", disk.name, exc)
                for client in self.sn.peers.values():
                    await client.close()
            try:
                self._call(shutdown(), timeout=10)
            except Exception:
                log.exception("data path shutdown")
            for disk in self.disks.values():
                disk.close()
            self.loop.call_soon_threadsafe(self.loop.stop)


def _cluster_peer(transport) -> str:
    """NBD over TCP takes any certificate of the cluster's CA (TLS verified
    it; here: that it is a Braid identity)."""
    from braid.auth.pki import identity_from_ssl
    return "" if identity_from_ssl(transport) is not None else "no Braid certificate"


def main(argv=None) -> int:
    sd = StorageDaemon()
    return run_main("storaged", OPTIONS, node_daemon_body(
        "storaged", sd.hook, presence_info=sd.presence_info), argv)


if __name__ == "__main__":
    raise SystemExit(main())
