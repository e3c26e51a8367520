"""braid-node-agent: registers the node (capacity, hypervisor) under its
lease and runs the node's VMs through libvirt.

The node is Ready exactly while the agent's lease lives. When the lease is
lost (etcd unreachable for a TTL) the agent powers off its VMs at once
(self-fencing), so a partitioned node never runs a VM that HA restarts
elsewhere; once registered again it converges from etcd.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time

from braid import hostinfo, keys
from braid.kinds import to_json
from braid.nodedaemon import NODE_OPTIONS, node_daemon_body, node_name
from braid.reconcile import Controller
from braid.service import ConfigError, Option, run_main
from braid.store import Informer, StoreError
from braid.v1 import node_pb2
from node_agent import domain_xml
from node_agent.console import console_handler
from node_agent.hypervisor import Hypervisor, HypervisorError
from node_agent.vms import VMReconciler

log = logging.getLogger("braid.node_agent")

OPTIONS = NODE_OPTIONS + [
    Option("libvirt_uri", "qemu:///system", "libvirt connection (test:///default for simulations)"),
    Option("hypervisor", "auto", "auto (probe KVM, fall back to TCG) | kvm | qemu"),
    Option("console_dir", "/var/log/braid/console", "where VM console logs are written"),
    Option("shutdown_timeout", 30.0, "seconds a guest gets to power off after ACPI shutdown", float),
    Option("capacity_cpus", 0, "CPUs to offer (0: detect)", int),
    Option("capacity_memory_mib", 0, "memory to offer in MiB (0: detect)", int),
    Option("reserved_cpus", 0, "CPUs kept for the platform itself", int),
    Option("reserved_memory_mib", 1024, "memory kept for the platform itself (MiB)", int),
    Option("workers", 4, "VM reconcile workers", int),
    Option("migration_uri", "", "libvirt URI other nodes live-migrate VMs to, e.g. "
           "qemu+tcp://10.0.0.5/system ('': no live migration to this node)"),
    Option("migration_bandwidth", 0, "MiB/s cap of outgoing live migrations (0: none)", int),
]


def node_status(cfg, hypervisor: str) -> node_pb2.NodeStatus:
    """This node's record, from the host and the config (pure apart from /proc)."""
    cpus = cfg["capacity_cpus"] or hostinfo.cpus()
    mem = (cfg["capacity_memory_mib"] << 20) or hostinfo.memory_bytes()
    return node_pb2.NodeStatus(
        addresses=hostinfo.addresses(),
        capacity=node_pb2.Resources(cpus=cpus, memory_bytes=mem),
        allocatable=node_pb2.Resources(
            cpus=max(0, cpus - cfg["reserved_cpus"]),
            memory_bytes=max(0, mem - (cfg["reserved_memory_mib"] << 20))),
        allocated=node_pb2.Resources(),
        hypervisor=hypervisor,
        numa_cells=hostinfo.numa_cells(),
        kernel=hostinfo.kernel(),
        registered_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def hypervisor_kind(cfg) -> str:
    if cfg["hypervisor"] in ("kvm", "qemu"):
        return cfg["hypervisor"]
    if cfg["hypervisor"] != "auto":
        raise ConfigError("option hypervisor: auto, kvm or qemu")
    if cfg["libvirt_uri"].startswith("test:"):
        return "test"
    from braid.kvm_probe import hypervisor_kind as probe
    return probe()


class Agent:
    """Wires the pieces; one per process."""

    def __init__(self):
        self.reconciler: VMReconciler | None = None
        self.controller: Controller | None = None

    def register(self, d) -> None:
        cfg = d.cfg
        self.node = node_name(cfg)
        self.console_dir = os.path.join(cfg["console_dir"], self.node)
        d.server.add_generic_rpc_handlers((console_handler(
            lambda vm: os.path.join(self.console_dir, f"{vm}.log"),
            self.known_vm),))
        d.add_service("braid.v1.NodeAgentService")

    def known_vm(self, vm: str) -> bool:
        """Whether ``vm`` has a domain here (for the Console RPC)."""
        if self.reconciler is None:
            return False
        return self.reconciler.hv.domain(vm) is not None

    def hook(self, d, store, presence):
        cfg = d.cfg
        kind = hypervisor_kind(cfg)
        os.makedirs(self.console_dir, exist_ok=True)
        owner = self.owner
        ctx = domain_xml.HostContext(
            domain_type="kvm" if kind == "kvm" else "qemu", node=owner,
            console_log_dir=self.console_dir,
            nbd_socket_for=lambda vol: f"/run/braid/{self.node}/nbd/{vol}.sock")
        hv = Hypervisor(cfg["libvirt_uri"], owner, on_event=lambda vm: self.enqueue(vm))
        hv.open()
        self.reconciler = VMReconciler(store, hv, self.node, ctx, cfg["shutdown_timeout"],
                                       cfg["migration_bandwidth"])
        informer = Informer(store, "vm/", lambda key, kv: self.enqueue(key.rsplit("/", 1)[-1]),
                            name="vms")
        self.informer = informer
        self.controller = Controller("vms", self.reconciler.reconcile, workers=cfg["workers"],
                                     resync_period=30.0, list_keys=self.vm_names)
        status = node_status(cfg, kind)
        # the status record outlives the lease: a dead node still shows, NotReady
        store.put(keys.status("node", self.node), to_json(status))
        self.controller.start()
        informer.start()
        log.info("node %s registered: %d cpus, %d MiB, hypervisor %s", self.node,
                 status.capacity.cpus, status.capacity.memory_bytes >> 20, kind)
        stopping = threading.Event()
        usage = threading.Thread(target=self._report_usage, args=(store, status, stopping),
                                 name="usage", daemon=True)
        usage.start()

        def stop():
            stopping.set()
            usage.join(timeout=5)
            informer.stop()
            self.controller.stop()
            hv.close()

        return stop

    def vm_names(self) -> set[str]:
        """Every VM to look at: those in etcd and those libvirt runs here."""
        names = {k.split("/", 2)[2] for k in self.informer.keys() if k.count("/") == 2}
        return names | set(self.reconciler.hv.list_domains())

    def presence_info(self, d, store) -> dict:
        # domains carry their owner: this node of this cluster (several local
        # clusters, or several nodes of one, may share a libvirtd)
        self.owner = f"{self.node}@{store.cluster_id()}"
        return {"owner": self.owner, "migration_uri": d.cfg["migration_uri"]}

    def _report_usage(self, store, status, stopping, interval: float = 5.0) -> None:
        """Keep the node's usage current: ``allocated`` (vCPUs and memory of
        the domains running here, as libvirt reports them) and what is
        measured (host CPU busy share, memory in use, CPU cores each VM's
        QEMU used over the interval: the DRS input). Written only when a
        value changed (measurements rounded to 0.01)."""
        last_cpu = hostinfo.cpu_times()
        last_vm: dict[str, int] = {}
        last_t = time.monotonic()
        while not stopping.wait(interval):
            try:
                running = [d for d in self.reconciler.hv.list_domains().values()
                           if d.state in ("running", "paused")]
                vm_ns = self.reconciler.hv.cpu_times()
            except HypervisorError:
                continue
            now, cpu = time.monotonic(), hostinfo.cpu_times()
            new = node_pb2.NodeStatus()
            new.CopyFrom(status)
            new.allocated.CopyFrom(node_pb2.Resources(cpus=sum(d.vcpus for d in running),
                                                      memory_bytes=sum(d.memory_mib for d in running) << 20))
            busy, total = cpu[0] - last_cpu[0], cpu[1] - last_cpu[1]
            new.cpu_used_fraction = round(busy / total, 2) if total > 0 else 0.0
            new.memory_used_bytes = hostinfo.memory_used_bytes()
            new.ClearField("vm_cpu_cores")
            wall_ns = max(1.0, (now - last_t) * 1e9)
            for vm, ns in vm_ns.items():
                if vm in last_vm:
                    new.vm_cpu_cores[vm] = round(max(0, ns - last_vm[vm]) / wall_ns, 2)
            last_cpu, last_vm, last_t = cpu, vm_ns, now
            # memory moves a little all the time: report it in 64 MiB steps
            new.memory_used_bytes = (new.memory_used_bytes >> 26) << 26
            if new != status:
                status.CopyFrom(new)
                try:
                    store.put(keys.status("node", self.node), to_json(status))
                except StoreError as exc:
                    log.warning("reporting usage: %s", exc)

    def enqueue(self, vm: str) -> None:
        if self.controller is not None:
            self.controller.enqueue(vm)

    def on_lost(self) -> None:
        if self.reconciler is not None:
            self.reconciler.fence()

    def on_registered(self, lease) -> None:
        if self.reconciler is not None and self.reconciler.fenced:
            log.info("registered again: leaving self-fenced mode")
            self.reconciler.unfence()
            for vm in self.vm_names():
                self.enqueue(vm)


def guard(cfg: dict) -> list:
    """With TLS, the console of a VM (boot output can carry secrets) is for
    operators and admins (and daemons), like on the API; the certificate says
    who calls (checked in the same place, controller/guard.py)."""
    from braid.service import tls_files
    if tls_files(cfg) is None:
        return []
    from braid.auth.authz import Policy, pki_cert_identity
    from braid.auth.guard import ApiGuard, make_identify
    return [ApiGuard(make_identify(None, pki_cert_identity), Policy())]


def main(argv=None) -> int:
    agent = Agent()
    return run_main("node-agent", OPTIONS, node_daemon_body(
        "node-agent", agent.hook, on_lost=agent.on_lost, on_registered=agent.on_registered,
        register=agent.register, presence_info=agent.presence_info), argv, interceptors=guard)


if __name__ == "__main__":
    raise SystemExit(main())
