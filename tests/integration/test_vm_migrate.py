"""`braid vm migrate` through the whole stack: a controller, two node agents
(real processes), each driving its own libvirtd isolated in its own network
and mount namespaces (tests/integration/libvirt_pair.py). The source agent
live-migrates peer-to-peer; the target agent takes the VM over."""

from __future__ import annotations

import time

import pytest

from braid.cli import vm as vm_cli
from braid.cli.manifests import load
from braid.client import ApiCallError
from braid.dev import devguest
from tests.conftest import ROOT, DaemonProc, wait
from tests.integration.libvirt_pair import CONSOLE_DIR, libvirt_pair  # noqa: F401
from tests.integration.libvirt_pair import domain_states as names
from tests.integration.libvirt_pair import read_text as text

pytestmark = pytest.mark.integration


def test_live_migration_and_cancel(libvirt_pair, etcd_server, prefix, controller, api,  # noqa: F811
                                   tmp_path):
    a, b = libvirt_pair
    guest = devguest.build_guest(devguest.default_guest_dir(), progress=lambda s: None)
    agents = []
    for node, name, extra in ((a, "lva", []), (b, "lvb", ["--migration-bandwidth", "1"])):
        (node.dirs["log"] / "console" / name).mkdir(parents=True, exist_ok=True)
        agents.append(DaemonProc("node_agent.main", [
            "--etcd", etcd_server.endpoint, "--prefix", prefix, "--node", name,
            "--lease-ttl", "3", "--libvirt-uri", node.uri, "--migration-uri", node.tcp_uri,
            "--console-dir", CONSOLE_DIR, *extra], tmp_path, f"agent-{name}"))
    try:
        wait(lambda: sum(n.status.phase == "Ready" for n in api.list("node")[0]) == 2, 20,
             "two Ready nodes")
        vm = load(str(ROOT / "examples" / "tiny-vm.yaml"))[0].obj
        vm.metadata.name = "mover"
        vm.spec.node = "lva"
        vm.spec.boot.kernel, vm.spec.boot.initrd = str(guest.kernel), str(guest.initrd)
        # 32 MiB of random data in guest RAM, 4 MiB of it rewritten every second: the
        # 1 MiB/s migration back below never converges, so the cancel lands mid-copy
        # (the uncapped first migration converges at once)
        vm.spec.boot.cmdline += " braid.fill=32 braid.dirty=4"
        api.create(vm)
        log_a = a.dirs["log"] / "console" / "lva" / "mover.log"
        log_b = b.dirs["log"] / "console" / "lvb" / "mover.log"
        wait(lambda: devguest.READY_LINE in text(log_a), 60, "the guest to boot on lva")
        assert "braid-guest: dirtying 4 MiB/s" in text(log_a)

        # live migration a -> b, through the CLI's code path
        t0 = time.monotonic()
        vm_cli.migrate(api, "mover", "lvb", False, 60)
        took = time.monotonic() - t0
        st = wait(lambda: (lambda s: s if s.migration.phase == "Completed" else None)(
            api.get("vm", "mover").status), 10, "the migration to be recorded Completed")
        print(f"migrate lva -> lvb: {took:.2f}s, downtime {st.migration.downtime_ms} ms")
        assert st.node == "lvb" and st.phase == "Running" and st.migration.target_node == "lvb"
        assert names(b) == {"braid-mover": True} and "braid-mover" not in names(a)
        assert len(b.qemu_pids()) == 1 and a.qemu_pids() == []
        # the guest was not rebooted: it keeps running and answers a hot-add on b
        assert devguest.READY_LINE not in text(log_b)
        cur = api.get("vm", "mover")
        cur.spec.vcpus = 2
        cur.ClearField("status")
        api.update(cur)
        wait(lambda: "braid-guest: cpus 2" in text(log_b), 60, "the guest to see 2 vCPUs on lvb")

        # cancel: b's agent migrates at 1 MiB/s, so there is time to call it off
        vm_cli.migrate(api, "mover", "lva", False, 0)
        wait(lambda: api.get("vm", "mover").status.migration.phase == "Running"
             and api.get("vm", "mover").status.migration.target_node == "lva", 20,
             "the migration back to start")
        vm_cli.migrate(api, "mover", None, True, 0)
        st = wait(lambda: (lambda s: s if s.migration.phase == "Cancelled" else None)(
            api.get("vm", "mover").status), 30, "the migration to be cancelled")
        assert "cancel" in st.migration.message.lower()
        wait(lambda: api.get("vm", "mover").status.phase == "Running", 20, "Running on lvb")
        assert api.get("vm", "mover").status.node == "lvb"
        assert names(b) == {"braid-mover": True} and "braid-mover" not in names(a)

        # a move to a node that is not Ready is refused up front
        with pytest.raises(ApiCallError) as e:
            vm_cli.migrate(api, "mover", "nonode", False, 0)
        assert e.value.code.name == "FAILED_PRECONDITION"

        api.delete("vm", "mover")
        wait(lambda: names(b) == {}, 30, "the domain to be removed from lvb")
    finally:
        for agent in agents:
            agent.stop()
