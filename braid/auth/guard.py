"""The API guard: a gRPC server interceptor that authenticates every call,
rate-limits it, checks it against the policy and audits it.

A server interceptor does not see the ``ServicerContext`` in
``intercept_service``, so :class:`ApiGuard` wraps the method handler it gets
from the continuation: the checks run inside the call, with the decoded
request and the context. In order:

1. identify the caller (``identify(handler_call_details, context)``); none:
   UNAUTHENTICATED;
2. rate limit (key: the identity, or the peer's host when unauthenticated
   or anonymous): RESOURCE_EXHAUSTED;
3. policy (controller/authz.py): PERMISSION_DENIED, e.g. "user bob
   (viewer) may not delete volume vol1"; nothing of the handler runs;
4. streaming responses (watches): at most N open per client:
   RESOURCE_EXHAUSTED;
5. run the handler; mutating calls (and console reads) are audited with
   their final status code.

Denied calls of any kind are audited too (rate-limited ones at most once per
client per ``rate_audit_interval``, with a count of the rest).

:func:`identify_from_context` is the usual ``identify``: a bearer token
(``authorization: Bearer braid_...``) if one is sent, else the peer
certificate through an injected ``cert_identity_fn`` (e.g.
``braid.auth.authz.pki_cert_identity``), else -- only in the explicitly
insecure ``anonymous_admin`` mode -- an anonymous admin.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from prometheus_client import Counter

from braid.auth.audit import AuditEvent, AuditLog
from braid.auth.authz import ANONYMOUS, ANONYMOUS_ADMIN, CURRENT, Decision, Identity, Policy, TokenStore
from braid.auth.ratelimit import RateLimiter, StreamLimiter
from braid.clock import Clock, RealClock
from braid.store import StoreError

log = logging.getLogger("braid.controller.guard")

REJECTED = Counter("braid_api_rejected_total", "API calls rejected by the guard", ["code"])

Identify = Callable[[Any, grpc.ServicerContext], "Identity | None"]
CertIdentityFn = Callable[[grpc.ServicerContext], "Identity | None"]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_AUTH_HEADER = 512


# -- identification ---------------------------------------------------------------

def _metadata(context) -> list[tuple[str, Any]]:
    try:
        return list(context.invocation_metadata() or ())
    except Exception:  # noqa: BLE001 - a context without metadata
        return []


def bearer_token(context) -> str | None:
    """The token of the call's ``authorization: Bearer ...`` header; '' if the
    header is malformed or repeated; None if there is none."""
    values = [v for k, v in _metadata(context) if k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str) or len(values[0]) > MAX_AUTH_HEADER:
        return ""
    scheme, _, token = values[0].strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def identify_from_context(context, token_store: TokenStore | None,
                          cert_identity_fn: CertIdentityFn | None,
                          anonymous_admin: bool = False) -> Identity | None:
    """Who is calling: the bearer token's user if a token is sent (a bad
    token is None: it never falls back to the certificate), else the peer
    certificate's identity, else the anonymous admin if ``anonymous_admin``,
    else None. ``StoreError`` if the token cannot be looked up."""
    token = bearer_token(context)
    if token is not None:
        if not token or token_store is None:
            return None
        return token_store.verify(token)
    if cert_identity_fn is not None:
        ident = cert_identity_fn(context)
        if ident is not None:
            return ident
    return ANONYMOUS_ADMIN if anonymous_admin else None


def make_identify(token_store: TokenStore | None = None, cert_identity_fn: CertIdentityFn | None = None,
                  anonymous_admin: bool = False) -> Identify:
    """The ``identify`` callable for :class:`ApiGuard`."""
    if anonymous_admin:
        log.warning("INSECURE: the API serves every caller without credentials as an anonymous ADMIN "
                    "(anonymous_admin mode); use only on a private test setup")

    def identify(_details, context):
        return identify_from_context(context, token_store, cert_identity_fn, anonymous_admin)

    return identify


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.5:51234`` -> ``10.0.0.5``; ``ipv6:[::1]:5`` -> ``::1``."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


def _request_id(context) -> str:
    for k, v in _metadata(context):
        if k.lower() == "x-request-id" and isinstance(v, str) and _REQUEST_ID_RE.match(v):
            return v
    return uuid.uuid4().hex


def _decode(details) -> str:
    if details is None:
        return ""
    return details.decode(errors="replace") if isinstance(details, bytes) else str(details)


# -- the interceptor --------------------------------------------------------------

@dataclass
class _Call:
    method: str
    peer: str
    request_id: str
    identity: Identity | None = None
    decision: Decision | None = None
    key: str = ""


class ApiGuard(grpc.ServerInterceptor):
    def __init__(self, identify: Identify, policy: Policy, audit: AuditLog | None = None,
                 limiter: RateLimiter | None = None, streams: StreamLimiter | None = None,
                 rate_audit_interval: float = 10.0, clock: Clock | None = None):
        self.identify = identify
        self.policy = policy
        self.audit = audit
        self.limiter = limiter
        self.streams = streams
        self.rate_audit_interval = rate_audit_interval
        self.clock = clock or RealClock()
        self._lock = threading.Lock()
        self._throttled: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (last record, suppressed)

    # grpc.ServerInterceptor
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None   # no such method: UNIMPLEMENTED, nothing runs
        method = handler_call_details.method
        if handler.request_streaming and handler.response_streaming:
            wrapped = self._stream_stream(method, handler_call_details, handler.stream_stream)
            factory = grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            wrapped = self._stream_unary(method, handler_call_details, handler.stream_unary)
            factory = grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            wrapped = self._unary_stream(method, handler_call_details, handler.unary_stream)
            factory = grpc.unary_stream_rpc_method_handler
        else:
            wrapped = self._unary_unary(method, handler_call_details, handler.unary_unary)
            factory = grpc.unary_unary_rpc_method_handler
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    # -- wrappers --------------------------------------------------------------------

    def _unary_unary(self, method, details, behavior):
        def call(request, context):
            c = self._admit(method, details, request, context)
            return self._run(c, context, lambda: behavior(request, context))
        return call

    def _stream_unary(self, method, details, behavior):
        def call(request_iterator, context):
            c = self._admit(method, details, None, context)
            return self._run(c, context, lambda: behavior(request_iterator, context))
        return call

    def _unary_stream(self, method, details, behavior):
        def call(request, context):
            c = self._admit(method, details, request, context)
            yield from self._run_stream(c, context, lambda: behavior(request, context))
        return call

    def _stream_stream(self, method, details, behavior):
        def call(request_iterator, context):
            c = self._admit(method, details, None, context)
            yield from self._run_stream(c, context, lambda: behavior(request_iterator, context))
        return call

    def _run(self, c: _Call, context, fn):
        token = CURRENT.set(c.identity)   # for checks deeper down that need the caller
        try:
            resp = fn()
        except BaseException:
            self._finish(c, context, "UNKNOWN")
            raise
        finally:
            CURRENT.reset(token)
        self._finish(c, context, "OK")
        return resp

    def _run_stream(self, c: _Call, context, fn):
        release = self._stream_slot(c, context)
        try:
            yield from fn()
        except GeneratorExit:
            self._finish(c, context, "CANCELLED")
            raise
        except BaseException:
            self._finish(c, context, "UNKNOWN")
            raise
        else:
            self._finish(c, context, "OK")
        finally:
            release()

    # -- checks ------------------------------------------------------------------------

    def _admit(self, method: str, details, request, context) -> _Call:
        """Identify, rate-limit and authorize one call; abort (after auditing)
        unless it may go on."""
        c = _Call(method, context.peer() or "", _request_id(context))
        try:
            c.identity = self.identify(details, context)
        except StoreError as exc:
            self._reject(c, context, self.policy.check(None, method, request), grpc.StatusCode.UNAVAILABLE,
                         f"cannot verify credentials now: {exc}")
        except Exception:
            log.exception("identifying the caller of %s failed", method)
            self._reject(c, context, self.policy.check(None, method, request), grpc.StatusCode.INTERNAL,
                         "internal error while identifying the caller")
        ident = c.identity
        if ident is None or ident.kind == ANONYMOUS:
            c.key = f"peer:{peer_host(c.peer)}"
        else:
            c.key = f"{ident.kind}:{ident.name}"
        if self.limiter is not None and not self.limiter.allow(c.key):
            self._reject(c, context, self.policy.check(ident, method, request),
                         grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"rate limit exceeded for {ident or c.key} ({self.limiter.rate:g} calls/s, "
                         f"burst {self.limiter.burst:g}): retry later", throttle=True)
        if ident is None:
            why = ("invalid or expired bearer token" if bearer_token(context) is not None else
                   "authentication required: a client certificate of the cluster or "
                   "'authorization: Bearer <token>'")
            self._reject(c, context, self.policy.check(None, method, request),
                         grpc.StatusCode.UNAUTHENTICATED, why)
        c.decision = self.policy.check(ident, method, request)
        if not c.decision.allowed:
            self._reject(c, context, c.decision, grpc.StatusCode.PERMISSION_DENIED, c.decision.reason)
        return c

    def _reject(self, c: _Call, context, decision: Decision, code: grpc.StatusCode, message: str,
                throttle: bool = False) -> None:
        REJECTED.labels(code.name).inc()
        c.decision = decision
        audited = self._throttle(c.key, message) if throttle else message
        if audited is not None:
            self._record(c, code.name, audited)
        context.abort(code, message)

    def _throttle(self, key: str, message: str) -> str | None:
        """``message`` if this rejection of ``key`` is to be audited (with the
        number of rejections not audited since the last record), else None."""
        now = self.clock.now()
        with self._lock:
            last, suppressed = self._throttled.get(key, (None, 0))
            if last is not None and now - last < self.rate_audit_interval:
                self._throttled[key] = (last, suppressed + 1)
                self._throttled.move_to_end(key)
                return None
            self._throttled[key] = (now, 0)
            self._throttled.move_to_end(key)
            while len(self._throttled) > 4096:
                self._throttled.popitem(last=False)
        return message + (f" ({suppressed} more rejected since the last audit record)" if suppressed else "")

    def _stream_slot(self, c: _Call, context) -> Callable[[], None]:
        if self.streams is None:
            return lambda: None
        if not self.streams.acquire(c.key):
            self._reject(c, context, c.decision, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{c.identity or c.key} has {self.streams.limit} streams open (the limit): "
                         "close one first", throttle=True)
        done = threading.Lock()
        released = []

        def release():
            with done:
                if not released:
                    released.append(True)
                    self.streams.release(c.key)

        context.add_callback(release)   # also when the client goes away mid-stream
        return release

    # -- auditing --------------------------------------------------------------------

    def _finish(self, c: _Call, context, default: str) -> None:
        if c.decision is None or not c.decision.audited:
            return
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else default
        self._record(c, name, "" if name == "OK" else _decode(context.details()))

    def _record(self, c: _Call, code: str, message: str) -> None:
        if self.audit is None:
            return
        ident, d = c.identity, c.decision
        try:
            self.audit.record(AuditEvent(
                user=ident.name if ident else "", identity=ident.kind if ident else "unauthenticated",
                role=ident.role if ident else "", peer=c.peer, method=c.method,
                verb=d.verb if d else "", kind=d.kind if d else "", name=d.name if d else "",
                code=code, message=message, request_id=c.request_id))
        except Exception:  # the call's outcome stands; the failure is logged loudly
            log.exception("cannot write an audit record for %s", c.method)
