"""braid-storaged: owns the node's disks and (storage issue) serves replicated volumes over NBD.

In this release it registers under its lease (node/live/<node>/storaged) and
serves health, reflection and metrics; the data path arrives with its issue.
"""

from __future__ import annotations

from braid.nodedaemon import NODE_OPTIONS, node_daemon_body
from braid.service import run_main


def main(argv=None) -> int:
    return run_main("storaged", NODE_OPTIONS, node_daemon_body("storaged"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
