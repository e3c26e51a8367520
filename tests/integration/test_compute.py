"""Compute end to end with real parts: etcd, controller, node agent, libvirtd
and QEMU (TCG) booting the tiny guest, driven through the CLI and the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from braid.cli.manifests import load
from braid.client import ApiCallError, Client
from braid.dev import devguest
from braid.dev.libvirtd import ensure_libvirtd, system_libvirtd_pid
from braid.dev.localcluster import LocalCluster
from braid.v1 import compute_pb2
from tests.conftest import wait

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TTL = 3


def braid(data_dir, *args, check=True, timeout=120):
    env = {**os.environ, "BRAID_DATA_DIR": str(data_dir)}
    out = subprocess.run([sys.executable, "-m", "braid.cli.main", *args], capture_output=True,
                         text=True, env=env, timeout=timeout, cwd=str(ROOT))
    if check and out.returncode != 0:
        raise AssertionError(f"braid {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def domains(prefix="braid-"):
    conn = libvirt.open("qemu:///system")
    out = {}
    try:
        for d in conn.listAllDomains():
            try:
                if d.name().startswith(prefix):
                    out[d.name()] = bool(d.isActive())
            except libvirt.libvirtError:
                continue  # undefined between the listing and the question
        return out
    finally:
        conn.close()


def live_disks(domain: str) -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "domblklist", domain],
                         capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines()[2:] if line.strip()]


def console(c: Client, name: str) -> str:
    path = c.get("vm", name).status.console_path
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_libvirtd()
    guest = devguest.build_guest(devguest.default_guest_dir(), progress=lambda s: None)
    data = tmp_path_factory.mktemp("compute") / "cluster"
    lc = LocalCluster(data)
    state = lc.up(nodes=1, lease_ttl=TTL, libvirt_uri="qemu:///system")
    c = Client(state["api"], tls=lc.user_tls())
    try:
        yield lc, c, data, guest
    finally:
        c.close()
        lc.down()


def tiny(name: str, guest) -> compute_pb2.VM:
    vm = load(str(ROOT / "examples" / "tiny-vm.yaml"))[0].obj
    vm.metadata.name = name
    vm.spec.boot.kernel, vm.spec.boot.initrd = str(guest.kernel), str(guest.initrd)
    return vm


E2E = f"e2e-{uuid.uuid4().hex[:6]}"  # unique: a leftover of an aborted run cannot collide
DOM = f"braid-{E2E}"


def test_vm_lifecycle_through_the_whole_stack(cluster, tmp_path):
    lc, c, data, guest = cluster
    manifest = tmp_path / "vm.yaml"
    manifest.write_text(
        (ROOT / "examples" / "tiny-vm.yaml").read_text().replace("name: tiny", f"name: {E2E}"))
    t0 = time.monotonic()
    braid(data, "apply", "-f", str(manifest))
    wait(lambda: devguest.READY_LINE in console(c, E2E), 60, "the guest's ready marker")
    boot = time.monotonic() - t0
    print(f"apply -> guest ready: {boot:.1f}s")
    got = c.get("vm", E2E)
    assert got.status.phase == "Running" and got.status.node == "node1"
    assert got.status.power_state == compute_pb2.RUNNING
    assert domains(DOM) == {DOM: True}
    # the node reports what runs on it (refreshed every 5 s)
    wait(lambda: c.get("node", "node1").status.allocated.cpus >= 1, 15, "node usage reported")
    logs = braid(data, "vm", "logs", E2E).stdout
    assert devguest.READY_LINE in logs and "braid-guest: cpus 1" in logs

    # hot add: the guest onlines the new vCPU and says so
    vm = c.get("vm", E2E)
    vm.spec.vcpus = 2
    vm.ClearField("status")
    c.update(vm)
    wait(lambda: "braid-guest: cpus 2" in console(c, E2E), 60, "the guest to see 2 vCPUs")

    # hot-plug a disk, then unplug it again (the live definition follows the spec)
    scratch = Path("/var/lib/braid/scratch")  # QEMU (user libvirt-qemu) must reach it
    scratch.mkdir(parents=True, exist_ok=True)
    scratch.chmod(0o755)
    disk = scratch / f"{E2E}.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "16M"], check=True)
    vm = c.get("vm", E2E)
    vm.spec.disks.add(name="vdb", path=str(disk))
    vm.ClearField("status")
    c.update(vm)
    wait(lambda: "vdb" in live_disks(DOM), 30, "vdb in the running domain")
    vm = c.get("vm", E2E)
    del vm.spec.disks[:]
    vm.ClearField("status")
    c.update(vm)
    wait(lambda: "vdb" not in live_disks(DOM), 60, "vdb unplugged")
    assert c.get("vm", E2E).status.phase == "Running"
    disk.unlink()

    # ACPI stop (the guest's acpid powers it off), start, pause, resume
    braid(data, "vm", "stop", E2E, "--wait", "60")
    assert domains(DOM) == {DOM: False}
    assert "braid-guest: power button" in console(c, E2E)
    braid(data, "vm", "start", E2E, "--wait", "60")
    braid(data, "vm", "pause", E2E, "--wait", "30")
    assert c.get("vm", E2E).status.power_state == compute_pb2.PAUSED
    braid(data, "vm", "resume", E2E, "--wait", "30")

    braid(data, "delete", "vm", E2E)
    wait(lambda: DOM not in domains(), 30, "the domain to be undefined")
    assert not any(p for p in os.listdir("/proc") if p.isdigit()
                   and f"guest={DOM}" in _cmdline(p)), "a QEMU of the VM is left"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _agent(lc) -> dict:
    return next(p for p in lc.state()["processes"] if p["name"] == "node-agent@node1")


def _restart_agent(lc, proc: dict) -> None:
    """Start the node agent again with the command line cluster up used."""
    with open(proc["log"], "ab") as f:
        p = subprocess.Popen(proc["cmd"], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    st = lc.state()
    for q in st["processes"]:
        if q["name"] == proc["name"]:
            q["pid"] = p.pid
    lc._save(st)


def test_guest_writes_to_a_braid_volume_through_nbd(cluster):
    """QEMU's disk is a Braid volume served by the node's storage daemon over
    its NBD unix socket: the guest writes a boot counter to the first sector,
    and the next boot reads it back (the data lives in Braid's extent store)."""
    lc, c, data, guest = cluster
    from braid.v1 import storage_pb2
    name = f"diskvm-{uuid.uuid4().hex[:6]}"  # a leftover of an aborted run cannot collide
    vol = storage_pb2.Volume()
    vol.metadata.name = "bootvol"
    vol.spec.size_bytes, vol.spec.replicas = 64 << 20, 1   # one node here: one replica
    c.create(vol)
    wait(lambda: c.get("volume", "bootvol").status.phase == "Healthy", 30, "volume placed")
    vm = tiny(name, guest)
    vm.spec.disks.add(name="vda", volume="bootvol")
    c.create(vm)
    wait(lambda: devguest.READY_LINE in console(c, name), 90, "guest ready")
    text = console(c, name)
    assert "braid-guest: disk boot 1" in text and "braid-guest: disk ok" in text, text[-2000:]
    xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", f"braid-{name}"],
                         capture_output=True, text=True).stdout
    assert "protocol='nbd'" in xml and "/run/braid/node1/nbd/bootvol.sock" in xml
    braid(data, "vm", "stop", name, "--wait", "60")
    braid(data, "vm", "start", name, "--wait", "60")
    wait(lambda: "braid-guest: disk boot 2" in console(c, name), 90, "second boot reads the counter")
    wait(lambda: "braid-guest: disk ok" in console(c, name).split("disk boot 2", 1)[1], 30,
         "the second boot's write verified")
    wait(lambda: c.get("volume", "bootvol").status.allocated_bytes > 0, 15, "allocation reported")
    c.delete("vm", name)
    wait(lambda: f"braid-{name}" not in domains(f"braid-{name}"), 60, "domain removed")
    c.delete("volume", "bootvol")


def test_vm_survives_agent_and_libvirtd_restarts(cluster):
    lc, c, data, guest = cluster
    c.create(tiny("survivor", guest))
    wait(lambda: devguest.READY_LINE in console(c, "survivor"), 60, "guest ready")
    qemu = [p for p in os.listdir("/proc") if p.isdigit() and "guest=braid-survivor" in _cmdline(p)]
    assert len(qemu) == 1

    agent = _agent(lc)
    os.kill(agent["pid"], signal.SIGKILL)
    time.sleep(1)
    _restart_agent(lc, agent)
    # libvirtd restarts too (its guests keep running; the agent reconnects)
    pid = system_libvirtd_pid()
    assert pid
    os.kill(pid, signal.SIGTERM)
    wait(lambda: not Path(f"/proc/{pid}").exists(), 20, "libvirtd to exit")
    ensure_libvirtd()
    # the VM converges on the restarted agent: status refreshed, one domain, same QEMU
    vm = c.get("vm", "survivor")
    vm.spec.vcpus = 2
    vm.ClearField("status")
    c.update(vm)
    wait(lambda: "braid-guest: cpus 2" in console(c, "survivor"), 90,
         "the restarted agent to hot-add a vCPU")
    assert domains("braid-survivor") == {"braid-survivor": True}
    again = [p for p in os.listdir("/proc") if p.isdigit() and "guest=braid-survivor" in _cmdline(p)]
    assert again == qemu, "the guest was restarted or duplicated"
    st = c.get("vm", "survivor").status
    assert st.phase == "Running" and st.observed_generation == c.get("vm", "survivor").metadata.generation
    c.delete("vm", "survivor")
    wait(lambda: "braid-survivor" not in domains(), 30, "the domain to be undefined")


def test_self_fencing_when_etcd_is_unreachable(cluster):
    """Freeze etcd beyond the lease TTL: the agent powers its VMs off; when
    etcd is back it registers again and the VM runs again."""
    lc, c, data, guest = cluster
    c.create(tiny("fenced", guest))
    wait(lambda: devguest.READY_LINE in console(c, "fenced"), 60, "guest ready")
    etcd_pid = next(p["pid"] for p in lc.state()["processes"] if p["name"] == "etcd")
    os.kill(etcd_pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait(lambda: domains("braid-fenced") == {"braid-fenced": False}, 4 * TTL,
             "the agent to power off its VM")
        fenced_after = time.monotonic() - t0
        print(f"self-fenced {fenced_after:.1f}s after etcd froze (TTL {TTL}s)")
        assert fenced_after >= TTL - 1.0  # not before the lease could have expired
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
    wait(lambda: domains("braid-fenced") == {"braid-fenced": True}, 60, "the VM to run again")
    wait(lambda: c.get("vm", "fenced").status.phase == "Running", 30, "status Running")
    c.delete("vm", "fenced")
    wait(lambda: "braid-fenced" not in domains(), 30, "the domain to be undefined")


def test_impossible_specs_are_refused_and_libvirt_errors_show(cluster):
    lc, c, data, guest = cluster
    vm = tiny("too-big", guest)
    vm.spec.memory_mib = vm.spec.max_memory_mib = 1 << 20  # 1 TiB: valid, but no node has it
    with pytest.raises(ApiCallError) as e:
        c.create(vm)
    assert e.value.code.name == "FAILED_PRECONDITION"
    assert any(f == "spec.max_memory_mib" for f, _ in e.value.violations)
    vm = tiny("nowhere", guest)
    vm.spec.node = "node9"
    with pytest.raises(ApiCallError) as e:
        c.create(vm)
    assert e.value.code.name == "FAILED_PRECONDITION" and "node9" in e.value.message
    vm = tiny("zero", guest)
    vm.spec.vcpus = 0
    with pytest.raises(ApiCallError) as e:
        c.create(vm)
    assert e.value.code.name == "INVALID_ARGUMENT"

    # a disk file that does not exist: libvirt refuses to start, status says why
    vm = tiny("nodisk", guest)
    vm.spec.disks.add(name="vda", path="/nonexistent/disk.img")
    c.create(vm)
    st = wait(lambda: (lambda s: s if s.phase == "Failed" else None)(c.get("vm", "nodisk").status),
              60, "status Failed")
    assert "/nonexistent/disk.img" in st.message
    agent = _agent(lc)
    assert Path(f"/proc/{agent['pid']}").exists(), "the node agent died"
    c.delete("vm", "nodisk")
    wait(lambda: "braid-nodisk" not in domains(), 30, "the domain to be undefined")
    # the agent still works after the failure
    assert json.loads(braid(data, "get", "nodes", "-o", "json").stdout)["items"][0][
        "status"]["phase"] == "Ready"
