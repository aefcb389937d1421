"""CPU time from /proc: per process group and per core, over a measured run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tests.processes import Service

CLK_TCK = os.sysconf("SC_CLK_TCK")


def core_jiffies() -> dict[int, list[int]]:
    """Per CPU: user nice system idle iowait irq softirq steal, in jiffies since boot."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                out[int(name[3:])] = [int(v) for v in values[:8]]
    return out


def process_jiffies(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total


class CpuWatch:
    """CPU used by named groups of processes, and by each core, over an interval.

    Figures are percent of one core. ``cpuN`` is how busy core N was; ``softirq``
    (loopback TCP is processed there, and charged to no process) and ``steal``
    (the hypervisor ran someone else) are summed over the cores.
    """

    def __init__(self, groups: dict[str, list[Service]]) -> None:
        self._pids = {
            name: [p for s in services for p in s.pids()] for name, services in groups.items()
        }
        self._cores = core_jiffies()
        self._procs = {name: process_jiffies(pids) for name, pids in self._pids.items()}

    def percent(self, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        procs = {
            name: 100 * (process_jiffies(pids) - self._procs[name]) / CLK_TCK / seconds
            for name, pids in self._pids.items()
        }
        cores: dict[str, float] = {"softirq": 0.0, "steal": 0.0}
        for cpu, now in core_jiffies().items():
            delta = [b - a for a, b in zip(self._cores[cpu], now, strict=True)]
            total = max(sum(delta), 1)
            cores[f"cpu{cpu}"] = 100 * (total - delta[3] - delta[4]) / total
            cores["softirq"] += 100 * delta[6] / total
            cores["steal"] += 100 * delta[7] / total
        return procs, cores
