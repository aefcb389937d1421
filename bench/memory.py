"""Resident memory and open descriptors of a service, from /proc."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.processes import Service


def rss_bytes(service: Service) -> int:
    """Resident set size summed over the service and its children (workers)."""
    total = 0
    for pid in service.pids():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def open_fds(service: Service) -> int:
    total = 0
    for pid in service.pids():
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def settle(read: Callable[[], int], *, timeout: float, target: int | None = None) -> int:
    """Read until the value stops moving for half a second (or reaches ``target``)."""
    deadline = time.monotonic() + timeout
    last = read()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        if target is not None and last <= target:
            return last
        time.sleep(0.1)
        now = read()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 0.5 and target is None:
            return last
    return last
