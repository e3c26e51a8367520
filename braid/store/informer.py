"""List-then-watch with a local cache (the informer pattern).

An ``Informer`` lists everything under a prefix at one revision, hands each
key to ``on_change``, then watches from the next revision. A dropped
connection resumes from the last revision seen (inside ``Store.watch``);
a compaction that lost needed history forces a fresh list, diffed against
the cache so deletions that happened meanwhile are still reported. Handlers
receive keys, not payloads to act on: consumers are level-triggered and
re-read what they need.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from braid.store.etcd import KV, Compacted, Store, StoreError

log = logging.getLogger("braid.store.informer")

# on_change(key, kv_or_None): kv is None when the key was deleted
Handler = Callable[[str, "KV | None"], None]


class Informer:
    def __init__(self, store: Store, prefix: str, on_change: Handler, name: str = ""):
        self.store = store
        self.prefix = prefix
        self.on_change = on_change
        self.name = name or prefix
        self.cache: dict[str, KV] = {}
        self.revision = 0  # last revision the cache reflects
        self.synced = threading.Event()
        self.relists = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Informer":
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the informer to stop without waiting (stop several at once)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def get(self, key: str) -> KV | None:
        with self._lock:
            return self.cache.get(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self.cache)

    def _notify(self, key: str, kv: KV | None) -> None:
        try:
            self.on_change(key, kv)
        except Exception:  # a handler bug must not stop the informer
            log.exception("informer %s: handler failed for %s", self.name, key)

    def _relist(self) -> None:
        kvs, rev = self.store.list(self.prefix)
        fresh = {kv.key: kv for kv in kvs}
        with self._lock:
            old = self.cache
            self.cache = fresh
            self.revision = rev
        self.relists += 1
        for key in old.keys() - fresh.keys():
            self._notify(key, None)
        for key, kv in fresh.items():
            if key not in old or old[key].mod_revision != kv.mod_revision:
                self._notify(key, kv)
        self.synced.set()

    def _apply(self, events) -> None:
        for ev in events:
            with self._lock:
                if ev.type == "delete":
                    self.cache.pop(ev.kv.key, None)
                else:
                    self.cache[ev.kv.key] = ev.kv
                self.revision = ev.revision
            self._notify(ev.kv.key, None if ev.type == "delete" else ev.kv)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._relist()
                backoff = 0.1
                for batch in self.store.watch(self.prefix, self.revision + 1, self._stop):
                    self._apply(batch)
            except Compacted as exc:
                log.info("informer %s: %s; listing again", self.name, exc)
                continue
            except StoreError as exc:
                log.warning("informer %s: %s; retrying in %.1fs", self.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
