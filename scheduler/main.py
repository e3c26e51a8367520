"""braid-scheduler: runs as N replicas; only the elected leader acts.

In this release it campaigns for the ``scheduler`` election, reports
leadership (metric ``braid_leader``) and, while leading, writes a heartbeat
``scheduler/status/leader`` fenced by its election token: the first acting
loop, which placement (scheduler issue) replaces.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading

from prometheus_client import Gauge

from braid.service import Daemon, Option, run_main
from braid.store import Election, GuardFailed, Store, StoreError

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
    stopping = threading.Event()

    def act():
        """The leader's loop: every write carries the election guard, so a
        deposed leader (paused, partitioned) cannot act after a takeover."""
        while not stopping.wait(1.0):
            if not election.is_leader:
                continue
            try:
                guard = election.guard()
                store.put("scheduler/status/leader", json.dumps({
                    "leader": candidate, "token": guard.create_revision,
                    "at": dt.datetime.now(dt.timezone.utc).isoformat(),
                }).encode(), guards=[guard])
            except GuardFailed:
                log.warning("write rejected: no longer the leader (fenced)")
            except StoreError as exc:
                log.warning("leader heartbeat failed: %s", exc)

    actor = threading.Thread(target=act, name="scheduler-leader", daemon=True)
    actor.start()
    d.set_ready(True)

    def stop():
        stopping.set()
        actor.join(timeout=5)
        election.stop()
        store.close()

    return stop


def main(argv=None) -> int:
    return run_main("scheduler", OPTIONS, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
