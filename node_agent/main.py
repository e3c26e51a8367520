"""braid-node-agent: registers the node (capacity, addresses) and keeps the
node's lease; the node is Ready exactly while that lease lives.

VM lifecycle through libvirt arrives with the compute issue.
"""

from __future__ import annotations

import datetime as dt
import logging

from braid import hostinfo
from braid.kinds import to_json
from braid.nodedaemon import NODE_OPTIONS, node_daemon_body
from braid.service import Option, run_main
from braid.v1 import node_pb2

log = logging.getLogger("braid.node_agent")

OPTIONS = NODE_OPTIONS + [
    Option("capacity_cpus", 0, "CPUs to offer (0: detect)", int),
    Option("capacity_memory_mib", 0, "memory to offer in MiB (0: detect)", int),
    Option("reserved_cpus", 0, "CPUs kept for the platform itself", int),
    Option("reserved_memory_mib", 1024, "memory kept for the platform itself (MiB)", int),
]


def node_status(cfg) -> node_pb2.NodeStatus:
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
        numa_cells=hostinfo.numa_cells(),
        kernel=hostinfo.kernel(),
        registered_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def hook(d, store, presence):
    status = node_status(d.cfg)
    # the status record outlives the lease: a dead node still shows, NotReady
    store.put(f"node/status/{presence.node}", to_json(status))
    log.info("node %s registered: %d cpus, %d MiB", presence.node, status.capacity.cpus,
             status.capacity.memory_bytes >> 20)
    return None


def main(argv=None) -> int:
    return run_main("node-agent", OPTIONS, node_daemon_body("node-agent", hook), argv)


if __name__ == "__main__":
    raise SystemExit(main())
