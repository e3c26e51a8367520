"""etcd access control: which keys each Braid service may read and write.

With TLS and ``--client-cert-auth``, etcd knows a client by the CN of its
certificate (``braid pki``: ``<service>.<node>`` for services); with auth
enabled, a user sees only what its roles grant. One role per service and
node, named like the user, holding the key ranges below (relative to the
cluster's prefix, ``/braid/``):

============  ==================================================  ==========================================
service       reads                                               writes
============  ==================================================  ==========================================
controller    everything (it serves the API for every kind)       everything
scheduler     vm/, node/, volume/, diskpool/, extent/, election/  vm/spec/, vm/status/ (bindings, HA state),
                                                                  extent/ (fencing), election/scheduler,
                                                                  scheduler/, drs/
node-agent    vm/, node/, extent/                                 node/status/<node>, node/live/<node>/node-agent,
                                                                  vm/status/, extent/ (lifting its fence)
storaged      node/live/, extent/, volume/spec/, storage/quiesce/  extent/ (drops, joins), storage/usage/<node>,
              diskpool/spec/<node>                                storage/rebuild/<node>, storage/quiesced/,
                                                                  diskpool/spec|status/<node>, its presence
netd          everything (one ordered watch: the revision it      net/vtep/<node>, node/live/<node>/netd
              reports as applied must cover every key)
============  ==================================================  ==========================================

Every role may also read the prefix key itself (the cluster id and the
revision come from it) and grant leases. ``setup`` creates the users
(``--no-password``: certificate only), the roles, a ``root`` user for
administration, and enables auth; it is idempotent. On real nodes, run it
once with the root certificate (``braid pki issue-user root --role admin``).
"""

from __future__ import annotations

import subprocess
from typing import Callable

from braid import keys

ROOT = "root"


def permissions(service: str, node: str) -> list[tuple[str, str]]:
    """(permission, key prefix relative to the cluster prefix) of a service on a node;
    a prefix ending without '/' that names one key is granted as that key only
    (``key:``)."""
    rw, r = "readwrite", "read"
    spec, status = keys.spec_prefix, keys.status_prefix
    own = [(rw, keys.live(node, service))]
    if service == "controller":
        return [(rw, "")]
    if service == "scheduler":
        return ([(r, p) for p in (keys.kind_prefix("vm"), keys.kind_prefix("node"), keys.kind_prefix("volume"),
                                  keys.kind_prefix("diskpool"), keys.ELECTION)]
                + [(rw, p) for p in (spec("vm"), status("vm"), keys.EXTENT, keys.SCHEDULER, keys.DRS)]
                + [(rw, "key:" + keys.election("scheduler"))])
    if service == "node-agent":
        return ([(r, p) for p in (keys.kind_prefix("vm"), keys.kind_prefix("node"))]
                + [(rw, p) for p in (status("vm"), keys.EXTENT, "key:" + keys.status("node", node))] + own)
    if service == "storaged":
        return ([(r, p) for p in (keys.LIVE, spec("volume"), keys.QUIESCE)]
                + [(rw, p) for p in (keys.EXTENT, keys.QUIESCED, "key:" + keys.usage(node),
                                     "key:" + keys.rebuild(node), "key:" + keys.spec("diskpool", node),
                                     "key:" + keys.status("diskpool", node))] + own)
    if service == "netd":
        return [(r, ""), (rw, "key:" + keys.vtep(node))] + own
    raise ValueError(f"no etcd permissions for service {service!r}")


def _grant_args(role: str, perm: str, rel: str, prefix: str) -> list[str]:
    if rel.startswith("key:"):
        return ["role", "grant-permission", role, perm, prefix + rel[4:]]
    return ["role", "grant-permission", "--prefix=true", role, perm, prefix + rel]


def setup(etcdctl: Callable[..., subprocess.CompletedProcess], prefix: str,
          services: list[tuple[str, str]]) -> None:
    """Create a user and role per (service, node), the root user, and enable
    auth. ``etcdctl(*args)`` runs etcdctl as root (certificate CN ``root``)."""
    def run(*args: str, ok_if: str = "") -> None:
        p = etcdctl(*args)
        if p.returncode != 0 and not (ok_if and ok_if in (p.stderr + p.stdout)):
            raise RuntimeError(f"etcdctl {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")

    run("role", "add", "root", ok_if="already exists")
    run("user", "add", ROOT, "--no-password", ok_if="already exists")
    run("user", "grant-role", ROOT, "root", ok_if="already")
    for service, node in services:
        user = f"{service}.{node}"
        run("user", "add", user, "--no-password", ok_if="already exists")
        run("role", "add", user, ok_if="already exists")
        run("role", "grant-permission", user, "read", prefix)   # the prefix key: cluster id, revision
        for perm, rel in permissions(service, node):
            run(*_grant_args(user, perm, rel, prefix))
        run("user", "grant-role", user, user, ok_if="already")
    run("auth", "enable", ok_if="already enabled")
