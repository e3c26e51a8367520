"""braid-scheduler: runs as N replicas; only the elected leader acts.

The leader binds unbound VMs to nodes and restarts HA VMs of dead nodes
elsewhere (``scheduler.binder``; planning in ``scheduler.plan``), and writes
a heartbeat ``scheduler/status/leader`` fenced by its election token. Every
write carries the election guard. Metric ``braid_leader`` shows leadership.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading

from prometheus_client import Gauge

from braid import keys
from braid.service import ConfigError, Daemon, Option, run_main
from braid.store import Election, GuardFailed, Store, StoreError
from scheduler.binder import Binder
from scheduler.drsloop import DrsLoop
from scheduler.plan import Policy

log = logging.getLogger("braid.scheduler")

LEADER = Gauge("braid_leader", "1 while this replica leads the election", ["election"])

OPTIONS = [
    Option("id", "", "replica id for the leader election (default: host-pid)"),
    Option("cpu_overcommit", 2.0, "vCPUs per allocatable CPU", float),
    Option("memory_overcommit", 1.0, "memory overcommit ratio (1: none)", float),
    Option("placement", "spread", "spread | pack", str),
    Option("drs_mode", "manual", "DRS: off | manual (recommend) | automatic (migrate)", str),
    Option("drs_threshold", 0.8, "DRS: load (max of CPU and memory share) a node should stay under, "
                                 "0.5..0.9", float),
    Option("drs_window", "conservative", "DRS: conservative (5 min well above) | aggressive (1 min)", str),
    Option("drs_interval", 30.0, "DRS: seconds between measurements", float),
    Option("drs_window_seconds", 0.0, "DRS: sustained window in seconds (0: the window mode's)", float),
]


def body(d: Daemon):
    store = Store(d.cfg["etcd"], prefix=d.cfg["prefix"], tls=d.tls)
    d.start()
    store.revision()  # fail early when etcd is unreachable
    candidate = d.cfg["id"] or f"{socket.gethostname()}-{os.getpid()}"
    if d.cfg["placement"] not in ("spread", "pack"):
        raise ConfigError(f"placement must be spread or pack, not {d.cfg['placement']!r}")
    policy = Policy(cpu_overcommit=d.cfg["cpu_overcommit"], memory_overcommit=d.cfg["memory_overcommit"],
                    mode=d.cfg["placement"])
    try:
        DrsLoop(None, d.cfg["drs_mode"], d.cfg["drs_threshold"], d.cfg["drs_window"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    running: list = []

    def elected(e: Election) -> None:
        LEADER.labels("scheduler").set(1)
        b = Binder(store, e, policy)
        loop = DrsLoop(b, d.cfg["drs_mode"], d.cfg["drs_threshold"], d.cfg["drs_window"],
                       d.cfg["drs_interval"], d.cfg["drs_window_seconds"])
        running.extend([b, loop])
        b.start()
        loop.start()

    def deposed(e: Election) -> None:
        LEADER.labels("scheduler").set(0)
        while running:
            running.pop().stop()

    election = Election(store, "scheduler", candidate, ttl=d.cfg["lease_ttl"],
                        on_elected=elected, on_deposed=deposed).start()
    stopping = threading.Event()

    def act():
        """The leader's loop: every write carries the election guard, so a
        deposed leader (paused, partitioned) cannot act after a takeover."""
        while not stopping.wait(1.0):
            if not election.is_leader:
                continue
            try:
                guard = election.guard()
                store.put(keys.SCHEDULER_LEADER, json.dumps({
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
        deposed(election)
        store.close()

    return stop


def main(argv=None) -> int:
    return run_main("scheduler", OPTIONS, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
