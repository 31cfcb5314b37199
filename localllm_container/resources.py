"""The CPUs and memory this container may use: affinity, cgroup v2 and v1 limits,
else the machine's. Reads /proc and /sys only; decides nothing.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path


def available_cpus(root: Path = Path("/")) -> tuple[int, str]:
    """CPUs this container may really use: affinity mask and cgroup quota (v2 or v1).
    A fractional quota (`--cpus 2.5`, `3500m`) is floored: a thread more than the CPU
    time spins waiting for the others, and llama.cpp's threads wait for each other."""
    limits = {"affinity": float(len(os.sched_getaffinity(0)))}
    cpu_max = root / "sys/fs/cgroup/cpu.max"
    v1_quota, v1_period = root / "sys/fs/cgroup/cpu/cpu.cfs_quota_us", root / "sys/fs/cgroup/cpu/cpu.cfs_period_us"
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            limits["cgroup cpu.max"] = int(quota) / int(period)
    except (OSError, ValueError):
        try:
            quota = int(v1_quota.read_text())
            if quota > 0:
                limits["cgroup cfs quota"] = quota / int(v1_period.read_text())
        except (OSError, ValueError):
            pass
    count = max(1, math.floor(min(limits.values())))
    return count, ", ".join(f"{k} {v:g}" + (" (floored)" if v != int(v) else "") for k, v in limits.items())


def memory_limit() -> tuple[int, str]:
    """Bytes this container may use: the cgroup limit (v2, v1), else available RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text), f"cgroup limit {path}"
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    return available, "available RAM"
