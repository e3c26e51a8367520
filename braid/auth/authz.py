"""Who may call which braid.v1 method: identities, roles, the policy table
and bearer tokens kept in etcd.

One table (:data:`METHODS`) maps every gRPC method the daemons serve to
an :class:`Action` (verb, resource kind, where the object name sits in the
request); one table (:data:`ROLES`) says which (verb, kind) pairs a role
grants. :meth:`Policy.check` is pure: it reads nothing but its arguments,
so the whole table is unit-tested without a server. A method that is not in
the table is denied.

Roles (least privilege that still lets each role do its job)::

    admin     everything
    service   everything: the cluster's own daemons (certificate O=braid:service).
              Today none of them calls the API (node agent, storaged, netd and
              the scheduler read and write etcd directly, with the same
              certificate), so this grants nothing they do not already hold.
    operator  read everything; run VMs: create, update (start/stop/pause and
              migrate are updates of spec.power_state / spec.node) and delete
              VMs (a VM's volumes stay: deleting a VM loses no data);
              provision storage for them: create and update (grow, QoS)
              volumes, create and update snapshots; apply DRS
              recommendations; read VM serial consoles (node agent). No
              delete of volumes, snapshots, networks, subnets, ports,
              routers, security groups, disk pools or nodes, no writes to
              networks, nodes and pools, and no RevertVolume (it overwrites
              a volume's data).
    viewer    Get, List and Watch of every kind; ClusterService Info and
              GetDrsRecommendations. Not the VM consoles.

Health checking and reflection are open to any authenticated caller.

Bearer tokens (:class:`TokenStore`) are stored hashed: ``auth/tokens/<sha256
hex of the token>`` holds ``{user, role, created, expires}``, bound to an
etcd lease that outlives ``expires`` a little, so expired tokens disappear by
themselves. The token itself is shown once, by :meth:`TokenStore.issue`.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from braid import keys
from braid import kinds as K
from braid.store import Store
from braid.validation import NAME_RE

log = logging.getLogger("braid.controller.authz")

# -- identities ---------------------------------------------------------------

USER, SERVICE, ANONYMOUS = "user", "service", "anonymous"
USER_ROLES = ("admin", "operator", "viewer")   # what a user certificate or token may carry


@dataclass(frozen=True)
class Identity:
    """The authenticated caller of one RPC."""

    name: str   # users: the user name; services: "<service>.<node>"; "anonymous"
    kind: str   # "user" | "service" | "anonymous"
    role: str   # admin | operator | viewer | service

    def __str__(self) -> str:
        if self.kind == ANONYMOUS:
            return f"anonymous caller ({self.role})"
        return f"{self.kind} {self.name} ({self.role})"


ANONYMOUS_ADMIN = Identity("anonymous", ANONYMOUS, "admin")


def from_pki(ident: Any) -> Identity | None:
    """Map a ``braid.auth.pki.Identity`` (duck-typed: name, kind, role) to ours:
    services get the ``service`` role, users the role of their certificate."""
    if ident is None:
        return None
    if ident.kind == SERVICE:
        return Identity(ident.name, SERVICE, "service")
    if ident.kind == USER and ident.role in USER_ROLES:
        return Identity(ident.name, USER, ident.role)
    return None


def pki_cert_identity(context) -> Identity | None:
    """``cert_identity_fn`` for the guard: the peer certificate's identity
    (``braid.auth.pki.identity_from_grpc_context``), or None."""
    from braid.auth import pki
    return from_pki(pki.identity_from_grpc_context(context))


# The identity of the call being served (set by the guard around the handler):
# for checks that need the object, not only the method (``host_resource_problems``).
CURRENT: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("braid_identity", default=None)


def host_resource_problems(ident: Identity | None, new, old) -> list[str]:
    """What an operator may not give a VM: host resources outside Braid's
    control — a disk that is a host file or device (``spec.disks[].path``)
    or a NIC on a host bridge (``spec.nics[].bridge``). Those already in the
    stored VM (set by an admin) may stay. Empty for admins and daemons."""
    if ident is None or ident.kind != USER or ident.role != "operator":
        return []
    had_paths = {d.path for d in old.spec.disks} if old is not None else set()
    had_bridges = {n.bridge for n in old.spec.nics} if old is not None else set()
    out = [f"spec.disks[{i}].path" for i, d in enumerate(new.spec.disks) if d.path and d.path not in had_paths]
    out += [f"spec.nics[{i}].bridge" for i, n in enumerate(new.spec.nics)
            if n.bridge and n.bridge not in had_bridges]
    return out


# -- the method table ---------------------------------------------------------

READ_VERBS = frozenset({"get", "list", "watch"})
MUTATING_VERBS = frozenset({"create", "update", "delete", "apply", "revert"})
# audited even when allowed: every mutation, and reading a VM's serial console
# (boot output can carry secrets, e.g. generated passwords)
AUDITED_VERBS = MUTATING_VERBS | {"console"}
PROBE = "probe"   # health checking and reflection


@dataclass(frozen=True)
class Action:
    verb: str         # get | list | watch | create | update | delete | apply | revert | console | probe
    kind: str         # a kind name ("volume"), "cluster", "drs", or "" for probes
    name_field: str   # dotted path of the object's name in the request ("" : none)

    @property
    def mutating(self) -> bool:
        return self.verb in MUTATING_VERBS

    @property
    def audited(self) -> bool:
        return self.verb in AUDITED_VERBS


def _method_table() -> dict[str, Action]:
    table: dict[str, Action] = {}
    for kind in K.KINDS.values():
        for method, verb, field in (("Create", "create", "metadata.name"), ("Get", "get", "name"),
                                    ("List", "list", ""), ("Update", "update", "metadata.name"),
                                    ("Delete", "delete", "name"), ("Watch", "watch", "name")):
            table[f"/{kind.service}/{method}"] = Action(verb, kind.name, field)
    cluster = "/braid.v1.ClusterService/"
    table[cluster + "Info"] = Action("get", "cluster", "")
    table[cluster + "GetDrsRecommendations"] = Action("get", "drs", "")
    table[cluster + "DrsApply"] = Action("apply", "drs", "id")
    table[cluster + "RevertVolume"] = Action("revert", "volume", "volume")
    table[cluster + "IssueToken"] = Action("create", "token", "user")
    # served by the node agent, not the controller
    table["/braid.v1.NodeAgentService/Console"] = Action("console", "vm", "vm")
    for probe in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                  "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                  "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"):
        table[probe] = Action(PROBE, "", "")
    return table


METHODS: Mapping[str, Action] = _method_table()

# -- roles ----------------------------------------------------------------------

ANY = "*"
_READ = frozenset((verb, ANY) for verb in READ_VERBS)

ROLES: Mapping[str, frozenset[tuple[str, str]]] = {
    "admin": frozenset({(ANY, ANY)}),
    "service": frozenset({(ANY, ANY)}),
    "operator": _READ | {
        ("create", "vm"), ("update", "vm"), ("delete", "vm"),
        ("create", "volume"), ("update", "volume"),
        ("create", "snapshot"), ("update", "snapshot"),
        ("apply", "drs"), ("console", "vm"),
    },
    "viewer": _READ,
}


def grants(rules: frozenset[tuple[str, str]], verb: str, kind: str) -> bool:
    """Whether a role's rules allow ``verb`` on ``kind`` ("*" matches any)."""
    return any(pair in rules for pair in ((verb, kind), (verb, ANY), (ANY, kind), (ANY, ANY)))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    verb: str = ""
    kind: str = ""
    name: str = ""

    @property
    def mutating(self) -> bool:
        return self.verb in MUTATING_VERBS

    @property
    def audited(self) -> bool:
        """Recorded in the audit log even when allowed."""
        return self.verb in AUDITED_VERBS


MAX_NAME = 253


def request_name(request: Any, field: str) -> str:
    """The object name at dotted ``field`` of a request message ('' if none)."""
    if not field or request is None:
        return ""
    value: Any = request
    for part in field.split("."):
        value = getattr(value, part, None)
        if value is None:
            return ""
    return value[:MAX_NAME] if isinstance(value, str) else ""


class Policy:
    """The authorization decision for one call; pure (no I/O)."""

    def __init__(self, methods: Mapping[str, Action] = METHODS,
                 roles: Mapping[str, frozenset[tuple[str, str]]] = ROLES):
        self.methods = methods
        self.roles = roles

    def action(self, full_method: str) -> Action | None:
        return self.methods.get(full_method)

    def check(self, identity: Identity | None, full_method: str, request: Any = None) -> Decision:
        act = self.methods.get(full_method)
        if act is None:
            return Decision(False, f"method {full_method} is not part of the API policy (denied by default)")
        name = request_name(request, act.name_field)
        if identity is None:
            return Decision(False, "authentication required", act.verb, act.kind, name)
        if act.verb == PROBE:
            return Decision(True, "health checking and reflection are open to authenticated callers",
                            act.verb, act.kind, name)
        what = f"{act.verb} {act.kind}" + (f" {name}" if name else "")
        if identity.role not in self.roles:
            return Decision(False, f"{identity} has an unknown role and may not {what}",
                            act.verb, act.kind, name)
        if grants(self.roles[identity.role], act.verb, act.kind):
            return Decision(True, f"role {identity.role} may {act.verb} {act.kind}", act.verb, act.kind, name)
        return Decision(False, f"{identity} may not {what}", act.verb, act.kind, name)


# -- bearer tokens -------------------------------------------------------------

TOKEN_PREFIX = "braid_"
TOKENS_PREFIX = keys.TOKENS
MAX_TOKEN_LEN = 256
MAX_TOKEN_TTL = 10 * 366 * 86400
LEASE_GRACE = 300   # the key outlives ``expires`` by this much (verify checks expires itself)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class TokenInfo:
    digest: str     # sha256 hex of the token: its key, safe to show
    user: str
    role: str
    created: str    # RFC 3339
    expires: str


class TokenStore:
    """Bearer tokens in etcd, stored by hash; lookups cached for ``cache_ttl``
    seconds (a revocation on another controller replica takes effect on this
    one within that time).

    ``verify`` raises ``StoreError`` when etcd cannot be asked (the caller
    answers UNAVAILABLE, not UNAUTHENTICATED)."""

    def __init__(self, store: Store, cache_ttl: float = 5.0, cache_size: int = 4096,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.store = store
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._wall = wall
        self._mono = monotonic
        self._lock = threading.Lock()
        # digest -> (identity or None, expires (wall), cached at (monotonic))
        self._cache: OrderedDict[str, tuple[Identity | None, float, float]] = OrderedDict()

    def issue(self, user: str, role: str, ttl: float) -> str:
        """A new token for ``user`` with ``role``, valid ``ttl`` seconds.
        The token is returned once and stored only as its hash."""
        if not NAME_RE.match(user or ""):
            raise ValueError(f"user name {user!r}: lower-case letters, digits and '-', 1..63 characters")
        if role not in USER_ROLES:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(USER_ROLES)})")
        if not 0 < ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"ttl {ttl!r}: between 1 second and {MAX_TOKEN_TTL} seconds")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._wall()
        record = {"user": user, "role": role, "created": _rfc3339(now), "expires": _rfc3339(now + ttl)}
        lease = self.store.grant_lease(int(ttl) + LEASE_GRACE)
        self.store.create(TOKENS_PREFIX + token_digest(token),
                          json.dumps(record, sort_keys=True).encode(), lease=lease)
        log.info("issued a token", extra={"user": user, "role": role, "expires": record["expires"]})
        return token

    def verify(self, token: str) -> Identity | None:
        """The user a token stands for, or None (unknown, malformed, expired)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LEN:
            return None
        digest = token_digest(token)
        now = self._wall()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and self._mono() - hit[2] < self.cache_ttl:
                self._cache.move_to_end(digest)
                ident, expires, _ = hit
                return ident if ident is not None and now < expires else None
        ident, expires = self._lookup(digest)
        with self._lock:
            self._cache[digest] = (ident, expires, self._mono())
            self._cache.move_to_end(digest)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ident if ident is not None and now < expires else None

    def _lookup(self, digest: str) -> tuple[Identity | None, float]:
        kv = self.store.get(TOKENS_PREFIX + digest)
        if kv is None:
            return None, 0.0
        info = self._decode(digest, kv.value)
        if info is None:
            return None, 0.0
        return Identity(info.user, USER, info.role), _parse_ts(info.expires)

    def _decode(self, digest: str, value: bytes) -> TokenInfo | None:
        try:
            d = json.loads(value)
            info = TokenInfo(digest, d["user"], d["role"], d["created"], d["expires"])
            _parse_ts(info.expires)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("token record %s… is corrupt; ignored", digest[:12])
            return None
        if info.role not in USER_ROLES or not NAME_RE.match(info.user):
            log.warning("token record %s… has a bad user or role; ignored", digest[:12])
            return None
        return info

    def revoke(self, token: str) -> bool:
        """Revoke a token (given as the token itself or its sha256 hex digest).
        False if there was no such token."""
        digest = token if len(token) == 64 and not token.startswith(TOKEN_PREFIX) else token_digest(token)
        with self._lock:
            self._cache.pop(digest, None)
        return self.store.delete_prefix(TOKENS_PREFIX + digest) > 0

    def revoke_user(self, user: str) -> int:
        """Revoke every token of ``user``; returns how many there were."""
        n = 0
        for info in self.list():
            if info.user == user and self.revoke(info.digest):
                n += 1
        return n

    def list(self) -> list[TokenInfo]:
        kvs, _ = self.store.list(TOKENS_PREFIX)
        out = []
        for kv in kvs:
            info = self._decode(kv.key.removeprefix(TOKENS_PREFIX), kv.value)
            if info is not None:
                out.append(info)
        return out
