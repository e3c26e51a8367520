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


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def memory_used_bytes() -> int:
    """MemTotal - MemAvailable, from /proc/meminfo."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, info.get("MemTotal", 0) - info.get("MemAvailable", 0))

