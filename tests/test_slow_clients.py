"""Slow clients (Slowloris, trickled uploads) and connection caps, end to end.

Each test starts its own gateway with short timeouts, because the settings
under test are what differs; waits are deadlines on what the gateway does,
never sleeps standing in for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
import time
from collections.abc import AsyncIterator

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, connection, eventually, raw_http

BASE_ENV = {
    "GATEWAY_UNKNOWN_SECRETS": "allow",
    "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "1000000",
    "GATEWAY_CLIENT_HEADER_TIMEOUT": "1",
    "GATEWAY_CLIENT_BODY_TIMEOUT": "1",
    "GATEWAY_CLIENT_BODY_MIN_RATE": "240",
    "GATEWAY_CLIENT_BODY_MIN_RATE_GRACE": "1.5",
}
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
THREADS = b"GET /v1/chatkit/threads HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-x\r\n"
UPLOAD = b"POST /v1/chatkit/conversation HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ek_slow\r\n"


def limited(nofile: str) -> list[str]:
    """The gateway's command under a shell ``ulimit -n`` (e.g. ``256`` or ``-S 256``)."""
    command = shlex.join([sys.executable, "-m", "gateway", "serve"])
    return ["sh", "-c", f"ulimit -n {nofile} && exec {command}"]


def fd_limits(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as limits:
        return next(row for row in limits if row.startswith("Max open files"))


async def status(gw: GatewayProcess, request: bytes, *, within: float = 2.0) -> int:
    try:
        reply = await raw_http(gw.host, gw.port, request, timeout=within)
    except (OSError, TimeoutError):
        return 0
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


async def eventually_ok(gw: GatewayProcess, request: bytes, *, deadline: float) -> float:
    """Seconds until ``request`` is answered 200; fails after ``deadline`` seconds."""

    async def ok() -> bool:
        return await status(gw, request) == 200

    return await eventually(
        ok, timeout=deadline, interval=0.1, what=f"{request.splitlines()[0]!r} answered 200"
    )


@contextlib.asynccontextmanager
async def connections(
    gw: GatewayProcess, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connection(gw.host, gw.port)) for _ in range(count)]


async def closed_by_server(reader: asyncio.StreamReader, *, within: float) -> bytes:
    """Whatever the server sent before closing; fails if it does not close in time."""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionError):
            return await reader.read()
    return b""


async def test_slowloris_connections_are_shed_and_service_resumes(
    upstream: FakeUpstream,
) -> None:
    # 300 connections against 256 descriptors: half idle, half one byte of
    # head every 0.3 s. Without a head deadline they were held for ever and
    # neither /healthz nor real requests got through.
    gw = GatewayProcess(upstream.url, env=BASE_ENV, command=limited("256"))
    async with gw, connections(gw, 300) as opened:

        async def dribble(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                for byte in THREADS:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.3)  # the attack's pace, not synchronisation

        dribblers = [asyncio.ensure_future(dribble(w)) for _, w in opened[150:]]
        try:
            await eventually_ok(gw, HEALTHZ, deadline=10)
            await eventually_ok(gw, THREADS + b"Connection: close\r\n\r\n", deadline=5)
            # The attackers were cut off: the gateway closed every one of them.
            for reader, _ in opened:
                await closed_by_server(reader, within=5)
        finally:
            for task in dribblers:
                task.cancel()
            await asyncio.gather(*dribblers, return_exceptions=True)


async def test_the_descriptor_soft_limit_is_raised_to_the_hard_limit(
    upstream: FakeUpstream,
) -> None:
    async with GatewayProcess(upstream.url, env=BASE_ENV, command=limited("-S 256")) as gw:
        line = fd_limits(gw.proc.pid)
        soft, hard = line.split()[3:5]
        assert soft == hard, line


async def test_an_idle_connection_gets_408_when_its_head_is_late(upstream: FakeUpstream) -> None:
    async with GatewayProcess(upstream.url, env=BASE_ENV) as gw, connections(gw, 1) as opened:
        reader, writer = opened[0]
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")  # never finished
        started = time.monotonic()
        reply = await closed_by_server(reader, within=4)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert b'"code":"request_timeout"' in reply
        assert 0.9 < time.monotonic() - started < 3


async def test_a_stalled_upload_is_ended_with_408_and_the_upstream_released(
    upstream: FakeUpstream,
) -> None:
    async with GatewayProcess(upstream.url, env=BASE_ENV) as gw, connections(gw, 1) as opened:
        reader, writer = opened[0]
        writer.write(UPLOAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        await upstream.wait_for(lambda: upstream.count() == 1)
        reply = await closed_by_server(reader, within=4)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        await upstream.wait_for(lambda: upstream.active == 0)
        assert not upstream.requests[0].completed


async def test_a_trickled_upload_is_ended_once_under_the_minimum_rate(
    upstream: FakeUpstream,
) -> None:
    # One byte every 0.25 s never trips the 1 s idle timeout, but averages
    # 4 bytes/s: it would hold an upstream connection for its whole life.
    async with GatewayProcess(upstream.url, env=BASE_ENV) as gw, connections(gw, 1) as opened:
        reader, writer = opened[0]
        writer.write(UPLOAD + b"Content-Length: 1000\r\n\r\n")

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.25)  # the attack's pace

        trickling = asyncio.ensure_future(trickle())
        try:
            started = time.monotonic()
            reply = await closed_by_server(reader, within=6)
            assert reply.startswith(b"HTTP/1.1 408 "), reply
            assert b"slower than 240 bytes/s" in reply
            assert time.monotonic() - started < 4
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickling
        await upstream.wait_for(lambda: upstream.active == 0)
        assert not upstream.requests[0].completed


async def test_connections_over_the_per_client_cap_get_503(upstream: FakeUpstream) -> None:
    env = {
        **BASE_ENV,
        "GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "2",
        "GATEWAY_CLIENT_HEADER_TIMEOUT": "10",
    }
    async with GatewayProcess(upstream.url, env=env) as gw:
        async with connections(gw, 2) as held:
            # Both held connections are open at the gateway once one answers.
            reader, writer = held[0]
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            reply = await raw_http(gw.host, gw.port, HEALTHZ, timeout=3)
            assert reply.startswith(b"HTTP/1.1 503 "), reply
            assert b'"code":"overloaded"' in reply
        # Once they are gone, the address may connect again.
        await eventually_ok(gw, HEALTHZ, deadline=5)


async def test_an_idle_keep_alive_connection_closes_at_the_configured_time(
    upstream: FakeUpstream,
) -> None:
    # The gateway must be the last to close an idle connection (its default,
    # 75 s, outlives clients' and balancers' idle timeouts): a server that
    # closes first races the request a client is sending, which then fails
    # with a reset. Set short here to see that the setting is what decides.
    env = {**BASE_ENV, "GATEWAY_CLIENT_KEEPALIVE_TIMEOUT": "1.5"}
    async with (
        GatewayProcess(upstream.url, env=env) as gw,
        connection(gw.host, gw.port) as (reader, writer),
    ):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await reader.readexactly(length)
        idle_since = time.monotonic()
        assert await closed_by_server(reader, within=10) == b""
        idle = time.monotonic() - idle_since
        # Not uvicorn's 5 s default, and not before the setting's 1.5 s.
        assert 1.4 <= idle < 4.5, idle
