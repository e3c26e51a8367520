"""The API guard: policy table, bearer tokens in etcd, audit log, rate
limits, and the interceptor on a real in-process gRPC server."""

from __future__ import annotations

import collections
import json
import os
import stat
import threading
import time
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from braid import kinds as K
from braid.auth.audit import AUDIT_PREFIX, AuditEvent, AuditLog, redact
from braid.auth.authz import (
    METHODS,
    ROLES,
    TOKENS_PREFIX,
    Identity,
    Policy,
    TokenStore,
    from_pki,
    pki_cert_identity,
    token_digest,
)
from braid.auth.guard import ApiGuard, identify_from_context, make_identify, peer_host
from braid.auth.ratelimit import RateLimiter, StreamLimiter
from braid.clock import FakeClock
from braid.store import Unavailable
from braid.v1 import agent_pb2, cluster_pb2, compute_pb2, meta_pb2, network_pb2, node_pb2, storage_pb2

ALICE = Identity("alice", "user", "admin")
OPAL = Identity("opal", "user", "operator")
BOB = Identity("bob", "user", "viewer")
STORAGED = Identity("storaged.n1", "service", "service")
VERBS = {"Create": "create", "Get": "get", "List": "list", "Update": "update", "Delete": "delete",
         "Watch": "watch"}


def _req(method: str, name: str = "x"):
    """A request message for a kind method, naming ``name``."""
    if method in ("Create", "Update"):
        return storage_pb2.Volume(metadata=meta_pb2.ObjectMeta(name=name))
    if method in ("Get", "Delete"):
        return meta_pb2.DeleteRequest(name=name)
    if method == "Watch":
        return meta_pb2.WatchRequest(name=name)
    return meta_pb2.ListRequest()


def _m(kind: str, method: str) -> str:
    return f"/{K.KINDS[kind].service}/{method}"


# -- policy table (pure) ----------------------------------------------------------------

def test_every_served_method_is_in_the_table():
    served = {f"/{s.full_name}/{m.name}"
              for mod in (compute_pb2, network_pb2, node_pb2, storage_pb2, cluster_pb2, agent_pb2)
              for s in mod.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert served - set(METHODS) == set()
    assert {f"/{k.service}/{m}" for k in K.KINDS.values() for m in VERBS} <= set(METHODS)


@pytest.mark.parametrize("kind", sorted(K.KINDS))
def test_viewer_reads_everything_and_writes_nothing(kind):
    policy = Policy()
    for method, verb in VERBS.items():
        d = policy.check(BOB, _m(kind, method), _req(method, "obj1"))
        assert d.allowed == (verb in ("get", "list", "watch")), (kind, method, d.reason)
        assert (d.verb, d.kind) == (verb, kind)
        if not d.allowed:
            assert d.reason == f"user bob (viewer) may not {verb} {kind} obj1"


def test_viewer_cluster_service():
    policy = Policy()
    assert policy.check(BOB, "/braid.v1.ClusterService/Info").allowed
    assert policy.check(BOB, "/braid.v1.ClusterService/GetDrsRecommendations").allowed
    d = policy.check(BOB, "/braid.v1.ClusterService/DrsApply", cluster_pb2.DrsApplyRequest(id="abcd"))
    assert not d.allowed and d.name == "abcd" and d.mutating
    assert not policy.check(BOB, "/braid.v1.ClusterService/RevertVolume",
                            cluster_pb2.RevertVolumeRequest(volume="v", snapshot="s")).allowed
    assert not policy.check(BOB, "/braid.v1.NodeAgentService/Console", agent_pb2.ConsoleRequest(vm="v")).allowed


def test_operator_runs_vms_but_deletes_no_volume():
    policy = Policy()
    allowed = [("vm", "Create"), ("vm", "Update"), ("vm", "Delete"), ("volume", "Create"),
               ("volume", "Update"), ("snapshot", "Create"), ("snapshot", "Update")]
    allowed += [(k, m) for k in K.KINDS for m in ("Get", "List", "Watch")]
    for kind in K.KINDS:
        for method in VERBS:
            d = policy.check(OPAL, _m(kind, method), _req(method, "obj1"))
            assert d.allowed == ((kind, method) in allowed), (kind, method, d.reason)
    d = policy.check(OPAL, _m("volume", "Delete"), meta_pb2.DeleteRequest(name="vol1"))
    assert not d.allowed
    assert d.reason == "user opal (operator) may not delete volume vol1"
    assert policy.check(OPAL, "/braid.v1.ClusterService/DrsApply", cluster_pb2.DrsApplyRequest(id="ab12")).allowed
    assert not policy.check(OPAL, "/braid.v1.ClusterService/RevertVolume",
                            cluster_pb2.RevertVolumeRequest(volume="v", snapshot="s")).allowed
    assert policy.check(OPAL, "/braid.v1.NodeAgentService/Console", agent_pb2.ConsoleRequest(vm="v")).allowed


@pytest.mark.parametrize("ident", [ALICE, STORAGED], ids=str)
def test_admin_and_services_may_do_everything(ident):
    policy = Policy()
    for method in METHODS:
        assert policy.check(ident, method).allowed, method


def test_unknown_methods_unknown_roles_and_probes():
    policy = Policy()
    for ident in (ALICE, STORAGED):
        d = policy.check(ident, "/braid.v1.SecretService/Leak")
        assert not d.allowed and "not part of the API policy" in d.reason
    odd = Identity("eve", "user", "superuser")
    assert not policy.check(odd, _m("vm", "Get")).allowed
    for probe in ("/grpc.health.v1.Health/Check",
                  "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        assert policy.check(BOB, probe).allowed
        assert policy.check(odd, probe).allowed    # any authenticated caller
        assert not policy.check(None, probe).allowed
    assert not policy.check(None, _m("vm", "Get")).allowed


def test_names_come_from_the_request():
    policy = Policy()
    assert policy.check(ALICE, _m("vm", "Create"), compute_pb2.VM(
        metadata=meta_pb2.ObjectMeta(name="web1"))).name == "web1"
    assert policy.check(ALICE, _m("vm", "Delete"), meta_pb2.DeleteRequest(name="web2")).name == "web2"
    assert policy.check(ALICE, _m("vm", "List"), meta_pb2.ListRequest()).name == ""
    assert policy.check(ALICE, _m("vm", "Get"), None).name == ""
    assert policy.check(ALICE, "/braid.v1.ClusterService/RevertVolume",
                        cluster_pb2.RevertVolumeRequest(volume="v9", snapshot="s")).name == "v9"


def test_roles_table_shape():
    assert set(ROLES) == {"admin", "operator", "viewer", "service"}
    assert not any(verb == "delete" and kind != "vm" for verb, kind in ROLES["operator"])


def test_from_pki_maps_certificate_identities():
    svc = SimpleNamespace(name="netd.n2", kind="service", role="")
    assert from_pki(svc) == Identity("netd.n2", "service", "service")
    assert from_pki(SimpleNamespace(name="bob", kind="user", role="viewer")) == BOB
    assert from_pki(SimpleNamespace(name="x", kind="user", role="root")) is None
    assert from_pki(None) is None


# -- bearer tokens (real etcd) ------------------------------------------------------------

class Clocks:
    def __init__(self):
        self.wall = 1_700_000_000.0
        self.mono = 100.0


def test_token_issue_verify_stored_hashed(store):
    tokens = TokenStore(store)
    tok = tokens.issue("bob", "viewer", ttl=3600)
    assert tok.startswith("braid_") and len(tok) > 40
    assert tokens.verify(tok) == BOB
    kvs, _ = store.list(TOKENS_PREFIX)
    assert [kv.key for kv in kvs] == [TOKENS_PREFIX + token_digest(tok)]
    assert tok.encode() not in kvs[0].value and tok[6:].encode() not in kvs[0].value
    rec = json.loads(kvs[0].value)
    assert rec["user"] == "bob" and rec["role"] == "viewer" and set(rec) == {"user", "role", "created", "expires"}
    assert kvs[0].lease != 0   # expired tokens go away by themselves
    assert tokens.verify("braid_nope") is None
    assert tokens.verify("not-a-token") is None
    assert tokens.verify("braid_" + "a" * 500) is None
    assert [t.user for t in tokens.list()] == ["bob"]


def test_token_validation(store):
    tokens = TokenStore(store)
    with pytest.raises(ValueError):
        tokens.issue("Bob!", "viewer", 60)
    with pytest.raises(ValueError):
        tokens.issue("bob", "service", 60)   # not a user role
    with pytest.raises(ValueError):
        tokens.issue("bob", "viewer", 0)


def test_token_expiry_and_cache(store):
    c = Clocks()
    tokens = TokenStore(store, cache_ttl=5.0, wall=lambda: c.wall, monotonic=lambda: c.mono)
    tok = tokens.issue("opal", "operator", ttl=60)
    assert tokens.verify(tok) == OPAL
    # cached: etcd is not asked again within cache_ttl
    store.delete_prefix(TOKENS_PREFIX)
    c.mono += 4
    assert tokens.verify(tok) == OPAL
    c.mono += 2
    assert tokens.verify(tok) is None
    # expiry is checked on every call, cached or not
    tok2 = tokens.issue("opal", "operator", ttl=60)
    assert tokens.verify(tok2) == OPAL
    c.wall += 61
    assert tokens.verify(tok2) is None
    c.mono += 10
    assert tokens.verify(tok2) is None


def test_token_revoke(store):
    tokens = TokenStore(store)
    t1, t2 = tokens.issue("bob", "viewer", 600), tokens.issue("bob", "admin", 600)
    t3 = tokens.issue("alice", "admin", 600)
    assert tokens.verify(t1) == BOB
    assert tokens.revoke(t1) is True
    assert tokens.verify(t1) is None      # the local cache forgets it at once
    assert tokens.revoke(t1) is False
    assert tokens.revoke_user("bob") == 1
    assert tokens.verify(t2) is None
    assert tokens.revoke(token_digest(t3)) is True
    assert tokens.verify(t3) is None


def test_corrupt_token_record_is_ignored(store):
    tokens = TokenStore(store)
    store.put(TOKENS_PREFIX + token_digest("braid_junk"), b"{not json")
    assert tokens.verify("braid_junk") is None
    store.put(TOKENS_PREFIX + token_digest("braid_root"),
              json.dumps({"user": "x", "role": "root", "created": "", "expires": "2999-01-01T00:00:00Z"}).encode())
    assert tokens.verify("braid_root") is None
    assert tokens.list() == []


# -- rate and stream limits ---------------------------------------------------------------------

def test_token_bucket():
    clock = FakeClock()
    rl = RateLimiter(rate=2, burst=3, clock=clock)
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b")                  # buckets are per key
    clock.advance(1.0)                    # 2 tokens back
    assert [rl.allow("a") for _ in range(3)] == [True, True, False]
    clock.advance(100)                    # never more than the burst
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]


def test_token_bucket_map_is_bounded():
    rl = RateLimiter(rate=1, burst=1, max_keys=2, clock=FakeClock())
    assert rl.allow("a") and rl.allow("b")
    assert not rl.allow("a")              # a is now the most recently used
    assert rl.allow("c")                  # evicts b
    assert len(rl) == 2
    assert rl.allow("b")                  # b starts over


def test_stream_limiter():
    sl = StreamLimiter(2)
    assert sl.acquire("k") and sl.acquire("k") and not sl.acquire("k")
    assert sl.acquire("j")
    sl.release("k")
    assert sl.acquire("k")
    sl.release("k"), sl.release("k"), sl.release("j")
    assert sl.open_streams("k") == 0 and sl._open == {}


# -- audit log -----------------------------------------------------------------------------

def _event(i: int = 0, **kw) -> AuditEvent:
    base = dict(user="alice", identity="user", role="admin", peer="ipv4:127.0.0.1:5000",
                method="/braid.v1.VolumeService/Delete", verb="delete", kind="volume", name=f"vol{i}",
                code="OK", message="", request_id=f"req-{i}")
    base.update(kw)
    return AuditEvent(**base)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_audit_record_fields_and_redaction(tmp_path):
    path = tmp_path / "sub" / "audit.log"
    log = AuditLog(path)
    log.record(_event(1, message="bad token braid_abcdefghijkLMNOP-_x in Bearer braid_q9 here"))
    log.close()
    [rec] = _lines(path)
    assert set(rec) == {"ts", "user", "identity", "role", "peer", "method", "verb", "kind", "name", "code",
                        "message", "request_id"}
    assert rec["user"] == "alice" and rec["code"] == "OK" and rec["name"] == "vol1"
    assert rec["ts"].endswith("Z")
    assert "abcdefghijk" not in rec["message"] and "q9" not in rec["message"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert redact("authorization: bearer xyz") == "authorization: Bearer <redacted>"


def test_audit_rotation(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1024, backups=2)
    for i in range(60):
        log.record(_event(i))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    for f in files:
        assert 0 < (tmp_path / f).stat().st_size <= 1024
    newest, older, oldest = (_lines(tmp_path / f) for f in files)
    names = [r["name"] for r in oldest + older + newest]
    assert names == [f"vol{i}" for i in range(60 - len(names), 60)]   # in order, nothing torn
    # a reopened log appends to the current file
    log = AuditLog(path, max_bytes=1024, backups=2)
    log.record(_event(99))
    log.close()
    assert _lines(path)[-1]["name"] == "vol99"


def test_audit_rotation_without_backups(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1024, backups=0)
    for i in range(30):
        log.record(_event(i))
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]
    assert _lines(path)[-1]["name"] == "vol29"


def test_audit_is_thread_safe(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=64 << 10, backups=50)
    threads = [threading.Thread(target=lambda t=t: [log.record(_event(t * 1000 + i)) for i in range(200)])
               for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    recs = [r for p in tmp_path.iterdir() for r in _lines(p)]
    assert len(recs) == 1600 and len({r["name"] for r in recs}) == 1600


def test_audit_events_in_etcd(store, tmp_path):
    log = AuditLog(tmp_path / "audit.log", store=store)
    for i in range(3):
        log.record(_event(i))
    assert log.flush(10)
    log.close()
    kvs, _ = store.list(AUDIT_PREFIX)
    assert [json.loads(kv.value)["request_id"] for kv in kvs] == ["req-0", "req-1", "req-2"]
    assert all(kv.lease != 0 for kv in kvs)
    assert len({kv.lease for kv in kvs}) == 1   # one shared lease, not one per record


# -- the interceptor on a real server ----------------------------------------------------------

class FakeVolumes:
    """A stand-in VolumeService that counts what it executed."""

    def __init__(self):
        self.calls: collections.Counter[str] = collections.Counter()
        self.release = threading.Event()

    def handler(self) -> grpc.GenericRpcHandler:
        ser = lambda m: m.SerializeToString()  # noqa: E731

        def create(req, ctx):
            self.calls["Create"] += 1
            return req

        def get(req, ctx):
            self.calls["Get"] += 1
            return storage_pb2.Volume(metadata=meta_pb2.ObjectMeta(name=req.name))

        def delete(req, ctx):
            self.calls["Delete"] += 1
            if req.name == "missing":
                ctx.abort(grpc.StatusCode.NOT_FOUND, "volume 'missing' not found")
            return meta_pb2.DeleteResponse(name=req.name, revision=7)

        def watch(req, ctx):
            self.calls["Watch"] += 1
            yield storage_pb2.VolumeEvent(type=meta_pb2.SYNCED, revision=1)
            if req.name == "hold":
                while ctx.is_active() and not self.release.wait(0.05):
                    pass

        return grpc.method_handlers_generic_handler("braid.v1.VolumeService", {
            "Create": grpc.unary_unary_rpc_method_handler(create, storage_pb2.Volume.FromString, ser),
            "Get": grpc.unary_unary_rpc_method_handler(get, meta_pb2.GetRequest.FromString, ser),
            "Delete": grpc.unary_unary_rpc_method_handler(delete, meta_pb2.DeleteRequest.FromString, ser),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, meta_pb2.WatchRequest.FromString, ser),
        })


def fake_cert_identity(context):
    """Stands in for the peer certificate (the test server is plaintext)."""
    for k, v in context.invocation_metadata():
        if k == "x-test-cert":
            return Identity(v, "service", "service")
    return None


class Api:
    def __init__(self, channel):
        self.ch = channel

    def _md(self, token, rid, cert):
        md = []
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if rid:
            md.append(("x-request-id", rid))
        if cert:
            md.append(("x-test-cert", cert))
        return md

    def unary(self, method, req, resp_cls, token=None, rid=None, cert=None):
        fn = self.ch.unary_unary(f"/braid.v1.VolumeService/{method}",
                                 request_serializer=type(req).SerializeToString,
                                 response_deserializer=resp_cls.FromString)
        return fn(req, metadata=self._md(token, rid, cert), timeout=10)

    def delete(self, name, **kw):
        return self.unary("Delete", meta_pb2.DeleteRequest(name=name), meta_pb2.DeleteResponse, **kw)

    def create(self, name, **kw):
        return self.unary("Create", storage_pb2.Volume(metadata=meta_pb2.ObjectMeta(name=name)),
                          storage_pb2.Volume, **kw)

    def get(self, name, **kw):
        return self.unary("Get", meta_pb2.GetRequest(name=name), storage_pb2.Volume, **kw)

    def watch(self, name="", token=None, cert=None):
        fn = self.ch.unary_stream("/braid.v1.VolumeService/Watch",
                                  request_serializer=meta_pb2.WatchRequest.SerializeToString,
                                  response_deserializer=storage_pb2.VolumeEvent.FromString)
        return fn(meta_pb2.WatchRequest(name=name), metadata=self._md(token, None, cert), timeout=10)

    def health(self, token=None):
        stub = health_pb2_grpc.HealthStub(self.ch)
        return stub.Check(health_pb2.HealthCheckRequest(), metadata=self._md(token, None, None), timeout=10)


def _code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        r = fn(*args, **kw)
        if hasattr(r, "__next__"):
            list(r)
    return exc.value.code(), exc.value.details()


@pytest.fixture
def served(store, tmp_path):
    """A plaintext server on 127.0.0.1 with the guard and a fake VolumeService."""
    servers = []

    def start(limiter=None, streams=None, anonymous_admin=False, clock=None, identify=None):
        tokens = TokenStore(store)
        audit = AuditLog(tmp_path / f"audit{len(servers)}.log", store=store)
        identify = identify or make_identify(tokens, fake_cert_identity, anonymous_admin)
        guard = ApiGuard(identify, Policy(), audit,
                         limiter=limiter, streams=streams, clock=clock)
        fake = FakeVolumes()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[guard])
        server.add_generic_rpc_handlers((fake.handler(),))
        hs = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        ns = SimpleNamespace(tokens=tokens, audit=audit, fake=fake, api=Api(ch), server=server, ch=ch,
                             path=Path(audit.path), guard=guard)
        servers.append(ns)
        return ns

    yield start
    for ns in servers:
        ns.fake.release.set()
        ns.ch.close()
        ns.server.stop(0).wait(5)
        ns.audit.close()


def test_guard_authenticates_authorizes_and_audits(served, store):
    s = served()
    api, fake = s.api, s.fake
    admin = s.tokens.issue("alice", "admin", 600)
    viewer = s.tokens.issue("bob", "viewer", 600)
    operator = s.tokens.issue("opal", "operator", 600)

    # no credentials: nothing runs
    assert _code(api.delete, "vol1")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _code(api.create, "vol1")[0] == grpc.StatusCode.UNAUTHENTICATED
    code, msg = _code(api.watch)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authentication required" in msg
    code, msg = _code(api.get, "vol1", token="braid_forged")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid or expired" in msg
    assert _code(api.health)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert sum(fake.calls.values()) == 0

    # viewer: reads yes, writes no
    code, msg = _code(api.delete, "vol1", token=viewer, rid="rid-bob-1")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert msg == "user bob (viewer) may not delete volume vol1"
    assert _code(api.create, "vol2", token=viewer)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert fake.calls["Delete"] == fake.calls["Create"] == 0
    assert api.get("vol1", token=viewer).metadata.name == "vol1"
    assert [e.type for e in api.watch(token=viewer)] == [meta_pb2.SYNCED]
    assert api.health(token=viewer).status == health_pb2.HealthCheckResponse.SERVING

    # operator: creates a volume, may not delete one
    assert api.create("vol3", token=operator).metadata.name == "vol3"
    assert _code(api.delete, "vol3", token=operator)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert fake.calls["Delete"] == 0

    # admin: runs, and the handler's own error is what gets audited
    assert api.delete("vol1", token=admin, rid="rid-alice-1").revision == 7
    code, _ = _code(api.delete, "missing", token=admin)
    assert code == grpc.StatusCode.NOT_FOUND
    assert fake.calls["Delete"] == 2

    # a service certificate (faked: plaintext test server)
    assert api.delete("vol9", cert="storaged.n1").revision == 7

    recs = _lines(s.path)
    got = [(r["identity"], r["user"], r["verb"], r["name"], r["code"]) for r in recs]
    assert got == [
        ("unauthenticated", "", "delete", "vol1", "UNAUTHENTICATED"),
        ("unauthenticated", "", "create", "vol1", "UNAUTHENTICATED"),
        ("unauthenticated", "", "watch", "", "UNAUTHENTICATED"),
        ("unauthenticated", "", "get", "vol1", "UNAUTHENTICATED"),
        ("unauthenticated", "", "probe", "", "UNAUTHENTICATED"),
        ("user", "bob", "delete", "vol1", "PERMISSION_DENIED"),
        ("user", "bob", "create", "vol2", "PERMISSION_DENIED"),
        ("user", "opal", "create", "vol3", "OK"),
        ("user", "opal", "delete", "vol3", "PERMISSION_DENIED"),
        ("user", "alice", "delete", "vol1", "OK"),
        ("user", "alice", "delete", "missing", "NOT_FOUND"),
        ("service", "storaged.n1", "delete", "vol9", "OK"),
    ]
    by_rid = {r["request_id"]: r for r in recs}
    assert by_rid["rid-bob-1"]["message"] == "user bob (viewer) may not delete volume vol1"
    assert by_rid["rid-bob-1"]["role"] == "viewer" and by_rid["rid-bob-1"]["peer"].startswith("ipv4:127.0.0.1:")
    assert by_rid["rid-alice-1"]["method"] == "/braid.v1.VolumeService/Delete"
    assert "not found" in recs[10]["message"]
    raw = s.path.read_text()
    for tok in (admin, viewer, operator, "braid_forged"):
        assert tok not in raw

    # the same records, watchable in etcd
    assert s.audit.flush(10)
    kvs, _ = store.list(AUDIT_PREFIX)
    assert sorted(json.loads(kv.value)["request_id"] for kv in kvs) == sorted(r["request_id"] for r in recs)


def test_revoked_and_expired_tokens_are_refused(served):
    s = served()
    tok = s.tokens.issue("alice", "admin", 600)
    assert s.api.get("v", token=tok).metadata.name == "v"
    s.tokens.revoke(tok)
    assert _code(s.api.get, "v", token=tok)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_guard_rate_limit(served):
    clock = FakeClock()
    s = served(limiter=RateLimiter(rate=1, burst=3, clock=clock), clock=clock)
    admin = s.tokens.issue("alice", "admin", 600)
    for _ in range(3):
        s.api.get("v", token=admin)
    for _ in range(3):
        code, msg = _code(s.api.get, "v", token=admin)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in msg
    assert s.fake.calls["Get"] == 3
    # another client has its own bucket; unauthenticated callers are limited by address
    s.api.get("v", cert="netd.n1")
    for _ in range(3):
        assert _code(s.api.get, "v")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _code(s.api.get, "v")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    clock.advance(1.0)
    s.api.get("v", token=admin)
    recs = [r for r in _lines(s.path) if r["code"] == "RESOURCE_EXHAUSTED"]
    # rejections are audited once per client per interval, not once per call
    assert [(r["user"], r["identity"]) for r in recs] == [("alice", "user"), ("", "unauthenticated")]
    clock.advance(11)                     # a full bucket again, and a new audit interval
    for _ in range(3):
        s.api.get("v", token=admin)
    assert _code(s.api.get, "v", token=admin)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    recs = [r for r in _lines(s.path) if r["code"] == "RESOURCE_EXHAUSTED"]
    assert len(recs) == 3 and "(2 more rejected since the last audit record)" in recs[-1]["message"]


def test_guard_stream_limit_and_release(served):
    streams = StreamLimiter(1)
    s = served(streams=streams)
    tok = s.tokens.issue("bob", "viewer", 600)
    first = s.api.watch("hold", token=tok)
    assert next(first).type == meta_pb2.SYNCED
    code, msg = _code(s.api.watch, "hold", token=tok)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams open" in msg
    first.cancel()
    deadline = time.monotonic() + 10
    while streams.open_streams("user:bob") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert streams.open_streams("user:bob") == 0
    assert [e.type for e in s.api.watch("", token=tok)] == [meta_pb2.SYNCED]
    assert streams.open_streams("user:bob") == 0


def test_anonymous_admin_mode(served):
    s = served(anonymous_admin=True)
    assert s.api.delete("vol1").revision == 7
    assert _code(s.api.delete, "vol1", token="braid_forged")[0] == grpc.StatusCode.UNAUTHENTICATED
    [ok, bad] = _lines(s.path)
    assert (ok["identity"], ok["role"], ok["code"]) == ("anonymous", "admin", "OK")
    assert bad["code"] == "UNAUTHENTICATED"


def test_identify_failures_fail_closed(served):
    def etcd_down(_details, _context):
        raise Unavailable("etcd unavailable: connection refused")

    s = served(identify=etcd_down)
    code, msg = _code(s.api.delete, "vol1", token="braid_whatever")
    assert code == grpc.StatusCode.UNAVAILABLE and "cannot verify credentials" in msg
    assert s.fake.calls["Delete"] == 0

    def broken(_details, _context):
        raise KeyError("bug")

    s = served(identify=broken)
    assert _code(s.api.get, "vol1")[0] == grpc.StatusCode.INTERNAL
    assert s.fake.calls["Get"] == 0
    assert [r["code"] for r in _lines(s.path)] == ["INTERNAL"]


def test_pki_cert_identity_without_tls():
    assert pki_cert_identity(SimpleNamespace(auth_context=lambda: {})) is None
    insecure = {"transport_security_type": [b"insecure"]}
    assert pki_cert_identity(SimpleNamespace(auth_context=lambda: insecure)) is None


def test_identify_from_context_precedence(store):
    tokens = TokenStore(store)
    tok = tokens.issue("bob", "viewer", 60)

    def ctx(*md):
        return SimpleNamespace(invocation_metadata=lambda: md)

    cert = fake_cert_identity
    assert identify_from_context(ctx(("authorization", f"Bearer {tok}")), tokens, cert) == BOB
    assert identify_from_context(ctx(("authorization", f"bearer {tok}"), ("x-test-cert", "netd.n1")),
                                 tokens, cert) == BOB
    # a bad or repeated token never falls back to the certificate or to anonymous
    assert identify_from_context(ctx(("authorization", "Bearer braid_x"), ("x-test-cert", "netd.n1")),
                                 tokens, cert, anonymous_admin=True) is None
    assert identify_from_context(ctx(("authorization", f"Bearer {tok}"), ("authorization", f"Bearer {tok}")),
                                 tokens, cert) is None
    assert identify_from_context(ctx(("authorization", f"Basic {tok}")), tokens, cert) is None
    assert identify_from_context(ctx(("authorization", f"Bearer {tok}")), None, cert) is None
    assert identify_from_context(ctx(("x-test-cert", "netd.n1")), tokens, cert).kind == "service"
    assert identify_from_context(ctx(), tokens, cert) is None
    assert identify_from_context(ctx(), tokens, cert, anonymous_admin=True).kind == "anonymous"
    assert peer_host("ipv4:10.0.0.5:51234") == "10.0.0.5"
    assert peer_host("ipv6:[::1]:5") == "::1"
    assert peer_host("unix:/run/x.sock") == "unix:/run/x.sock"
