"""The state layer over etcd: the only module of Braid that talks to etcd.

Keys are relative to a prefix (default ``/braid/``). Every write is a
compare-and-set transaction: ``create`` compares ``create_revision == 0``,
``update``/``delete`` compare ``mod_revision``. Extra ``Guard`` compares (for
example a leader's election key) can be added to any write, which is how a
leader fences its actions. Transient errors (etcd unreachable, leader
change) are retried with bounded exponential backoff (tenacity).

We use the ``etcd3`` package (the maintained ``python3-etcd3`` fork) for the
connection and the generated etcd v3 stubs, and call the stubs directly:
the high-level helpers do not return the response header revision that
list-then-watch needs.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import etcd3
import grpc
import tenacity
from etcd3 import etcdrpc

log = logging.getLogger("braid.store")

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class StoreError(Exception):
    """Base class of state-layer errors."""


class Unavailable(StoreError):
    """etcd could not be reached within the retry budget."""


class Conflict(StoreError):
    """A compare-and-set failed: the key (or a guard) changed meanwhile."""


class AlreadyExists(StoreError):
    """Create of a key that exists. ``keys``: the keys found existing (set by
    ``create_many``; empty when the raiser does not say)."""

    def __init__(self, message: str = "", keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = list(keys)


class NotFound(StoreError):
    """The key does not exist."""


class Compacted(StoreError):
    """A watch asked for history that etcd has compacted: list again."""

    def __init__(self, compact_revision: int):
        super().__init__(f"revision compacted (compact_revision={compact_revision})")
        self.compact_revision = compact_revision


class _StreamEnded(Exception):
    """The watch stream ended without an error: re-open it."""


class GuardFailed(Conflict):
    """A guard compare (e.g. leadership fence) did not hold."""


@dataclass(frozen=True)
class KV:
    """One key as read from etcd, with the revisions it was read at."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Guard:
    """An extra condition on a write: ``key``'s create_revision must equal
    ``create_revision`` (0 = must not exist)."""

    key: str
    create_revision: int


@dataclass(frozen=True)
class Event:
    """A change seen by a watch. ``kv.value`` is empty for deletes."""

    type: str  # "put" | "delete"
    kv: KV
    revision: int


def _range_end(prefix: bytes) -> bytes:
    """The etcd range end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"127.0.0.1:2379,10.0.0.2:2379"`` -> [(host, port), ...]."""
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    out = []
    for ep in endpoints:
        ep = ep.strip().removeprefix("http://").removeprefix("https://")
        host, _, port = ep.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {ep!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


class Store:
    """Typed, prefixed access to etcd with CAS writes, watches and leases."""

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:2379",
        prefix: str = "/braid/",
        timeout: float = 5.0,
        retry_budget: float = 10.0,
        tls=None,
    ):
        """``tls``: a ``braid.auth.pki.TlsFiles`` to reach etcd over TLS with a client
        certificate (etcd then knows the caller by the certificate's name)."""
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix
        self.timeout = timeout
        self.retry_budget = retry_budget
        creds = None
        if tls is not None:
            from braid.auth.pki import grpc_channel_credentials
            creds = grpc_channel_credentials(tls)
        eps = [
            etcd3.Endpoint(h, p, secure=creds is not None, creds=creds, time_retry=0.5)
            for h, p in parse_endpoints(endpoints)
        ]
        self._client = etcd3.MultiEndpointEtcd3Client(
            endpoints=eps, timeout=timeout, failover=len(eps) > 1
        )
        self._closed = False
        self._local = threading.local()

    # -- plumbing -------------------------------------------------------

    def _k(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _unk(self, raw: bytes) -> str:
        return raw.decode(errors="replace")[len(self.prefix):]

    def _kv(self, kv) -> KV:
        return KV(
            key=self._unk(kv.key),
            value=bytes(kv.value),
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            version=kv.version,
            lease=kv.lease,
        )

    def _call(self, fn, *args, budget: float | None = None, **kwargs):
        """Run one etcd RPC, retrying transient failures within the budget."""

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, grpc.RpcError) and exc.code() in _TRANSIENT

        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception(transient),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
            stop=tenacity.stop_after_delay(self.retry_budget if budget is None else budget),
            reraise=True,
        )
        timeout = self.timeout if budget is None else max(0.2, min(self.timeout, budget))
        try:
            return retryer(fn, *args, timeout=timeout, **kwargs)
        except grpc.RpcError as exc:
            if exc.code() in _TRANSIENT:
                raise Unavailable(f"etcd unavailable: {exc.details()}") from exc
            raise StoreError(f"etcd error {exc.code().name}: {exc.details()}") from exc
        finally:
            # a write whose first attempt failed in transit may have been applied
            self._local.retried = retryer.statistics.get("attempt_number", 1) > 1

    @property
    def _kvstub(self):
        return self._client.kvstub

    def close(self) -> None:
        self._closed = True
        self._client.close()

    # -- reads ----------------------------------------------------------

    def get(self, key: str, revision: int = 0) -> KV | None:
        resp = self._call(
            self._kvstub.Range, etcdrpc.RangeRequest(key=self._k(key), revision=revision)
        )
        return self._kv(resp.kvs[0]) if resp.kvs else None

    def list(self, prefix: str, revision: int = 0) -> tuple[list[KV], int]:
        """All keys under ``prefix`` and the revision they were read at."""
        k = self._k(prefix)
        resp = self._call(
            self._kvstub.Range,
            etcdrpc.RangeRequest(key=k, range_end=_range_end(k), revision=revision),
        )
        return [self._kv(kv) for kv in resp.kvs], resp.header.revision

    def list_many(self, prefixes: Iterable[str], revision: int = 0) -> tuple[dict[str, list[KV]], int]:
        """Several prefixes read atomically (one transaction, one revision)."""
        prefixes = list(prefixes)
        ops = []
        for p in prefixes:
            k = self._k(p)
            ops.append(etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
                key=k, range_end=_range_end(k), revision=revision)))
        resp = self._call(self._kvstub.Txn, etcdrpc.TxnRequest(success=ops))
        out = {p: [self._kv(kv) for kv in r.response_range.kvs]
               for p, r in zip(prefixes, resp.responses)}
        return out, resp.header.revision

    def get_many(self, keys: Iterable[str], revision: int = 0) -> tuple[dict[str, KV | None], int]:
        """Several keys read atomically (one transaction, one revision)."""
        keys = list(keys)
        ops = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
            key=self._k(k), revision=revision)) for k in keys]
        resp = self._call(self._kvstub.Txn, etcdrpc.TxnRequest(success=ops))
        out = {}
        for k, r in zip(keys, resp.responses):
            kvs = r.response_range.kvs
            out[k] = self._kv(kvs[0]) if kvs else None
        return out, resp.header.revision

    def cluster_id(self) -> str:
        """Identifies this cluster's state: etcd's cluster id plus our prefix
        (two Braid clusters never share both)."""
        resp = self._call(
            self._kvstub.Range, etcdrpc.RangeRequest(key=self._k(""), count_only=True)
        )
        return f"{resp.header.cluster_id:x}{self.prefix}"

    def revision(self) -> int:
        """The current revision of the store."""
        resp = self._call(
            self._kvstub.Range, etcdrpc.RangeRequest(key=self._k(""), count_only=True)
        )
        return resp.header.revision

    # -- writes ---------------------------------------------------------

    def _guards(self, guards: Sequence[Guard]) -> list:
        return [
            etcdrpc.Compare(
                key=self._k(g.key),
                result=etcdrpc.Compare.EQUAL,
                target=etcdrpc.Compare.CREATE,
                create_revision=g.create_revision,
            )
            for g in guards
        ]

    def _check_guards(self, guards: Sequence[Guard]) -> None:
        for g in guards:
            kv = self.get(g.key)
            have = kv.create_revision if kv else 0
            if have != g.create_revision:
                raise GuardFailed(
                    f"guard {g.key} create_revision={have}, expected {g.create_revision}"
                )

    def _txn(self, compares, success, failure=()):
        return self._call(
            self._kvstub.Txn,
            etcdrpc.TxnRequest(compare=compares, success=list(success), failure=list(failure)),
        )

    def _put_op(self, key: str, value: bytes, lease: int):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=self._k(key), value=value, lease=lease)
        )

    def _get_op(self, key: str):
        return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=self._k(key)))

    def create(self, key: str, value: bytes, lease: int = 0, guards: Sequence[Guard] = ()) -> int:
        """Create ``key``; AlreadyExists if present. Returns the new revision."""
        cmp = [
            etcdrpc.Compare(
                key=self._k(key),
                result=etcdrpc.Compare.EQUAL,
                target=etcdrpc.Compare.CREATE,
                create_revision=0,
            )
        ] + self._guards(guards)
        resp = self._txn(cmp, [self._put_op(key, value, lease)], [self._get_op(key)])
        if resp.succeeded:
            return resp.header.revision
        kvs = resp.responses[0].response_range.kvs
        if self._local.retried and kvs and kvs[0].value == value and kvs[0].lease == lease:
            # our own write, applied before a retried transport error
            return kvs[0].mod_revision
        if not kvs:
            self._check_guards(guards)
        raise AlreadyExists(f"{key} already exists")

    def create_many(self, items: dict[str, bytes], guards: Sequence[Guard] = ()) -> int:
        """Create every key of ``items`` in one transaction, only if none of
        them exists; AlreadyExists (naming the first existing key, all of
        them in ``.keys``) otherwise. Returns the new revision."""
        if not items:
            raise ValueError("create_many needs at least one key")
        keys = list(items)
        cmp = [
            etcdrpc.Compare(key=self._k(k), result=etcdrpc.Compare.EQUAL,
                            target=etcdrpc.Compare.CREATE, create_revision=0)
            for k in keys
        ] + self._guards(guards)
        resp = self._txn(cmp, [self._put_op(k, v, 0) for k, v in items.items()],
                         [self._get_op(k) for k in keys])
        if resp.succeeded:
            return resp.header.revision
        found = {k: r.response_range.kvs[0] for k, r in zip(keys, resp.responses)
                 if r.response_range.kvs}
        if (self._local.retried and len(found) == len(keys)
                and all(found[k].value == items[k] and found[k].lease == 0 for k in keys)):
            # our own write, applied before a retried transport error
            return max(kv.mod_revision for kv in found.values())
        if not found:
            self._check_guards(guards)
            raise Conflict("create_many failed")  # a guard flipped back meanwhile
        existing = [k for k in keys if k in found]
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise AlreadyExists(f"{existing[0]} already exists{more}", keys=existing)

    def apply_many(self, creates: dict[str, bytes], updates: dict[str, tuple[bytes, int]],
                   guards: Sequence[Guard] = ()) -> int:
        """In one transaction: create every key of ``creates`` (only if absent)
        and replace every key of ``updates`` (only if still at its mod
        revision). Returns the new revision; Conflict if any condition failed
        (nothing written). Keep it under etcd's --max-txn-ops (default 128)."""
        cmp = [etcdrpc.Compare(key=self._k(k), result=etcdrpc.Compare.EQUAL,
                               target=etcdrpc.Compare.CREATE, create_revision=0) for k in creates]
        cmp += [etcdrpc.Compare(key=self._k(k), result=etcdrpc.Compare.EQUAL,
                                target=etcdrpc.Compare.MOD, mod_revision=rev) for k, (_, rev) in updates.items()]
        ops = [self._put_op(k, v, 0) for k, v in creates.items()]
        ops += [self._put_op(k, v, 0) for k, (v, _) in updates.items()]
        resp = self._txn(cmp + self._guards(guards), ops)
        if resp.succeeded:
            return resp.header.revision
        self._check_guards(guards)
        raise Conflict(f"{len(creates) + len(updates)} keys changed meanwhile")

    def update(
        self, key: str, value: bytes, mod_revision: int, lease: int = 0,
        guards: Sequence[Guard] = (),
    ) -> int:
        """Replace ``key`` only if it is still at ``mod_revision``."""
        cmp = [
            etcdrpc.Compare(
                key=self._k(key),
                result=etcdrpc.Compare.EQUAL,
                target=etcdrpc.Compare.MOD,
                mod_revision=mod_revision,
            )
        ] + self._guards(guards)
        resp = self._txn(cmp, [self._put_op(key, value, lease)], [self._get_op(key)])
        if resp.succeeded:
            return resp.header.revision
        kvs = resp.responses[0].response_range.kvs
        if not kvs:
            raise NotFound(f"{key} not found")
        if (self._local.retried and kvs[0].value == value and kvs[0].lease == lease
                and kvs[0].mod_revision > mod_revision):
            return kvs[0].mod_revision  # our own write, applied before a retry
        if kvs[0].mod_revision == mod_revision:
            self._check_guards(guards)
        raise Conflict(
            f"{key} was modified (have revision {mod_revision}, now {kvs[0].mod_revision})"
        )

    def put(self, key: str, value: bytes, lease: int = 0, guards: Sequence[Guard] = ()) -> int:
        """Unconditional write (for status keys written only by their owner)."""
        if guards:
            resp = self._txn(self._guards(guards), [self._put_op(key, value, lease)])
            if not resp.succeeded:
                raise GuardFailed(f"guard failed writing {key}")
            return resp.header.revision
        resp = self._call(
            self._kvstub.Put, etcdrpc.PutRequest(key=self._k(key), value=value, lease=lease)
        )
        return resp.header.revision

    def delete(
        self, key: str, mod_revision: int = 0, also: Sequence[str] = (),
        guards: Sequence[Guard] = (),
    ) -> int:
        """Delete ``key`` (only at ``mod_revision`` if non-zero) and, in the
        same transaction, the keys in ``also``. NotFound if ``key`` is absent."""
        if mod_revision:
            cmp = etcdrpc.Compare(key=self._k(key), result=etcdrpc.Compare.EQUAL,
                                  target=etcdrpc.Compare.MOD, mod_revision=mod_revision)
        else:
            cmp = etcdrpc.Compare(key=self._k(key), result=etcdrpc.Compare.GREATER,
                                  target=etcdrpc.Compare.CREATE, create_revision=0)
        ops = [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=self._k(k)))
               for k in (key, *also)]
        resp = self._txn([cmp] + self._guards(guards), ops, [self._get_op(key)])
        if resp.succeeded:
            return resp.header.revision
        kvs = resp.responses[0].response_range.kvs
        if not kvs:
            raise NotFound(f"{key} not found")
        if mod_revision and kvs[0].mod_revision != mod_revision:
            raise Conflict(
                f"{key} was modified (have revision {mod_revision}, now {kvs[0].mod_revision})"
            )
        self._check_guards(guards)
        raise Conflict(f"delete of {key} failed")

    def delete_prefix(self, prefix: str) -> int:
        k = self._k(prefix)
        resp = self._call(
            self._kvstub.DeleteRange, etcdrpc.DeleteRangeRequest(key=k, range_end=_range_end(k))
        )
        return resp.deleted

    def compact(self, revision: int) -> None:
        self._call(self._kvstub.Compact, etcdrpc.CompactionRequest(revision=revision, physical=True))

    # -- leases ---------------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        resp = self._call(self._client.leasestub.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl))
        return resp.ID

    def keepalive_once(self, lease_id: int, budget: float | None = None) -> int:
        """Refresh a lease; returns its remaining TTL (0: the lease is gone)."""

        def call(timeout):
            for resp in self._client.leasestub.LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout
            ):
                return resp.TTL
            return 0

        return self._call(call, budget=budget)

    def revoke_lease(self, lease_id: int) -> None:
        try:
            self._call(self._client.leasestub.LeaseRevoke, etcdrpc.LeaseRevokeRequest(ID=lease_id))
        except StoreError as exc:
            if "not found" not in str(exc):
                raise

    # -- watches --------------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event,
        progress_timeout: float = 1.0,
    ) -> Iterator[list[Event]]:
        """Yield batches of events under ``prefix`` from ``start_revision`` on.

        One etcd watcher per call, so events arrive in revision order and
        resuming from the last delivered revision + 1 loses nothing (this is
        why keys are laid out kind-first: ``<kind>/spec/``, ``<kind>/status/``
        share the prefix ``<kind>/``).

        Survives dropped connections and etcd restarts by re-opening the
        watch from the revision after the last one delivered (bounded
        backoff, forever until ``stop``). Raises Compacted when the needed
        history is gone: the caller must list again. Yields an empty batch
        about every ``progress_timeout`` seconds so a consumer can check
        ``stop``.
        """
        next_rev = start_revision
        backoff = 0.05
        while not stop.is_set():
            try:
                for batch in self._watch_once(prefix, next_rev, stop, progress_timeout):
                    if batch:
                        next_rev = batch[-1].revision + 1
                    backoff = 0.05
                    yield batch
                return
            except (grpc.RpcError, _StreamEnded) as exc:
                if stop.is_set():
                    return
                why = exc.code().name if isinstance(exc, grpc.RpcError) else str(exc)
                log.warning("watch on %s dropped (%s); resuming from revision %d",
                            prefix, why, next_rev)
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _watch_once(self, prefix, start_revision, stop, progress_timeout):
        requests: queue.Queue = queue.Queue()
        k = self._k(prefix)
        requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=k, range_end=_range_end(k), start_revision=start_revision)))

        def request_iter():
            while True:
                req = requests.get()
                if req is None:
                    return
                yield req

        stub = etcdrpc.WatchStub(self._client.channel)
        call = stub.Watch(request_iter())
        responses: queue.Queue = queue.Queue()

        def pump():
            try:
                for resp in call:
                    responses.put(resp)
                responses.put(_StreamEnded("etcd closed the watch stream"))
            except grpc.RpcError as exc:
                responses.put(exc)

        t = threading.Thread(target=pump, name="etcd-watch", daemon=True)
        t.start()
        try:
            while not stop.is_set():
                try:
                    item = responses.get(timeout=progress_timeout)
                except queue.Empty:
                    yield []
                    continue
                if isinstance(item, (grpc.RpcError, _StreamEnded)):
                    raise item
                if item.compact_revision:
                    raise Compacted(item.compact_revision)
                if item.canceled:
                    raise StoreError(f"watch canceled by etcd: {item.cancel_reason}")
                events = []
                for ev in item.events:
                    kv = self._kv(ev.kv)
                    if not kv.key or (self.prefix + kv.key).encode() != bytes(ev.kv.key):
                        continue
                    typ = "delete" if ev.type == 1 else "put"
                    events.append(Event(typ, kv, ev.kv.mod_revision))
                if events:
                    yield events
        finally:
            requests.put(None)
            call.cancel()
