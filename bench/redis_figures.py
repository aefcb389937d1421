"""Redis commands per request, from ``INFO commandstats`` around measured runs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from bench import BenchError
from bench.probe import http_request
from bench.wrk import WrkResult
from tests.processes import REPO_ROOT

ADMIT_LUA = REPO_ROOT / "gateway" / "store" / "lua" / "admit.lua"


def script_commands() -> frozenset[str]:
    """Commands admit.lua issues itself: Redis counts those in commandstats too."""
    return frozenset(
        name.lower() for name in re.findall(r"redis\.call\('([A-Za-z]+)'", ADMIT_LUA.read_text())
    )


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since Redis started, leaving out our own INFO."""
    stats: dict[str, Any] = client.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in stats.items()
        if key.startswith("cmdstat_") and key != "cmdstat_info"
    }


def settled(read: Callable[[], Any], *, timeout: float = 5.0) -> Any:
    """Read until two reads 100 ms apart agree: requests in flight when wrk
    stopped are still being decided for a moment."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    return last


def gateway_decisions(port: int) -> int:
    status, _, body = http_request(port, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"gateway /metrics answered {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("chatkit_gateway_admission_decisions_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


@dataclass
class RedisFigures:
    requests: int
    decisions: int
    evalsha: int
    client_commands: int
    script_commands: int
    other: dict[str, int]

    @property
    def per_request(self) -> float:
        return self.client_commands / max(self.requests, 1)

    def plus(self, other: RedisFigures) -> RedisFigures:
        merged = dict(self.other)
        for name, count in other.other.items():
            merged[name] = merged.get(name, 0) + count
        return RedisFigures(
            requests=self.requests + other.requests,
            decisions=self.decisions + other.decisions,
            evalsha=self.evalsha + other.evalsha,
            client_commands=self.client_commands + other.client_commands,
            script_commands=self.script_commands + other.script_commands,
            other=merged,
        )


class RedisCounter:
    """Redis commands and gateway decisions over measured runs, summed."""

    def __init__(self, redis_port: int, gateway_port: int) -> None:
        self._client = redis.Redis(port=redis_port, socket_timeout=5)
        self._gateway_port = gateway_port
        self._inside = script_commands()
        self._calls: dict[str, int] = {}
        self._decisions = 0
        self.figures: RedisFigures | None = None

    def _read(self) -> tuple[dict[str, int], int]:
        return command_calls(self._client), gateway_decisions(self._gateway_port)

    def before(self) -> None:
        # Requests the warm-up left in flight are still being decided.
        self._calls, self._decisions = settled(self._read)

    def after(self, result: WrkResult) -> None:
        calls, decisions_now = settled(self._read)
        decisions = decisions_now - self._decisions
        delta = {
            name: count - self._calls.get(name, 0)
            for name, count in calls.items()
            if count != self._calls.get(name, 0)
        }
        evalsha = delta.pop("evalsha", 0)
        other = {name: n for name, n in delta.items() if name not in self._inside}
        run = RedisFigures(
            requests=result.requests,
            decisions=decisions,
            evalsha=evalsha,
            client_commands=evalsha + sum(other.values()),
            script_commands=sum(n for name, n in delta.items() if name in self._inside),
            other=other,
        )
        self.figures = run if self.figures is None else self.figures.plus(run)

    def close(self) -> None:
        self._client.close()
