"""DRS in the scheduler leader: measure, decide, recommend or act.

Every ``interval`` seconds the leader turns the node agents' measurements
(node status: ``cpu_used_fraction`` of the host, ``memory_used_bytes``,
``vm_cpu_cores`` per VM) into loads, feeds them to ``drs.Sustained`` (hot =
above the threshold for the mode's window) and plans with
``drs.plan_moves``. The plan is published as ``drs/recommendations``
(``DrsRecommendations`` in canonical JSON; ``braid drs recommendations``
reads it through the API, ``braid drs apply ID`` carries one out). In
``automatic`` mode the leader also carries out the moves itself, at most one
per source node at a time: a move is a rebinding (``spec.node``), which the
node agents perform as a live migration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time

from braid import keys
from braid import kinds as K
from braid.store import GuardFailed, StoreError
from braid.v1 import cluster_pb2
from scheduler import drs
from scheduler.plan import NodeInfo

log = logging.getLogger("braid.scheduler.drs")

KEY = keys.DRS_RECOMMENDATIONS
MODES = ("off", "manual", "automatic")


class DrsLoop:
    def __init__(self, binder, mode: str = "manual", threshold: float = drs.DEFAULT_THRESHOLD,
                 window: str = "conservative", interval: float = 30.0, window_s: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"DRS mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.binder = binder
        self.mode = mode
        self.threshold = drs.validate_threshold(threshold)
        self.sustained = drs.Sustained(self.threshold, window, max_gap_s=max(60.0, 3 * interval))
        if window_s > 0:  # an explicit window replaces the mode's (tests, impatient operators)
            self.sustained.mode = dataclasses.replace(self.sustained.mode, window_s=window_s)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: cluster_pb2.DrsRecommendations | None = None

    def start(self) -> None:
        if self.mode == "off":
            return
        self._thread = threading.Thread(target=self._run, name="drs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.binder.election.is_leader:
                continue
            try:
                self.tick(time.monotonic())
            except GuardFailed:
                log.warning("DRS: no longer the leader")
            except StoreError as exc:
                log.warning("DRS: %s", exc)
            except Exception:
                log.exception("DRS round failed")

    def inputs(self) -> tuple[list[drs.NodeLoad], list[drs.VMLoad]]:
        """Loads from the binder's caches (reservations) and the measurements."""
        b = self.binder
        with b._lock:
            nodes, vms = [], []
            for name, n in b.nodes.items():
                m = b.measured.get(name)
                if m is None or not n.ready or n.cpus <= 0:
                    continue
                host_frac, capacity_cpus, mem_used_mib, vm_cores = m
                copy = NodeInfo(n.name, n.ready, n.unschedulable, n.maintenance, n.cpus, n.memory_mib,
                                n.hypervisor, n.numa_cells, dict(n.labels), n.used_vcpus, n.used_memory_mib,
                                n.groups.copy())
                nodes.append(drs.NodeLoad(copy, min(1.0, host_frac * capacity_cpus / n.cpus), mem_used_mib))
                for vm, (node, req, _ha, _prio) in b.vms.items():
                    if node == name:
                        vms.append(drs.VMLoad(req, name, vm_cores.get(vm, 0.0), req.memory_mib))
        return nodes, vms

    def tick(self, now: float) -> cluster_pb2.DrsRecommendations:
        nodes, vms = self.inputs()
        loads = drs.loads(nodes)
        hot = self.sustained.observe(loads, now)
        plan = drs.plan_moves(nodes, vms, self.threshold, self.binder.policy, hot=hot)
        rec = cluster_pb2.DrsRecommendations(
            mode=self.mode, threshold=self.threshold, hot=plan.hot, reasons=plan.reasons,
            generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        for name, load in sorted(loads.items()):
            rec.loads[name] = round(load, 3)
        for m in plan.moves:
            rec.moves.add(id=m.id, vm=m.vm, source=m.source, target=m.target, reason=m.reason,
                          source_load=round(m.source_load, 3), target_load=round(m.target_load, 3))
        changed = self.last is None or list(rec.moves) != list(self.last.moves) \
            or list(rec.hot) != list(self.last.hot) or dict(rec.loads) != dict(self.last.loads)
        if changed:
            self.binder.store.put(KEY, K.to_json(rec), guards=[self.binder.election.guard()])
            if rec.moves:
                log.info("DRS: %d move(s) recommended for hot node(s) %s", len(rec.moves), ", ".join(rec.hot))
        self.last = rec
        if self.mode == "automatic":
            self.execute(rec)
        return rec

    def execute(self, rec: cluster_pb2.DrsRecommendations) -> list[str]:
        """Carry out the moves, one per source node at a time."""
        done, busy = [], set()
        for m in rec.moves:
            if m.source in busy:
                continue
            if self.binder.move(m.vm, m.source, m.target, f"DRS {m.id}: {m.reason}"):
                done.append(m.id)
                busy.add(m.source)
        return done
