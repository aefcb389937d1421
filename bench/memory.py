"""Resident memory and open descriptors of a service, from /proc."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.processes import REPO_ROOT, Service


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


#: What the gateway loads beyond the minimal proxy's uvicorn + aiohttp, in the
#: order it loads them; each step's RSS growth is charged to that step.
IMPORT_STEPS = (
    ("uvloop, uvicorn, aiohttp (the minimal proxy's too)", "uvloop, uvicorn, aiohttp"),
    ("redis-py and hiredis (the store)", "redis.asyncio, hiredis"),
    ("pydantic and pydantic-settings (settings)", "pydantic, pydantic_settings"),
    ("prometheus-client and starlette", "prometheus_client, starlette.applications"),
    ("the gateway's own modules", "gateway.app"),
)  # fmt: skip

_IMPORT_PROBE = """
import sys
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
print(rss())
for step in sys.argv[1:]:
    for name in step.split(","):
        __import__(name.strip())
    print(rss())
"""


def import_costs(python: str) -> list[tuple[str, int]]:
    """RSS each group of imports adds to a fresh interpreter, in bytes."""
    done = subprocess.run(
        [python, "-c", _IMPORT_PROBE, *(modules for _, modules in IMPORT_STEPS)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    if done.returncode != 0:
        return []
    sizes = [int(x) for x in done.stdout.split()]
    steps = [(label, sizes[i + 1] - sizes[i]) for i, (label, _) in enumerate(IMPORT_STEPS)]
    return [("the interpreter itself", sizes[0]), *steps]
