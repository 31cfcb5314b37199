"""Measuring on a shared, noisy machine: wait until other jobs leave the CPUs alone,
measure, and measure again when they did not; report the share they used meanwhile.
"""
from __future__ import annotations

import os
import time

import psutil

from .builds import log

QUIET, QUIET_DEADLINE, TRIES = 0.10, 300, 4  # share of the CPUs other jobs may use while we measure
QUIET_BUDGET = 2400  # seconds of waiting for quiet CPUs in the whole run; then measure as things are


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """Busy CPU seconds so far: of the whole machine (steal included), and ours: this
    process, the children it reaped, and the live processes `pids` with the children they reaped."""
    t = psutil.cpu_times()
    machine = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    ours = sum(os.times()[:4])
    for pid in pids:
        try:
            ours += sum(psutil.Process(pid).cpu_times()[:4])
        except psutil.Error:
            pass
    return machine, ours


def others_share(pids, measure):
    """Run `measure`; also return the share of all CPUs that other jobs used meanwhile."""
    started, (machine, ours) = time.monotonic(), cpu_seconds(pids())
    result = measure()
    machine2, ours2 = cpu_seconds(pids())
    return result, max(0.0, (machine2 - machine) - (ours2 - ours)) / ((time.monotonic() - started) * os.cpu_count())

waited = 0.0  # seconds spent waiting for quiet CPUs in this run


def undisturbed(measure, pids=lambda: [], tries: int = TRIES) -> dict[str, float]:
    """Measure while other jobs leave the CPUs alone: wait until they use at most QUIET
    of them (QUIET_DEADLINE at most), measure, and measure again (`tries` in all) when they
    used more meanwhile. The least disturbed try is kept, with that share as `others`.
    Once QUIET_BUDGET is spent, measure once, as things are."""
    global waited
    best: dict[str, float] | None = None
    for _ in range(tries):
        started = time.monotonic()
        deadline = started + min(QUIET_DEADLINE, max(0.0, QUIET_BUDGET - waited))
        while time.monotonic() < deadline and others_share(lambda: [], lambda: time.sleep(1))[1] > QUIET:
            pass
        waited += time.monotonic() - started
        figures, others = others_share(pids, measure)
        if best is None or others < best["others"]:
            best = {**figures, "others": others}
        if others <= QUIET or waited >= QUIET_BUDGET or tries == 1:
            break
        log(f"other jobs used {others:.0%} of the CPUs during a measurement: measuring again")
    return best
