"""Start Debian's libvirtd (and virtlogd, which writes VM console logs)
without systemd, as the local cluster and the tests need them.

On real nodes systemd runs them (libvirtd.service); this is for machines
where nothing started them yet. Idempotent.

Where /dev/kvm exists but KVM does not really run guests (nested KVM here:
see braid.kvm_probe), libvirtd re-probes QEMU's capabilities with KVM on
every call that needs them (~40 s each: a domain define never seems to
finish). So when the probe says KVM is unusable, libvirtd runs in a private
mount namespace where /dev/kvm is a char device nobody may open (mode 000):
it sees no usable KVM and uses TCG. (/dev/null would not do: libvirt only
checks that /dev/kvm is accessible, finds it is, and then throws its
KVM-less capability cache away on every lookup.)
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time

from braid import kvm_probe

SOCKET = "/var/run/libvirt/libvirt-sock"


class LibvirtdError(RuntimeError):
    pass


PID_FILES = {"libvirtd": "/var/run/libvirtd.pid", "virtlogd": "/var/run/virtlogd.pid"}


def _pid(name: str) -> int | None:
    """The pid of the system's (not zombie) daemon of that name, from its pid
    file: other libvirtds (e.g. tests' own, in namespaces) do not count."""
    try:
        with open(PID_FILES[name]) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (OSError, ValueError):
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state = stat.rsplit(")", 1)[1].split()[0]
    return pid if comm == name and state != "Z" else None


def _nokvm_device(path: str = "/run/braid/nokvm") -> str:
    """A char device (the null device's numbers) with mode 000."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        st = os.stat(path)
        if stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0:
            return path
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mknod(path, stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(path, 0)
    return path


def system_libvirtd_pid() -> int | None:
    return _pid("libvirtd")


def _running(name: str) -> bool:
    return _pid(name) is not None


def _sees_kvm(pid: int) -> bool:
    """Whether the process sees the real /dev/kvm (a char device 10:232)."""
    try:
        st = os.stat(f"/proc/{pid}/root/dev/kvm")
    except OSError:
        return False
    return os.major(st.st_rdev) == 10 and os.minor(st.st_rdev) == 232


def ensure_libvirtd(timeout: float = 20.0) -> None:
    if shutil.which("libvirtd") is None:
        raise LibvirtdError("libvirtd is not installed (make setup installs libvirt-daemon-system)")
    try:
        pwd.getpwnam("libvirt-qemu")
        grp.getgrnam("kvm")
    except KeyError:
        raise LibvirtdError("user libvirt-qemu / group kvm missing: reinstall "
                            "libvirt-daemon-system (its postinst creates them)") from None
    if os.geteuid() != 0:
        if _running("libvirtd"):
            return
        raise LibvirtdError("libvirtd is not running and starting it needs root")
    for d in ("/var/run/libvirt", "/var/log/libvirt", "/var/lib/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)
    if not _running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
    hide_kvm = os.path.exists("/dev/kvm") and kvm_probe.hypervisor_kind() != "kvm"
    pid = _pid("libvirtd")
    if pid and hide_kvm and _sees_kvm(pid):
        # started by someone else with the broken /dev/kvm visible: restart it
        # (running domains survive a libvirtd restart)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _running("libvirtd") and time.monotonic() < deadline:
            time.sleep(0.1)
        if _running("libvirtd"):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        pid = None
    if not pid:
        if hide_kvm:
            nokvm = _nokvm_device()
            subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount --bind {nokvm} /dev/kvm && exec libvirtd -d"], check=True)
        else:
            subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True)
        if out.returncode == 0:
            return
        time.sleep(0.2)
    raise LibvirtdError(f"libvirtd did not answer within {timeout:.0f}s (see /var/log/libvirt)")


if __name__ == "__main__":
    ensure_libvirtd()
    print("libvirtd and virtlogd are running")
