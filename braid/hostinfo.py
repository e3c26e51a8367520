"""Facts about this host, read from /proc and the kernel (no etcd here)."""

from __future__ import annotations

import os
import platform
import socket


def cpus() -> int:
    return os.cpu_count() or 1


def memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def numa_cells() -> int:
    try:
        return sum(1 for n in os.listdir("/sys/devices/system/node") if n.startswith("node")
                   and n[4:].isdigit()) or 1
    except OSError:
        return 1


def kernel() -> str:
    return platform.release()


def addresses() -> list[str]:
    """Non-loopback IPv4 addresses (best effort), else the loopback."""
    out = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ip = info[4][0]
            if not ip.startswith("127.") and ip not in out:
                out.append(ip)
    except OSError:
        pass
    return out or ["127.0.0.1"]
