"""braid-netd: (network issue) builds the node's bridges, VXLAN, router and firewall.

In this release it registers under its lease (node/live/<node>/netd) and
serves health, reflection and metrics; the data path arrives with its issue.
"""

from __future__ import annotations

from braid.nodedaemon import NODE_OPTIONS, node_daemon_body
from braid.service import run_main


def main(argv=None) -> int:
    return run_main("netd", NODE_OPTIONS, node_daemon_body("netd"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
