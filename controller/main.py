"""braid-controller: serves the braid.v1 API over gRPC.

Replicas are stateless and may run side by side (every write is a CAS in
etcd); cluster-level reconcilers inside the controller (network VNIs,
volume placement; HA in a later issue) run only on the replica that wins the
``controller`` election.
"""

from __future__ import annotations

import logging
import os
import socket

from braid import kinds as K
from braid.service import ConfigError, Daemon, Option, run_main, tls_files
from braid.store import Election, Store
from controller.api import cluster_handler, kind_handler
from controller.networks import NetworkReconciler
from controller.resources import Resources
from controller.snapshots import SnapshotReconciler
from controller.volumes import VolumeReconciler

log = logging.getLogger("braid.controller")

OPTIONS = [
    Option("cluster_name", "braid", "name of this cluster"),
    Option("id", "", "replica id for the leader election (default: host-pid)"),
    Option("rebuild_delay", 60.0, "seconds a storage daemon may be away before its replicas are "
                                  "rebuilt on other nodes", float),
    Option("token_listen", "", "a second API address for clients with a bearer token instead of a "
                               "client certificate (TLS; '' = off)"),
    Option("audit_log", "", "append-only audit log of every change and every refused call "
                            "('' = no file; events are also kept in etcd under audit/ for 7 days)"),
    Option("api_rate", 200.0, "API calls per second per client (token bucket; with TLS; 0: off)", float),
    Option("api_burst", 400, "API calls a client may burst above the rate", int),
    Option("api_streams", 64, "watch streams one client may hold open", int),
]


_shared: dict = {}   # what the guard (made before the gRPC server) and the body share


def guard(cfg: dict) -> list:
    """The API guard, one place for every call: who is calling (client
    certificate, or bearer token on the token port), may they (roles), not
    too often (per-client rate), and an audit record of every change and
    every refusal. Without TLS (tests, a laptop) every caller is an
    anonymous admin, said loudly in the log."""
    from braid.auth.audit import AuditLog
    from braid.auth.authz import Policy, TokenStore, pki_cert_identity
    from braid.auth.guard import ApiGuard, make_identify
    from braid.auth.ratelimit import RateLimiter, StreamLimiter
    tls = tls_files(cfg)
    store = _shared["store"] = Store(cfg["etcd"], prefix=cfg["prefix"], tls=tls)
    tokens = _shared["tokens"] = TokenStore(store)
    audit = _shared["audit"] = AuditLog(cfg["audit_log"] or None, store=store)
    identify = make_identify(tokens if tls else None, pki_cert_identity, anonymous_admin=tls is None)
    # per-client limits need to know the client: with TLS (without, every caller is "anonymous")
    limiter = RateLimiter(cfg["api_rate"], cfg["api_burst"]) if tls and cfg["api_rate"] > 0 else None
    return [ApiGuard(identify, Policy(), audit, limiter, StreamLimiter(cfg["api_streams"]) if tls else None)]


def body(d: Daemon):
    cfg = d.cfg
    store = _shared["store"]
    resources = Resources(store)
    for kind in K.KINDS.values():
        d.server.add_generic_rpc_handlers((kind_handler(resources, kind),))
        d.add_service(kind.service)
    d.server.add_generic_rpc_handlers((cluster_handler(store, resources, cfg["cluster_name"],
                                                       tokens=_shared["tokens"]),))
    d.add_service("braid.v1.ClusterService")
    if cfg["token_listen"]:
        if d.tls is None:
            raise ConfigError("token_listen needs TLS (tls_cert, tls_key, tls_ca): tokens never travel in clear")
        from braid.auth.pki import reloading_grpc_server_credentials
        from braid.service import split_hostport
        host, port = split_hostport(cfg["token_listen"])
        if not d.server.add_secure_port(f"{host}:{port}", reloading_grpc_server_credentials(
                d.tls, require_client_cert=False)):
            raise ConfigError(f"cannot listen on {cfg['token_listen']}")
    d.start()
    store.revision()  # fail early (bounded retries) when etcd is unreachable
    candidate = cfg["id"] or f"{socket.gethostname()}-{os.getpid()}"
    reconcilers: list[NetworkReconciler | VolumeReconciler | SnapshotReconciler] = []

    def elected(e: Election) -> None:
        for r in (NetworkReconciler(store, e), VolumeReconciler(store, e, cfg["rebuild_delay"]),
                  SnapshotReconciler(store, e)):
            reconcilers.append(r)
            r.start()

    def deposed(e: Election) -> None:
        while reconcilers:
            reconcilers.pop().stop()

    election = Election(store, "controller", candidate, ttl=cfg["lease_ttl"],
                        on_elected=elected, on_deposed=deposed).start()
    d.set_ready(True)

    def stop():
        election.stop()
        deposed(election)
        resources.close()
        _shared["audit"].close()
        store.close()

    return stop


def main(argv=None) -> int:
    return run_main("controller", OPTIONS, body, argv, interceptors=guard)


if __name__ == "__main__":
    raise SystemExit(main())
