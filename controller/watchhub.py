"""Watch fan-out: one etcd watch per kind, shared by every API watcher.

A ``KindHub`` lists a kind once, then follows one etcd watch on
``<kind>/``. Each etcd event is turned into an API event (object assembled
and decoded once) and handed to every subscriber's bounded queue. The hub
keeps the last ``history`` events so a client resuming from a recent
resource_version is served from memory; older ones fall back to a
dedicated etcd watch (Resources.watch). A subscriber that cannot keep up is
dropped with an error telling it to list again, so one slow client never
holds the others back or grows the controller's memory without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque

from google.protobuf.message import Message
from prometheus_client import Gauge

from braid import kinds as K
from braid.store import Compacted, StoreError
from braid.v1 import meta_pb2

log = logging.getLogger("braid.controller.watchhub")

SUBSCRIBERS = Gauge("braid_api_watchers", "Open API watch streams served by the hub", ["kind"])

Event = tuple  # (type, object | None, revision)


class Overflow(Exception):
    """The subscriber fell too far behind and was dropped."""


class Subscriber:
    def __init__(self, limit: int):
        self.queue: queue.Queue = queue.Queue(maxsize=limit)
        self.overflowed = False

    def offer(self, ev: Event) -> bool:
        try:
            self.queue.put_nowait(ev)
            return True
        except queue.Full:
            self.overflowed = True
            return False

    def next(self, timeout: float) -> Event | None:
        if self.overflowed and self.queue.empty():
            raise Overflow()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class KindHub:
    def __init__(self, resources, kind: K.Kind, history: int = 4096, queue_limit: int = 10000):
        self.resources = resources
        self.kind = kind
        self.queue_limit = queue_limit
        self.state: dict[str, dict] = {}        # raw kvs per name (see Resources._event)
        self.objects: dict[str, Message] = {}   # assembled, existing objects
        self.revision = 0
        self.history: deque[Event] = deque(maxlen=history)
        self.history_floor = 0                  # every event after this revision is in history
        self.subscribers: set[Subscriber] = set()
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchhub-{kind.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- subscribers -----------------------------------------------------------

    def subscribe(self, resource_version: int) -> tuple[list[Event], Subscriber] | None:
        """Initial events and a live subscription, or None when the hub has
        no memory of ``resource_version`` (the caller watches etcd itself)."""
        with self._lock:
            if resource_version <= 0:
                initial = [(meta_pb2.ADDED, obj, self.revision)
                           for _, obj in sorted(self.objects.items())]
                initial.append((meta_pb2.SYNCED, None, self.revision))
            elif resource_version >= self.history_floor:
                initial = [ev for ev in self.history if ev[2] > resource_version]
            else:
                return None
            sub = Subscriber(self.queue_limit)
            self.subscribers.add(sub)
            SUBSCRIBERS.labels(self.kind.name).set(len(self.subscribers))
            return initial, sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self.subscribers.discard(sub)
            SUBSCRIBERS.labels(self.kind.name).set(len(self.subscribers))

    def _publish(self, ev: Event) -> None:
        """Call with the lock held."""
        self.history.append(ev)
        if len(self.history) == self.history.maxlen:
            self.history_floor = self.history[0][2]
        dropped = [s for s in self.subscribers if not s.offer(ev)]
        for s in dropped:
            log.warning("watch on %s: a subscriber fell %d events behind; dropped",
                        self.kind.name, self.queue_limit)
            self.subscribers.discard(s)

    # -- following etcd ----------------------------------------------------------

    def _relist(self) -> None:
        kvs, rev = self.resources.store.list(f"{self.kind.name}/")
        state: dict[str, dict] = {}
        self.resources._absorb(self.kind, state, kvs)
        objects = {}
        for name, st in state.items():
            try:
                obj = self.resources._assemble_state(self.kind, name, st)
            except K.CorruptObject as exc:
                log.warning("watch: skipping corrupt object: %s", exc)
                continue
            if obj is not None:
                objects[name] = obj
        with self._lock:
            first = not self.synced.is_set()
            if not first:  # after a compaction: tell subscribers what changed meanwhile
                for name, old in sorted(self.objects.items()):
                    if name not in objects:
                        gone = type(old)()
                        gone.CopyFrom(old)
                        gone.metadata.resource_version = rev
                        self._publish((meta_pb2.DELETED, gone, rev))
                for name, obj in sorted(objects.items()):
                    old = self.objects.get(name)
                    if old is None:
                        self._publish((meta_pb2.ADDED, obj, rev))
                    elif old != obj:
                        self._publish((meta_pb2.MODIFIED, obj, rev))
            else:
                self.history_floor = rev
            self.state, self.objects, self.revision = state, objects, rev
        self.synced.set()

    def _apply(self, batch) -> None:
        with self._lock:
            for ev in batch:
                out = self.resources._event(self.kind, self.state, ev, "", {}, True)
                self.revision = ev.revision
                if out is None:
                    continue
                typ, obj, rev = out
                if typ == meta_pb2.DELETED:
                    last = self.objects.pop(obj.metadata.name, None)
                    if last is not None:  # subscribers filter on its labels
                        obj = type(last)()
                        obj.CopyFrom(last)
                        obj.metadata.resource_version = rev
                        out = (typ, obj, rev)
                else:
                    self.objects[obj.metadata.name] = obj
                self._publish(out)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._relist()
                backoff = 0.1
                for batch in self.resources.store.watch(f"{self.kind.name}/", self.revision + 1,
                                                        self._stop):
                    if batch:
                        self._apply(batch)
            except Compacted as exc:
                log.info("watch hub %s: %s; listing again", self.kind.name, exc)
            except StoreError as exc:
                log.warning("watch hub %s: %s; retrying in %.1fs", self.kind.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # never let a bug end the hub silently
                log.exception("watch hub %s failed; restarting", self.kind.name)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
