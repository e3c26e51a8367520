"""The API audit log: one JSON line per mutating or denied call.

Each record goes to an append-only file (``O_APPEND``, mode 0600, rotated by
size: ``audit.log`` -> ``audit.log.1`` -> ... -> ``audit.log.<backups>``)
and, when a store is given, to etcd under ``audit/<ts-ns>-<rand>`` so
integrations can watch the prefix. The etcd keys are bound to a shared lease
(re-granted every ``lease_every`` seconds) of ``retention`` seconds, so the
prefix stays bounded; etcd writes happen on a background thread through a
bounded queue and never hold up an RPC (when etcd is away, records are
dropped from etcd only; the file has them all).

A record holds who (user, kind of identity, role, peer), what (method,
verb, resource kind, object name), the outcome (status code name, message)
and the request id. No request bodies; bearer tokens in any field are
redacted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field

from prometheus_client import Counter

from braid import keys
from braid.store import Store, StoreError, Unavailable

log = logging.getLogger("braid.controller.audit")

AUDIT_PREFIX = keys.AUDIT
RECORDS = Counter("braid_audit_records_total", "Audit records written", ["code"])
DROPPED = Counter("braid_audit_etcd_dropped_total", "Audit records not published to etcd")

_TOKEN_RE = re.compile(r"braid_[A-Za-z0-9_\-]{4,}")
_BEARER_RE = re.compile(r"(?i)\bbearer\s+\S+")
_LIMITS = {"message": 1024, "name": 253}
_DEFAULT_LIMIT = 256


def redact(text: str) -> str:
    """``text`` with bearer tokens replaced."""
    text = _BEARER_RE.sub("Bearer <redacted>", text)
    return _TOKEN_RE.sub("braid_<redacted>", text)


@dataclass(frozen=True)
class AuditEvent:
    user: str         # identity name ('' when unauthenticated)
    identity: str     # user | service | anonymous | unauthenticated
    role: str
    peer: str         # gRPC peer, e.g. ipv4:10.0.0.5:51234
    method: str       # full gRPC method
    verb: str         # create | update | delete | apply | revert | get | ...
    kind: str         # resource kind ("volume"), "cluster", "drs" or ''
    name: str         # object name ('' if none)
    code: str         # final gRPC status code name: OK, PERMISSION_DENIED, ...
    message: str      # the status message ('' for OK)
    request_id: str
    ts: float = field(default_factory=time.time)

    def to_record(self) -> dict:
        rec = asdict(self)
        rec["ts"] = (dt.datetime.fromtimestamp(self.ts, dt.timezone.utc)
                     .strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        for k, v in rec.items():
            if isinstance(v, str) and k != "ts":
                rec[k] = redact(v)[:_LIMITS.get(k, _DEFAULT_LIMIT)]
        return rec


class AuditLog:
    """Thread-safe writer of audit records; see the module docstring."""

    def __init__(self, path: str | os.PathLike | None, max_bytes: int = 10 << 20, backups: int = 5,
                 store: Store | None = None, fsync: bool = False, retention: int = 7 * 86400,
                 lease_every: float = 3600.0, queue_size: int = 10000):
        if max_bytes < 1024:
            raise ValueError("max_bytes: at least 1024")
        if backups < 0:
            raise ValueError("backups: 0 or more")
        self.path = os.fspath(path) if path else None
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self.store = store
        self.retention = retention
        self.lease_every = lease_every
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._closed = False
        if self.path:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, mode=0o750, exist_ok=True)
            self._open()
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=queue_size)
        self._lease = 0
        self._lease_at = 0.0
        self._last_warning = 0.0
        self._publisher: threading.Thread | None = None
        if store is not None:
            self._publisher = threading.Thread(target=self._publish_loop, name="audit-etcd", daemon=True)
            self._publisher.start()

    # -- the file -----------------------------------------------------------------

    def _open(self) -> None:
        assert self.path
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        assert self.path
        os.close(self._fd)
        self._fd = -1
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def _write(self, line: bytes) -> None:
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
        view = memoryview(line)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(line)
        if self.fsync:
            os.fsync(self._fd)

    # -- recording -------------------------------------------------------------------

    def record(self, event: AuditEvent) -> dict:
        """Write one record (file now, etcd soon); returns it as written."""
        rec = event.to_record()
        line = (json.dumps(rec, sort_keys=True, ensure_ascii=True) + "\n").encode()
        RECORDS.labels(rec["code"]).inc()
        with self._lock:
            if self._closed:
                raise RuntimeError("audit log is closed")
            if self._fd >= 0:
                try:
                    self._write(line)
                except OSError:
                    log.exception("cannot write the audit log %s", self.path)
                    raise
        if self._publisher is not None:
            try:
                self._queue.put_nowait(dict(rec, _ns=int(event.ts * 1e9)))
            except queue.Full:
                DROPPED.inc()
                self._warn("audit queue to etcd is full: record dropped from etcd (kept in the file)")
        return rec

    # -- etcd --------------------------------------------------------------------------

    def _warn(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning(msg, *args)

    def _lease_id(self) -> int:
        assert self.store is not None
        now = time.monotonic()
        if not self._lease or now - self._lease_at >= self.lease_every:
            self._lease = self.store.grant_lease(int(self.retention + self.lease_every))
            self._lease_at = now
        return self._lease

    def _publish(self, rec: dict) -> None:
        assert self.store is not None
        ns = rec.pop("_ns")
        key = keys.audit(f"{ns:019d}-{secrets.token_hex(4)}")
        value = json.dumps(rec, sort_keys=True).encode()
        for attempt in (1, 2):
            try:
                self.store.put(key, value, lease=self._lease_id())
                return
            except Unavailable as exc:
                DROPPED.inc()
                self._warn("cannot publish audit records to etcd: %s", exc)
                return
            except StoreError as exc:   # e.g. our lease is gone (etcd restored): take a new one
                self._lease = 0
                if attempt == 2:
                    DROPPED.inc()
                    self._warn("cannot publish audit records to etcd: %s", exc)

    def _publish_loop(self) -> None:
        while True:
            rec = self._queue.get()
            try:
                if rec is None:
                    return
                self._publish(rec)
            except Exception:  # never let the publisher die
                log.exception("audit publisher")
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued records are in etcd (or dropped); False on timeout."""
        if self._publisher is None:
            return True
        with self._queue.all_tasks_done:
            return self._queue.all_tasks_done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._publisher is not None:
            self.flush(timeout)
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._publisher.join(timeout)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
