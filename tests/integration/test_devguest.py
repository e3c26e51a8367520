"""`braid dev guest`: build the tiny guest from Debian packages, boot it with
plain QEMU (TCG, user networking: its DHCP stays inside QEMU) and read its
serial console; hot-plug a CPU and memory, press the ACPI power button."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from braid.dev import devguest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (scripts/setup.sh)")


@pytest.fixture(scope="session")
def guest(tmp_path_factory) -> devguest.GuestPaths:
    """Built once per session, from scratch, into a temporary directory."""
    out = tmp_path_factory.mktemp("guest")
    t0 = time.monotonic()
    paths = devguest.build_guest(out, progress=lambda s: print(f"build_guest: {s}"))
    info = json.loads((out / "guest.json").read_text())
    print(f"guest built in {time.monotonic() - t0:.1f}s: kernel {info['kernel_version']}, "
          f"initrd {paths.initrd.stat().st_size >> 10} KiB")
    return paths


class Qemu:
    """qemu-system-x86_64 with the guest; console lines are collected with
    their arrival time, and QMP (a unix socket) drives hot-plug and power."""

    def __init__(self, guest: devguest.GuestPaths, tmp: Path, *extra: str, memory: str = "128"):
        self.qmp_path = tmp / "qmp.sock"
        self.lines: list[tuple[float, str]] = []
        self.eof = False
        self.cond = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-m", memory, "-nodefaults", "-nographic", "-serial", "stdio",
             "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
             "-append", devguest.guest_cmdline(), "-smp", "1,maxcpus=2",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self.cond:
                self.lines.append((time.monotonic() - self.t0, line))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> float:
        """Seconds since start when a console line matching *pattern* appeared."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines:
                    if re.search(pattern, line):
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(f"{pattern!r} not on the console in {timeout}s "
                                         f"(qemu exit {self.proc.poll()}):\n{self.console()}")
                self.cond.wait(min(left, 0.5))

    def console(self) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines)

    def qmp(self, command: str, **arguments) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while "event" in (reply := json.loads(f.readline())) or "QMP" in reply:
                    pass
                if "error" in reply:
                    raise AssertionError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def boot(guest, tmp_path):
    vms: list[Qemu] = []

    def start(*extra: str, memory: str = "128") -> Qemu:
        vms.append(Qemu(guest, tmp_path, *extra, memory=memory))
        return vms[-1]

    yield start
    for vm in vms:
        vm.kill()


def test_build_is_idempotent(guest):
    before = (guest.kernel.stat().st_mtime_ns, guest.initrd.stat().st_mtime_ns)
    said: list[str] = []
    again = devguest.build_guest(guest.kernel.parent, progress=said.append)
    assert again == guest and any("up to date" in s for s in said)
    assert (guest.kernel.stat().st_mtime_ns, guest.initrd.stat().st_mtime_ns) == before
    # the CLI on the same directory is a no-op too, and says where the files are
    r = subprocess.run([sys.executable, "-m", "braid.cli.main", "dev", "guest", "--out",
                        str(guest.kernel.parent)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert str(guest.kernel) in r.stdout and str(guest.initrd) in r.stdout
    # a damaged initrd is noticed and rebuilt
    guest.initrd.write_bytes(b"garbage")
    devguest.build_guest(guest.kernel.parent, progress=said.append)
    assert guest.initrd.read_bytes()[:2] == b"\x1f\x8b"


def test_example_manifest_boots_this_guest():
    from braid.cli.manifests import load
    vm = load(str(ROOT / "examples" / "tiny-vm.yaml"))[0].obj
    assert vm.spec.boot.kernel == str(devguest.DEFAULT_GUEST_DIR / "vmlinuz")
    assert vm.spec.boot.initrd == str(devguest.DEFAULT_GUEST_DIR / "initrd.img")
    assert vm.spec.boot.cmdline == devguest.guest_cmdline()


@needs_qemu
def test_boots_with_disk_and_dhcp(boot, tmp_path):
    disk = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "16M"], check=True)
    vm = boot("-drive", f"file={disk},if=virtio,format=raw",
              "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0")
    ready = vm.wait_for(devguest.READY_LINE, 60)
    print(f"boot time to {devguest.READY_LINE!r}: {ready:.1f}s (TCG)")
    for line in ("braid-guest: disk boot 1", "braid-guest: disk ok", "braid-guest: ip 10.0.2.15",
                 "braid-guest: cpus 1"):
        vm.wait_for(f"{re.escape(line)}$", 1)
    assert not re.search(r"braid-guest: .*(error|failed|no ACPI)", vm.console()), vm.console()
    vm.kill()
    assert disk.read_bytes()[:21] == b"braid-guest-marker 1 "  # the marker reached the disk


@needs_qemu
def test_hotplug_and_power_button(boot):
    # maxmem as libvirt's <maxMemory> gives it: a 128 MiB guest must still boot
    vm = boot(memory="128,slots=2,maxmem=256M")
    vm.wait_for(devguest.READY_LINE, 60)
    cpu = next(c for c in vm.qmp("query-hotpluggable-cpus") if "qom-path" not in c)
    vm.qmp("device_add", driver=cpu["type"], id="cpu1", **cpu["props"])
    vm.wait_for("braid-guest: cpus 2$", 20)
    vm.qmp("object-add", **{"qom-type": "memory-backend-ram", "id": "m1", "size": 128 << 20})
    vm.qmp("device_add", driver="pc-dimm", id="dimm1", memdev="m1")
    t = vm.wait_for(r"braid-guest: mem 2\d\d$", 20)  # 128 + 128 MiB, less the kernel's share
    print(f"memory hot-added and onlined by {t:.1f}s")
    vm.qmp("system_powerdown")
    vm.wait_for("braid-guest: power button", 20)
    vm.proc.wait(30)  # the guest powered itself off: QEMU exits
    assert vm.proc.returncode == 0
