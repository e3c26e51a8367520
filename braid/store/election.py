"""Leader election on etcd: a lease plus create-if-absent of one key.

The candidate that creates ``election/<name>`` (bound to its lease) leads.
Its fencing token is that key's ``create_revision``: every action a leader
takes in etcd carries ``Guard(key, token)``, so once another candidate has
taken over (a new key, a new create_revision), writes of a deposed leader
fail instead of racing the new one. A leader that cannot refresh its lease
for a full TTL steps down before etcd could have handed leadership on.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from braid import keys
from braid.store.etcd import AlreadyExists, Guard, Store, StoreError
from braid.store.lease import Lease

log = logging.getLogger("braid.store.election")


class Election:
    def __init__(
        self,
        store: Store,
        name: str,
        candidate: str,
        ttl: int = 5,
        on_elected: Callable[["Election"], None] | None = None,
        on_deposed: Callable[["Election"], None] | None = None,
        poll_interval: float | None = None,
    ):
        self.store = store
        self.key = keys.election(name)
        self.name = name
        self.candidate = candidate
        self.ttl = ttl
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.poll_interval = poll_interval or min(0.25, ttl / 8)
        self.token = 0  # create_revision of our election key while we lead
        self._leading = threading.Event()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set() and self._lease is not None and self._lease.alive

    def guard(self) -> Guard:
        """The fence to attach to every write made as leader."""
        if not self.token:
            raise StoreError(f"not the leader of {self.name}")
        return Guard(self.key, self.token)

    def leader(self) -> str | None:
        """Who leads now, as recorded in etcd."""
        kv = self.store.get(self.key)
        return kv.value.decode() if kv else None

    def wait_leading(self, timeout: float) -> bool:
        return self._leading.wait(timeout)

    def start(self) -> "Election":
        self._thread = threading.Thread(target=self._run, name=f"election-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._campaign()
            except StoreError as exc:
                log.warning("election %s: %s", self.name, exc)
                self._stop.wait(self.poll_interval * 4)

    def _campaign(self) -> None:
        lease = Lease(self.store, self.ttl, name=f"election-{self.name}").start()
        self._lease = lease
        try:
            while not self._stop.is_set() and lease.alive:
                try:
                    rev = self.store.create(self.key, self.candidate.encode(), lease=lease.id)
                except AlreadyExists:
                    self._stop.wait(self.poll_interval)
                    continue
                self.token = rev
                self._leading.set()
                log.info("election %s: %s leads (token %d)", self.name, self.candidate, rev)
                if self.on_elected:
                    self.on_elected(self)
                self._hold(lease)
                return
        finally:
            lost = self._leading.is_set()
            self._leading.clear()
            self.token = 0
            revoke = not lease.lost.is_set()
            lease.stop(revoke=revoke)
            if lost:
                log.warning("election %s: %s no longer leads", self.name, self.candidate)
                if self.on_deposed:
                    self.on_deposed(self)

    def _hold(self, lease: Lease) -> None:
        """Stay leader while the lease lives and the key is still ours."""
        while not self._stop.wait(self.poll_interval):
            if not lease.alive:
                return
            try:
                kv = self.store.get(self.key)
            except StoreError:
                continue  # the lease decides; a failed read alone is no reason
            if kv is None or kv.create_revision != self.token:
                return

    def stop(self) -> None:
        """Resign (deletes the key by revoking the lease) and stop campaigning."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
