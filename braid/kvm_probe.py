"""Does KVM really run guests on this host? Boot a 512-byte guest and see.

/dev/kvm existing (or even opening) proves little: under nested
virtualization KVM may accept a VM and then run it uselessly. On the
reference dev host (a kvm-pvm nested host) SeaBIOS and real-mode code run
under KVM, but ~200 times slower than under TCG, so a Linux kernel needs
40 s just to decompress. So the probe guest prints a marker at each stage
(K: real mode, reached through the BIOS; P: protected mode; L: long mode
with paging) and then does some work (a 16 MiB memset and a 10^8-iteration
loop, ~0.25 s under TCG, a few ms under healthy KVM) before printing W. KVM
is usable iff W arrives within the timeout and the work took at most
WORKLOAD_BUDGET. The same guest under TCG checks the probe itself.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import selectors
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("braid.braid.kvm_probe")

QEMU = "/usr/bin/qemu-system-x86_64"
KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00   # _IO(KVMIO, 0x00): the stable API answers 12
WORKLOAD_BUDGET = 1.0          # seconds for the marked work under KVM
MARKS = "KPLW"
STAGES = {"K": "real mode (the BIOS ran the boot sector)", "P": "protected mode",
          "L": "long mode with paging", "W": "the end of the workload"}


@dataclass(frozen=True)
class ProbeResult:
    usable: bool
    reason: str


# The boot sector, loaded by the BIOS at 0x7c00 (assembled with GNU as, Intel
# syntax; the far jumps and lgdt use absolute addresses, checked below).
_REAL = (  # 16-bit real mode
    ("fa 31 c0 8e d8 8e c0 8e d0", "cli; xor ax,ax; mov ds/es/ss,ax"),
    ("bc 00 7c", "mov sp,0x7c00"),
    ("ba f8 03 b0 4b ee", "mov dx,0x3f8 (COM1); mov al,'K'; out dx,al"),
    ("e4 92 0c 02 e6 92", "in al,0x92; or al,2; out 0x92,al (fast A20)"),
    ("0f 01 16 f8 7c", "lgdt [0x7cf8]"),
    ("0f 20 c0 0c 01 0f 22 c0", "mov eax,cr0; or al,1; mov cr0,eax (PE)"),
    ("ea 2a 7c 08 00", "jmp 0x08:0x7c2a (32-bit code segment)"),
)
_PROTECTED = (  # 32-bit protected mode, at 0x7c2a
    ("66 b8 10 00 8e d8 8e c0 8e d0", "mov ax,0x10; mov ds/es/ss,ax (data segment)"),
    ("66 ba f8 03 b0 50 ee", "mov dx,0x3f8; mov al,'P'; out dx,al"),
    ("bf 00 10 00 00 31 c0 b9 00 0c 00 00 f3 ab", "zero 12 KiB at 0x1000 (rep stosd)"),
    ("c7 05 00 10 00 00 03 20 00 00", "PML4[0] = 0x2000 | present | writable"),
    ("c7 05 00 20 00 00 03 30 00 00", "PDPT[0] = 0x3000 | present | writable"),
    ("bf 00 30 00 00 b8 83 00 00 00 b9 00 02 00 00", "edi = PD, eax = 0x83 (2 MiB page), ecx = 512"),
    ("89 07 05 00 00 20 00 83 c7 08 e2 f4", "1: mov [edi],eax; add eax,2 MiB; add edi,8; loop 1b"),
    ("0f 20 e0 83 c8 20 0f 22 e0", "cr4 |= PAE"),
    ("b8 00 10 00 00 0f 22 d8", "cr3 = 0x1000"),
    ("b9 80 00 00 c0 0f 32 0d 00 01 00 00 0f 30", "EFER |= LME (rdmsr/wrmsr 0xc0000080)"),
    ("0f 20 c0 0d 00 00 00 80 0f 22 c0", "cr0 |= PG"),
    ("ea a9 7c 00 00 18 00", "jmp 0x18:0x7ca9 (64-bit code segment)"),
)
_LONG = (  # 64-bit long mode, at 0x7ca9
    ("66 ba f8 03 b0 4c ee", "mov dx,0x3f8; mov al,'L'; out dx,al"),
    ("bf 00 00 00 01 b9 00 00 20 00 31 c0 f3 48 ab", "zero 16 MiB at 16 MiB (rep stosq)"),
    ("b9 00 e1 f5 05 ff c9 75 fc", "mov ecx,100000000; 2: dec ecx; jnz 2b"),
    ("b0 57 ee b0 0a ee", "mov al,'W'; out dx,al; mov al,'\\n'; out dx,al"),
    ("fa f4 eb fe", "cli; hlt; jmp $"),
)
_GDT_AT = 0xD8  # offset in the sector; the descriptor follows the 4 entries at 0xf8
_GDT = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF)  # null, code32, data, code64


def boot_sector() -> bytes:
    """The 512-byte probe guest (an MBR: ends with 0x55 0xAA)."""
    def code(listing):
        return b"".join(bytes.fromhex(h) for h, _ in listing)
    real, prot, long_ = code(_REAL), code(_PROTECTED), code(_LONG)
    if (len(real), len(real + prot)) != (0x2A, 0xA9) or len(real + prot + long_) > _GDT_AT:
        raise RuntimeError("boot sector layout changed: fix the jump targets")
    gdt = struct.pack("<4Q", *_GDT)
    image = (real + prot + long_).ljust(_GDT_AT, b"\0") + gdt
    image += struct.pack("<HI", len(gdt) - 1, 0x7C00 + _GDT_AT)
    return image.ljust(510, b"\0") + b"\x55\xaa"


def _run(qemu: str, accel: str, timeout: float) -> tuple[dict[str, float], str, int | None]:
    """Boot the probe guest; return (marker -> seconds since start, stderr,
    exit status if qemu exited by itself). qemu is always killed."""
    marks: dict[str, float] = {}
    err = bytearray()
    with tempfile.TemporaryDirectory(prefix="braid-kvm-probe-") as tmp:
        image = os.path.join(tmp, "boot.img")
        with open(image, "wb") as fh:
            fh.write(boot_sector())
        cmd = [qemu, "-accel", accel, "-machine", "pc", "-nodefaults", "-display", "none",
               "-serial", "stdio", "-no-reboot", "-m", "64",
               "-drive", f"file={image},format=raw,if=ide"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                sel.register(proc.stderr, selectors.EVENT_READ)
                while "W" not in marks and sel.get_map():
                    left = start + timeout - time.monotonic()
                    if left <= 0:
                        break
                    for key, _ in sel.select(left):
                        data = os.read(key.fd, 4096)
                        if not data:
                            sel.unregister(key.fileobj)
                        elif key.fileobj is proc.stdout:
                            for ch in data.decode("latin-1"):
                                if len(marks) < len(MARKS) and ch == MARKS[len(marks)]:
                                    marks[ch] = time.monotonic() - start
                        else:
                            err += data
                            del err[:-4000]
                if not sel.get_map():  # both pipes closed: qemu is exiting
                    try:
                        proc.wait(2.0)
                    except subprocess.TimeoutExpired:
                        pass
            exited = proc.poll()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    return marks, err.decode(errors="replace"), exited


def _verdict(name: str, marks: dict[str, float], err: str, exited: int | None,
             timeout: float, budget: float | None) -> ProbeResult:
    if "W" in marks:
        work = marks["W"] - marks["L"]
        timing = f"boot sector after {marks['K']:.2f}s, workload {work:.2f}s"
        if budget is not None and work > budget:
            return ProbeResult(False, f"{name} ran the probe guest, but too slowly to be of use "
                                      f"({timing}; budget {budget}s, TCG needs ~0.25s)")
        return ProbeResult(True, f"{name} ran the probe guest ({timing})")
    if marks:
        last = MARKS[len(marks) - 1]
        where = f"reached {STAGES[last]} after {marks[last]:.2f}s and got no further"
    else:
        where = "never reached the boot sector"
    why = f"within the {timeout}s timeout"
    if exited is not None:  # qemu's last words explain it; on a timeout they are noise
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        why = f"qemu exited with status {exited}" + (f": {lines[-1]}" if lines else "")
    hint = ""
    if name == "KVM" and "L" in marks:
        hint = " (KVM executes guest code but far too slowly: nested virtualization without hardware help?)"
    return ProbeResult(False, f"{name}: the probe guest {where} ({why}){hint}")


def _probe(qemu: str, accel: str, timeout: float, budget: float | None) -> ProbeResult:
    name = "KVM" if accel == "kvm" else "TCG"
    if not os.access(qemu, os.X_OK):
        return ProbeResult(False, f"{name}: {qemu} is not an executable")
    try:
        marks, err, exited = _run(qemu, accel, timeout)
    except OSError as exc:
        return ProbeResult(False, f"{name}: cannot run {qemu}: {exc}")
    return _verdict(name, marks, err, exited, timeout, budget)


def _kvm_device_problem() -> str | None:
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{KVM_DEVICE} is missing (no kvm module or no hardware virtualization)"
    except OSError as exc:
        return f"cannot open {KVM_DEVICE}: {exc.strerror} (root or the kvm group is needed)"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{KVM_DEVICE} does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    return None if version == 12 else f"{KVM_DEVICE} speaks KVM API version {version}, not 12"


def probe_kvm(qemu: str = QEMU, timeout: float = 5.0) -> ProbeResult:
    """Whether guests run usefully under KVM here (takes up to ``timeout``)."""
    problem = _kvm_device_problem()
    if problem:
        return ProbeResult(False, problem)
    return _probe(qemu, "kvm", timeout, WORKLOAD_BUDGET)


def probe_tcg(qemu: str = QEMU, timeout: float = 5.0) -> ProbeResult:
    """The same guest under TCG: checks qemu, the firmware and the probe itself."""
    return _probe(qemu, "tcg", timeout, None)


_lock = threading.Lock()
_kind: str | None = None
_last: ProbeResult | None = None

CACHE = "/run/braid/hypervisor.json"


def _cache_key(qemu: str) -> str:
    try:
        qemu_id = os.stat(qemu).st_mtime_ns
    except OSError:
        qemu_id = 0
    return f"{os.uname().release}:{qemu_id}:{os.path.exists('/dev/kvm')}"


def hypervisor_kind(refresh: bool = False, qemu: str = QEMU) -> str:
    """libvirt domain type for this host: "kvm" when KVM runs guests properly,
    else "qemu" (TCG). The probe boots a tiny guest (~5 s when KVM is
    unusable), so its verdict is kept in /run (cleared at boot) per kernel
    and qemu binary, and in the process."""
    global _kind, _last
    with _lock:
        if _kind is not None and not refresh:
            return _kind
        key = _cache_key(qemu)
        if not refresh:
            try:
                with open(CACHE) as f:
                    cached = json.load(f)
                if cached.get("key") == key and cached.get("kind") in ("kvm", "qemu"):
                    _kind = cached["kind"]
                    _last = ProbeResult(_kind == "kvm", cached.get("reason", "") + " (cached)")
                    return _kind
            except (OSError, ValueError):
                pass
        _last = probe_kvm(qemu)
        _kind = "kvm" if _last.usable else "qemu"
        if _last.usable:
            log.info("hypervisor: kvm (%s)", _last.reason)
        else:
            log.warning("hypervisor: qemu (TCG), KVM is not usable: %s", _last.reason)
            tcg = probe_tcg(qemu)
            if not tcg.usable:
                log.error("qemu cannot run a guest under TCG either: %s", tcg.reason)
        try:
            os.makedirs(os.path.dirname(CACHE), exist_ok=True)
            tmp = f"{CACHE}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"key": key, "kind": _kind, "reason": _last.reason}, f)
            os.replace(tmp, CACHE)
        except OSError as exc:
            log.warning("cannot cache the hypervisor probe in %s: %s", CACHE, exc)
        return _kind


def last_probe() -> ProbeResult | None:
    """The KVM probe behind hypervisor_kind() (None before the first call)."""
    return _last
