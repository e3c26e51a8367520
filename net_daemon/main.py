"""braid-netd: the node's network data path — bridges + VXLAN per network,
distributed router namespaces, the nftables firewall and DHCP for the
node's ports — rebuilt from etcd, level-triggered.

One informer lists and watches the whole Braid prefix (the network kinds,
VM bindings and the other net daemons' presence, which carries their VTEP
addresses); any relevant change queues one reconcile of the node: compute
the desired state (net_daemon/model.py, pure), converge the kernel
(net_daemon/kernel.py), the firewall (net_daemon/firewall.py) and the DHCP
host tables (net_daemon/dhcp.py). The etcd revision the pass started from
is then published in the daemon's presence as ``applied_revision`` (OVN's
nb_cfg idea): ``braid ... --wait`` compares it with the revision of a
change.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

from braid import keys, validation
from braid import kinds as K
from braid.nodedaemon import NODE_OPTIONS, node_daemon_body, node_name
from braid.reconcile import Controller, Result
from braid.service import ConfigError, Option, run_main
from braid.store import KV, Informer
from net_daemon import firewall
from net_daemon import model as M

log = logging.getLogger("braid.netd")

OPTIONS = NODE_OPTIONS + [
    Option("tunnel_ip", "", "this node's VXLAN endpoint address on the underlay "
                            "(default: the source address of the default route)"),
    Option("tunnel_port", 4789, "VXLAN UDP port", int),
    Option("dataplane", "kernel", "kernel: build the data path; off: only register "
                                  "(a node sharing its kernel with another node's netd)"),
    Option("serve_nodes", "", "other nodes whose ports are in this kernel too, comma-separated "
                              "(a cluster on one machine: one netd serves every node)"),
    Option("cleanup_on_stop", False, "remove the data path when stopping (a local cluster's "
                                     "`down`; on real nodes VMs keep their network while netd restarts)",
           lambda v: str(v).lower() in ("1", "true", "yes", "on")),
    Option("resync_interval", 30.0, "seconds between full reconciles (drift repair)", float),
]

KINDS = ("network", "subnet", "port", "router", "securitygroup")
# net/vtep/<node> -> the node's tunnel IP; not bound to the daemon's lease, so
# a netd restarting (or down) does not cut the other nodes' traffic to its VMs
RELEVANT = tuple(f"{k}/" for k in KINDS) + (keys.spec_prefix("vm"), keys.VTEP)


def default_tunnel_ip() -> str:
    """The address this host would use to reach the outside (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def snapshot(kvs: list[KV]) -> tuple[M.Snapshot, list[str]]:
    """Decode the cached keys; objects that do not decode are skipped (and named)."""
    snap, bad = M.Snapshot(), []
    parts: dict[tuple[str, str], dict[str, KV]] = {}
    for kv in kvs:
        obj = keys.parse_object(kv.key)
        node = keys.node_of(keys.VTEP, kv.key)
        if obj and obj[0] in KINDS + ("vm",):
            parts.setdefault((obj[0], obj[2]), {})[obj[1]] = kv
        elif node:
            addr = bytes(kv.value).decode(errors="replace")
            try:
                socket.inet_aton(addr)
                snap.tunnels[node] = addr
            except OSError:
                bad.append(f"{kv.key}: {addr[:40]!r} is not an IPv4 address")
    targets = {"network": snap.networks, "subnet": snap.subnets, "port": snap.ports,
               "router": snap.routers, "securitygroup": snap.groups, "vm": snap.vms}
    for (kind, name), d in parts.items():
        if "spec" not in d:
            continue
        try:
            obj = K.assemble(K.KINDS[kind], name, d["spec"], d.get("status"))
        except K.CorruptObject as exc:
            bad.append(str(exc))
            continue
        # written by someone else than the API? the API's own checks decide
        errs = validation.validate(kind, obj) if kind != "vm" else []
        if errs:
            bad.append(f"{kind} {name} ignored: {errs[0]}")
            continue
        targets[kind][name] = obj
    return snap, bad


class NetDaemon:
    def __init__(self):
        self.kernel = None
        self.dhcp = None
        self.fw: firewall.Ruleset | None = None
        self._fw_checked = False
        self._passes = 0
        self.applied = 0
        self.message = ""

    def presence_info(self, d, store) -> dict:
        cfg = d.cfg
        if cfg["dataplane"] not in ("kernel", "off"):
            raise ConfigError(f"dataplane: {cfg['dataplane']!r} is not kernel or off")
        self.node = node_name(cfg)
        self.tunnel_ip = cfg["tunnel_ip"] or default_tunnel_ip()
        try:
            socket.inet_aton(self.tunnel_ip)
        except OSError:
            raise ConfigError(f"tunnel_ip: {self.tunnel_ip!r} is not an IPv4 address") from None
        if not 1 <= cfg["tunnel_port"] <= 65535:
            raise ConfigError(f"tunnel_port: {cfg['tunnel_port']} is not a port")
        return {"tunnel_address": self.tunnel_ip if cfg["dataplane"] == "kernel" else "",
                "tunnel_port": cfg["tunnel_port"]}

    def hook(self, d, store, presence):
        self.store, self.presence = store, presence
        self.enabled = d.cfg["dataplane"] == "kernel"
        self.cleanup = d.cfg["cleanup_on_stop"]
        self.also = frozenset(n.strip() for n in d.cfg["serve_nodes"].split(",") if n.strip()) - {self.node}
        if self.enabled:
            from net_daemon.dhcp import DhcpResponder
            from net_daemon.kernel import Kernel
            self.kernel = Kernel(self.node, self.tunnel_ip, d.cfg["tunnel_port"])
            self.dhcp = DhcpResponder()
            self.dhcp.start()
        self.controller = Controller("netd", self.reconcile, workers=1,
                                     resync_period=d.cfg["resync_interval"],
                                     list_keys=lambda: ["node"])
        if self.enabled:
            vtep = store.get(keys.vtep(self.node))
            if vtep is None or bytes(vtep.value).decode(errors="replace") != self.tunnel_ip:
                store.put(keys.vtep(self.node), self.tunnel_ip.encode())
        self.informer = Informer(store, "", self._on_change, name="netd")
        self.informer.start()
        self.informer.synced.wait(30)
        self.controller.start()
        return self.stop

    def _on_change(self, key: str, kv: KV | None) -> None:
        if key.startswith(RELEVANT):
            self.controller.enqueue("node")

    def reconcile(self, key: str) -> Result | None:
        rev = self.informer.revision
        kvs = [kv for k in self.informer.keys() if (kv := self.informer.get(k)) is not None]
        snap, bad = snapshot(kvs)
        state = M.desired(snap, self.node, self.also)
        problems = bad + state.problems
        if self.enabled:
            before = self.kernel.changes
            problems += self.kernel.apply(state)
            fw = "unchanged"
            try:
                if state.ports:
                    fw = self._firewall(firewall.render(snap, state.ports))
                elif self.fw is not None or not self._fw_checked:
                    firewall.remove()   # no port here: no table left behind
                    self.fw, fw = None, "removed"
                self._fw_checked = True
            except (firewall.NftError, OSError) as exc:
                problems.append(str(exc))
            self._dhcp(state)
            changes = self.kernel.changes - before
            if changes or fw != "unchanged" or not self._passes:
                log.info("pass at revision %d: %d kernel changes, firewall %s, %d bridges, "
                         "%d routers, %d local ports", rev, changes, fw, len(state.bridges),
                         len(state.routers), len(state.ports))
            self._passes += 1
        message = "; ".join(problems)[:2000]
        if message != self.message:
            (log.warning if message else log.info)("network state: %s", message or "converged")
        if rev != self.applied or message != self.message:
            self.presence.update(applied_revision=rev, message=message)
            self.applied, self.message = rev, message
        return Result(requeue_after=5.0) if problems else None

    def _firewall(self, rs: firewall.Ruleset) -> str:
        """Apply; returns what it did: full | sets | unchanged."""
        if self.fw is None and firewall.applied_digest() != rs.digest:
            batch = None   # not ours or other rules: the whole table
        else:   # same rules in the kernel (a restart): at most the sets
            batch = rs.set_update(self.fw)
        if batch is None:
            firewall.nft(rs.full_batch())
        elif batch:
            firewall.nft(batch)
        self.fw = rs
        return "full" if batch is None else "sets" if batch else "unchanged"

    def _dhcp(self, state: M.NodeState) -> None:
        from net_daemon.dhcp import Lease
        wanted = {}
        for br in state.bridges.values():
            wanted[br.bridge] = {mac: Lease(**dataclasses.asdict(lease))
                                 for mac, lease in br.dhcp.items()}
        for ifname in set(getattr(self, "_dhcp_ifs", ())) - wanted.keys():
            self.dhcp.set_hosts(ifname, {})
        for ifname, leases in wanted.items():
            self.dhcp.set_hosts(ifname, leases)
        self._dhcp_ifs = set(wanted)

    def stop(self) -> None:
        """The data path stays as it is (VMs keep their network while netd
        restarts), unless --cleanup-on-stop."""
        self.informer.request_stop()
        self.controller.stop()
        self.informer.stop()
        if self.dhcp is not None:
            self.dhcp.stop()
        if self.kernel is not None:
            if self.cleanup:
                log.info("removing this node's data path (--cleanup-on-stop)")
                self.kernel.remove_all()
                firewall.remove()
            self.kernel.close()


def main(argv=None) -> int:
    nd = NetDaemon()
    return run_main("netd", OPTIONS, node_daemon_body("netd", nd.hook,
                                                      presence_info=nd.presence_info), argv)


if __name__ == "__main__":
    raise SystemExit(main())
