"""braid-scheduler: runs as N replicas; only the elected leader acts.

In this release it campaigns for the ``scheduler`` election and reports
leadership (metric ``braid_leader``); placement arrives with its issue.
"""

from __future__ import annotations

import logging
import os
import socket

from prometheus_client import Gauge

from braid.service import Daemon, Option, run_main
from braid.store import Election, Store

log = logging.getLogger("braid.scheduler")

LEADER = Gauge("braid_leader", "1 while this replica leads the election", ["election"])

OPTIONS = [Option("id", "", "replica id for the leader election (default: host-pid)")]


def body(d: Daemon):
    store = Store(d.cfg["etcd"], prefix=d.cfg["prefix"])
    d.start()
    store.revision()  # fail early when etcd is unreachable
    candidate = d.cfg["id"] or f"{socket.gethostname()}-{os.getpid()}"
    election = Election(
        store, "scheduler", candidate, ttl=d.cfg["lease_ttl"],
        on_elected=lambda e: LEADER.labels("scheduler").set(1),
        on_deposed=lambda e: LEADER.labels("scheduler").set(0),
    ).start()
    d.set_ready(True)

    def stop():
        election.stop()
        store.close()

    return stop


def main(argv=None) -> int:
    return run_main("scheduler", OPTIONS, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
