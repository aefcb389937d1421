"""Connection floods shed the attacker, not the user (gateway/capacity.py).

A worker at its connection cap makes room for each new connection by closing
one that gave it least: first those without a complete request head (oldest
first), then idle keep-alive ones, never one with a request in progress or a
stream. The cap leaves enough descriptors that accept() itself never fails
first. Here against real gateway processes over real sockets; the choice of
whom to close is specified on its own in tests/test_capacity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import REPO_ROOT, GatewayProcess, connection, raw_http

ENV = {
    "GATEWAY_UNKNOWN_SECRETS": "allow",
    "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "1000000",
}
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
THREADS = (
    b"GET /v1/chatkit/threads HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-flood\r\n"
    b"Connection: close\r\n\r\n"
)
KEEP_ALIVE_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"


def under_fd_limit(nofile: int) -> list[str]:
    """The gateway's command with ``RLIMIT_NOFILE`` soft and hard set to ``nofile``."""
    return ["prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m", "gateway", "serve"]


def fd_limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as limits:
        row = next(row for row in limits if row.startswith("Max open files"))
    soft, hard = row.split()[3:5]
    return soft, hard


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


async def scraped(gw: GatewayProcess, name: str, **labels: str) -> float:
    reply = await raw_http(
        gw.host, gw.port, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert status_of(reply) == 200, reply[:300]
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    for line in reply.decode().splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    raise AssertionError(f"no {wanted!r} on /metrics")


class Attack:
    """The flood of ``tests/flood.py`` in a process of its own, against ``gw``."""

    def __init__(
        self, gw: GatewayProcess, *, silent: int, dripping: int, interval: float, rate: float
    ) -> None:
        self._argv = [
            sys.executable,
            "-m",
            "tests.flood",
            gw.host,
            str(gw.port),
            f"--silent={silent}",
            f"--dripping={dripping}",
            f"--interval={interval}",
            f"--rate={rate}",
            "--report=50",
        ]
        self._proc: asyncio.subprocess.Process | None = None
        self._stdin: asyncio.StreamWriter | None = None
        self._stdout: asyncio.StreamReader | None = None
        self.connects = 0
        self.summary: dict[str, Any] = {}

    async def __aenter__(self) -> Attack:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout
        return self

    def _pipes(
        self,
    ) -> tuple[asyncio.subprocess.Process, asyncio.StreamWriter, asyncio.StreamReader]:
        if self._proc is None or self._stdin is None or self._stdout is None:
            raise RuntimeError("the attack is not started: use `async with`")
        return self._proc, self._stdin, self._stdout

    async def until(self, connects: int, *, within: float = 20.0) -> None:
        """Wait until the attackers have connected ``connects`` times in all."""
        stdout = self._pipes()[2]
        async with asyncio.timeout(within):
            while self.connects < connects:
                line = await stdout.readline()
                assert line.startswith(b"connects "), line
                self.connects = int(line.split()[1])

    async def __aexit__(self, *exc_info: object) -> None:
        proc, stdin, stdout = self._pipes()
        stdin.close()
        async with asyncio.timeout(20):
            lines = (await stdout.read()).splitlines()
            await proc.wait()
        if lines and lines[-1].startswith(b"{"):
            self.summary = json.loads(lines[-1])


async def answered_within(gw: GatewayProcess, request: bytes, seconds: float) -> float:
    """Connect, ask and read the whole answer; fails unless it is a 200 in ``seconds``."""
    started = time.monotonic()
    reply = await raw_http(gw.host, gw.port, request, timeout=seconds)
    took = time.monotonic() - started
    assert status_of(reply) == 200, (reply[:300], took)
    assert took < seconds, took
    return took


async def test_a_flood_of_idle_connections_sheds_the_attackers_not_the_users(
    upstream: FakeUpstream,
) -> None:
    # The probe that broke the gateway: 256 descriptors, 300 connections that
    # send nothing and 50 that drip a header byte; here each one reconnects as
    # soon as it is closed, at up to 250 connections a second in all (an
    # attacker reconnecting faster than a worker can accept is a rate flood,
    # see docs/connection-floods.md). A dripper's pace changes nothing about
    # whom the gateway closes (the oldest unfinished head goes first, whatever
    # its bytes), so 0.2 s stands in for 5 s; the head timeout (10 s) is
    # longer than the test.
    gw = GatewayProcess(upstream.url, env=ENV, command=under_fd_limit(256))
    async with gw:
        assert fd_limits(gw.proc.pid) == ("256", "256")
        peak = 0

        async def watch_descriptors() -> None:
            nonlocal peak
            while True:  # a measurement, not synchronisation
                peak = max(peak, descriptors(gw.proc.pid))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch_descriptors())
        took = []
        try:
            async with Attack(gw, silent=300, dripping=50, interval=0.2, rate=250) as attack:
                # Every attacker is in, and the gateway has been closing them
                # for a while (each connect beyond the cap closed another).
                await attack.until(400)
                for _ in range(5):
                    took.append(await answered_within(gw, THREADS, 1.0))
                    took.append(await answered_within(gw, HEALTHZ, 1.0))
                    # The attack goes on between rounds: more reconnects.
                    await attack.until(attack.connects + 100)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        summary = attack.summary
        closes: dict[str, int] = summary["closes"]
        assert upstream.count("/v1/chatkit/threads") == 5
        # No connection was refused by a failing accept(): each one the
        # gateway closed while it sent nothing had its 408 first.
        assert {kind for kind in closes if kind.startswith("silent")} == {"silent 408"}, closes
        assert closes.get("dripping 408", 0) > 0, closes
        assert summary["failed_connects"] == 0, summary
        assert set(summary["codes"]) == {"request_timeout"}, summary
        assert peak < 256, peak
        shed = await scraped(gw, "chatkit_gateway_connections_shed_total", reason="no_head")
        assert shed >= closes["silent 408"] + closes["dripping 408"]
        assert await scraped(gw, "chatkit_gateway_connections_shed_total", reason="idle") == 0
        print(
            f"answers in {max(took):.3f} s at most; {summary['connects']} attacker connects;"
            f" peak descriptors {peak}"
        )


async def closed_with(reader: asyncio.StreamReader, *, within: float = 5.0) -> bytes:
    """Everything the gateway sent before it closed the connection."""
    async with asyncio.timeout(within):
        return await reader.read()


async def keep_alive_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One /healthz on a kept-alive connection, read to its end: then it is idle."""
    writer.write(KEEP_ALIVE_HEALTHZ)
    head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 200, head
    assert b"connection: close" not in head.lower()
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)


async def test_at_the_cap_unfinished_heads_go_first_then_idle_never_requests(
    upstream: FakeUpstream,
) -> None:
    env = {**ENV, "GATEWAY_MAX_CONNECTIONS": "4"}
    upload = (
        b"POST /v1/chatkit/conversation HTTP/1.1\r\nHost: a\r\n"
        b"Authorization: Bearer ek_flood\r\nContent-Length: 10\r\n\r\n"
    )
    stream = (
        b"POST /v1/chatkit/conversation?events=100&interval=0.1 HTTP/1.1\r\nHost: a\r\n"
        b"Authorization: Bearer ek_flood\r\nAccept: text/event-stream\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    async with (
        GatewayProcess(upstream.url, env=env) as gw,
        connection(gw.host, gw.port) as (a_reader, a_writer),
        connection(gw.host, gw.port) as (c_reader, c_writer),
        connection(gw.host, gw.port) as (b_reader, b_writer),
        connection(gw.host, gw.port) as (b2_reader, b2_writer),
    ):
        # A: a stream; C: an upload half sent; B, then B2: idle keep-alive.
        a_writer.write(stream)
        await a_reader.readuntil(b"data: ")
        c_writer.write(upload + b"12345")
        await upstream.wait_for(lambda: upstream.count() == 2)  # C's head is in
        await keep_alive_request(b_reader, b_writer)
        await keep_alive_request(b2_reader, b2_writer)

        async with connection(gw.host, gw.port) as (e_reader, _):
            # At the cap, with no unfinished head but its own: the longest idle goes.
            reply = await closed_with(b_reader)
            assert status_of(reply) == 408, reply
            assert b'"code":"request_timeout"' in reply
            async with connection(gw.host, gw.port) as (f_reader, _):
                # E has no head: it goes before B2, although B2 is older.
                assert status_of(await closed_with(e_reader)) == 408
                # A client that asks at once still gets through (F goes).
                assert status_of(await raw_http(gw.host, gw.port, HEALTHZ)) == 200
                assert status_of(await closed_with(f_reader)) == 408

        # B2 was never closed; now it starts an upload too: every slot is in a request.
        await keep_alive_request(b2_reader, b2_writer)
        b2_writer.write(upload + b"1")
        async with connection(gw.host, gw.port) as (_, d_writer):
            d_writer.write(upload + b"1")
            await upstream.wait_for(lambda: upstream.count("/v1/chatkit/conversation") == 4)
            # Nothing can be closed for a newcomer: it is refused itself.
            reply = await raw_http(gw.host, gw.port, HEALTHZ)
            assert status_of(reply) == 503, reply
            assert b'"code":"overloaded"' in reply
            # The stream and the uploads went on untouched.
            assert (await a_reader.readuntil(b"data: ")).endswith(b"data: ")
            c_writer.write(b"67890")
            head = await c_reader.readuntil(b"\r\n\r\n")
            assert status_of(head) == 200, head

        assert await scraped(gw, "chatkit_gateway_connections_shed_total", reason="idle") == 1
        assert await scraped(gw, "chatkit_gateway_connections_shed_total", reason="no_head") == 2
        assert await scraped(gw, "chatkit_gateway_connections_shed_total", reason="no_room") == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # Derived: the cap and the backlog fit below the limit with room.
        ({}, "limit 256: at most 56 client connections per worker (listen backlog 112)"),
        # Configured above that: kept, and the operator is told what it risks.
        (
            {"GATEWAY_MAX_CONNECTIONS": "500"},
            "GATEWAY_MAX_CONNECTIONS=500 is more than the 56 connections that 256 descriptors",
        ),
    ],
)
async def test_the_cap_leaves_room_below_the_descriptor_limit(
    upstream: FakeUpstream, env: dict[str, str], expected: str
) -> None:
    gw = GatewayProcess(upstream.url, env={**ENV, **env}, command=under_fd_limit(256))
    async with gw:
        assert expected in gw.output()
