"""A daemon's presence in the cluster: ``node/live/<node>/<daemon>``, bound
to the daemon's lease.

The key exists exactly while the lease lives, so "is this daemon alive?" is
answered by etcd, not by timestamps. When the lease is lost (etcd
unreachable for a TTL) the daemon is told (``on_lost``: node agents fence
themselves there) and presence is re-established with a new lease as soon
as etcd answers again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Callable

from braid import __version__, keys
from braid.kinds import to_json
from braid.store import Lease, Store, StoreError
from braid.v1 import node_pb2

log = logging.getLogger("braid.presence")


class Presence:
    def __init__(self, store: Store, node: str, daemon: str, ttl: int,
                 grpc_address: str = "", metrics_address: str = "",
                 on_lost: Callable[[], None] | None = None,
                 on_registered: Callable[[Lease], None] | None = None,
                 **extra: str):
        """``extra``: more DaemonStatus fields (e.g. migration_uri)."""
        self.store = store
        self.node = node
        self.daemon = daemon
        self.ttl = ttl
        self.on_lost = on_lost
        self.on_registered = on_registered
        self.key = keys.live(node, daemon)
        self.info = node_pb2.DaemonStatus(
            name=daemon, version=__version__, grpc_address=grpc_address,
            metrics_address=metrics_address, pid=os.getpid(),
            started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        )
        self.lease: Lease | None = None
        self.registered = threading.Event()
        self.losses = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Presence":
        self._register()  # the first registration fails loudly (bad etcd address...)
        self._thread = threading.Thread(target=self._run, name=f"presence-{self.daemon}", daemon=True)
        self._thread.start()
        return self

    def update(self, **fields) -> None:
        """Change fields of the published DaemonStatus (e.g. a net daemon's
        applied revision); written at once under the current lease."""
        with self._lock:
            for k, v in fields.items():
                setattr(self.info, k, v)
            lease = self.lease
            if lease is not None and not lease.lost.is_set():
                self.store.put(self.key, to_json(self.info), lease=lease.id)

    def _register(self) -> None:
        lease = Lease(self.store, self.ttl, name=f"{self.daemon}@{self.node}").start()
        with self._lock:
            self.info.lease_id = lease.id
            self.store.put(self.key, to_json(self.info), lease=lease.id)
            self.lease = lease
        self.registered.set()
        log.info("registered %s on node %s (lease %x, ttl %ds)", self.daemon, self.node,
                 lease.id, self.ttl)
        if self.on_registered:
            self.on_registered(lease)

    def _run(self) -> None:
        while not self._stop.is_set():
            lease = self.lease
            if lease is not None and not lease.lost.is_set():
                self._stop.wait(0.2)
                continue
            if lease is not None:  # just lost
                self.losses += 1
                self.registered.clear()
                self.lease = None
                if self.on_lost:
                    try:
                        self.on_lost()
                    except Exception:
                        log.exception("on_lost handler of %s failed", self.daemon)
            try:
                self._register()
            except StoreError as exc:
                log.warning("re-registering %s failed: %s", self.daemon, exc)
                self._stop.wait(1.0)

    def stop(self) -> None:
        """Deregister now (revoke the lease) so the node shows it at once."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.lease:
            self.lease.stop(revoke=True)
