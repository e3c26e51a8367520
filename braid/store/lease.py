"""A lease kept alive by a background thread.

``Lease.start()`` grants the lease and refreshes it every ``ttl / 3``
seconds. When the lease cannot be refreshed for ``ttl`` seconds (etcd
unreachable), or etcd says it has expired, ``on_lost`` is called once and
the lease is dead: its keys are gone (or about to be). Owners then either
stop (self-fencing) or start over with a new lease.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from braid.store.etcd import Store, StoreError

log = logging.getLogger("braid.store.lease")


class Lease:
    def __init__(self, store: Store, ttl: int, on_lost: Callable[[], None] | None = None,
                 name: str = "lease"):
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 seconds")
        self.store = store
        self.ttl = ttl
        self.name = name
        self.on_lost = on_lost
        self.id = 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_refresh = 0.0  # time.monotonic() of the last successful refresh

    def start(self) -> "Lease":
        self.id = self.store.grant_lease(self.ttl)
        self.last_refresh = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-keepalive", daemon=True)
        self._thread.start()
        log.debug("lease %x granted (ttl %ds)", self.id, self.ttl)
        return self

    @property
    def alive(self) -> bool:
        return self.id != 0 and not self.lost.is_set()

    def _run(self) -> None:
        interval = self.ttl / 3.0
        while True:
            # wake for the next refresh, or at the deadline of this lease
            deadline = self.last_refresh + self.ttl
            if self._stop.wait(max(0.0, min(interval, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                self._lose(f"not refreshed for {self.ttl}s")
                return
            sent = time.monotonic()  # etcd's clock starts no earlier than this
            try:
                remaining = self.store.keepalive_once(self.id, budget=deadline - sent)
            except StoreError as exc:
                log.warning("lease %x refresh failed: %s", self.id, exc)
                continue
            if remaining <= 0:
                self._lose("expired in etcd")
                return
            self.last_refresh = sent

    def _lose(self, why: str) -> None:
        log.warning("lease %x (%s) lost: %s", self.id, self.name, why)
        self.lost.set()
        if self.on_lost:
            try:
                self.on_lost()
            except Exception:  # an owner's callback must not kill the thread silently
                log.exception("on_lost callback of lease %x failed", self.id)

    def stop(self, revoke: bool = True) -> None:
        """Stop refreshing; with ``revoke`` delete the lease (and its keys) now."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if revoke and self.id and not self.lost.is_set():
            try:
                self.store.revoke_lease(self.id)
            except StoreError as exc:
                log.warning("revoking lease %x failed: %s", self.id, exc)
