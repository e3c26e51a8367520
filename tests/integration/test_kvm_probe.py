"""braid.kvm_probe against the real qemu of this machine.

TCG must run the probe guest (that checks the probe itself); whether KVM is
usable differs between machines, so that result is only printed (``-s``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from braid import kvm_probe as P

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.access(P.QEMU, os.X_OK), reason=f"{P.QEMU} is not installed"),
]


def _probe_processes() -> list[str]:
    """Command lines of processes still running a probe image."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "braid-kvm-probe-" in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def test_boot_sector_is_an_mbr():
    image = P.boot_sector()
    assert len(image) == 512 and image[-2:] == b"\x55\xaa"
    assert b"\xb0K\xee" in image  # mov al,'K'; out dx,al
    assert P.boot_sector() == image


def test_tcg_runs_the_probe_guest():
    started = time.monotonic()
    result = P.probe_tcg()
    print(f"\nprobe_tcg: {result} ({time.monotonic() - started:.2f}s)")
    assert result.usable, result.reason
    assert "TCG ran the probe guest" in result.reason
    assert not _probe_processes()


def test_kvm_probe_answers_within_its_timeout():
    timeout = 5.0
    started = time.monotonic()
    result = P.probe_kvm(timeout=timeout)
    elapsed = time.monotonic() - started
    print(f"\nprobe_kvm: usable={result.usable} reason={result.reason!r} ({elapsed:.2f}s)")
    assert isinstance(result.usable, bool) and result.reason
    assert elapsed < timeout + 2.0
    assert not _probe_processes()


def test_a_missing_or_failing_qemu_is_not_usable(tmp_path):
    assert not P.probe_tcg(qemu=str(tmp_path / "no-qemu")).usable
    failing = tmp_path / "qemu"
    failing.write_text("#!/bin/sh\necho 'qemu: -accel tcg: something broke' >&2\nexit 3\n")
    failing.chmod(0o755)
    result = P.probe_tcg(qemu=str(failing))
    assert not result.usable
    assert "exited with status 3" in result.reason and "something broke" in result.reason


def test_a_slow_guest_is_not_usable():
    slow = P._verdict("KVM", {"K": 1.3, "P": 1.3, "L": 1.3, "W": 51.3}, "", None, 60.0, 1.0)
    assert not slow.usable and "too slowly" in slow.reason
    stalled = P._verdict("KVM", {"K": 1.3, "P": 1.3, "L": 1.3}, "", None, 5.0, 1.0)
    assert not stalled.usable and "long mode" in stalled.reason
    fast = P._verdict("KVM", {"K": 0.1, "P": 0.1, "L": 0.1, "W": 0.15}, "", None, 5.0, 1.0)
    assert fast.usable


def test_hypervisor_kind_is_cached(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(P, "CACHE", str(tmp_path / "hypervisor.json"))

    def fake_kvm(*args, **kwargs):
        calls.append(1)
        return P.ProbeResult(len(calls) > 1, "fake")

    monkeypatch.setattr(P, "probe_kvm", fake_kvm)
    monkeypatch.setattr(P, "probe_tcg", lambda *a, **k: P.ProbeResult(True, "fake"))
    monkeypatch.setattr(P, "_kind", None)
    monkeypatch.setattr(P, "_last", None)
    assert P.hypervisor_kind() == "qemu"
    assert P.hypervisor_kind() == "qemu" and len(calls) == 1
    assert P.last_probe() == P.ProbeResult(False, "fake")
    # another process (fresh module state) reuses the verdict from the file
    monkeypatch.setattr(P, "_kind", None)
    assert P.hypervisor_kind() == "qemu" and len(calls) == 1
    assert "cached" in P.last_probe().reason
    assert P.hypervisor_kind(refresh=True) == "kvm" and len(calls) == 2
    monkeypatch.setattr(P, "_kind", None)
    assert P.hypervisor_kind() == "kvm" and len(calls) == 2
