"""The frame shared by the per-node daemons (node agent, storage daemon,
network daemon): connect to etcd, register presence under a lease, serve
health/reflection/metrics, and stop cleanly."""

from __future__ import annotations

import logging
import socket
from typing import Callable

from braid.presence import Presence
from braid.service import ConfigError, Daemon, Option
from braid.store import Lease, Store
from braid.validation import NAME_RE

log = logging.getLogger("braid.nodedaemon")

NODE_OPTIONS = [
    Option("node", "", "this node's name (default: the host name)"),
]

# hook(daemon, store, presence) -> stop callable or None; called once
# registered. on_lost(daemon) is called when the lease is lost.
Hook = Callable[[Daemon, Store, Presence], Callable[[], None] | None]


def node_name(cfg) -> str:
    name = cfg["node"] or socket.gethostname().split(".")[0].lower()
    if not NAME_RE.match(name):
        raise ConfigError(f"node name {name!r} is not a valid name (lowercase letters, digits, '-')")
    return name


def node_daemon_body(daemon: str, hook: Hook | None = None,
                     on_lost: Callable[[], None] | None = None,
                     on_registered: Callable[[Lease], None] | None = None,
                     register: Callable[[Daemon], None] | None = None,
                     presence_info: Callable[[Daemon, Store], dict] | None = None):
    """``register(daemon)`` adds gRPC services before the server starts;
    ``presence_info(daemon, store)`` adds fields to the daemon's presence."""

    def body(d: Daemon):
        node = node_name(d.cfg)
        store = Store(d.cfg["etcd"], prefix=d.cfg["prefix"], tls=d.tls)
        if register:
            register(d)
        d.start()
        presence = Presence(store, node, daemon, d.cfg["lease_ttl"],
                            grpc_address=d.grpc_address, metrics_address=d.metrics_address,
                            on_lost=on_lost, on_registered=on_registered,
                            **(presence_info(d, store) if presence_info else {}))
        presence.start()
        extra_stop = hook(d, store, presence) if hook else None
        d.set_ready(True)

        def stop():
            if extra_stop:
                extra_stop()
            presence.stop()
            store.close()

        return stop

    return body
