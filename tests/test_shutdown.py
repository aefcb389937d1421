"""Shutdown and reload: SIGTERM drains, SIGHUP is ignored, with one worker or two.

Draining is tested end to end with a live SSE stream from the fake upstream:
new connections must be refused at once (not queued unanswered), the stream
must go on for the grace period and then end, and the log must stay free of
errors and tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator

import pytest

from gateway import lifecycle
from gateway.app import GatewayApp
from gateway.settings import load_settings
from tests.doubles import asgi_get, started
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, connection, eventually, raw_http

GRACE = 3.0
ENV = {
    "GATEWAY_UNKNOWN_SECRETS": "allow",
    "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "1000000",
    "GATEWAY_SHUTDOWN_GRACE_SECONDS": str(GRACE),
}
STREAM = (
    b"POST /v1/chatkit/conversation?events=1000&interval=0.05 HTTP/1.1\r\nHost: a\r\n"
    b"Authorization: Bearer ek_drain\r\nAccept: text/event-stream\r\nContent-Length: 2\r\n\r\n{}"
)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@contextlib.asynccontextmanager
async def live_stream(gw: GatewayProcess) -> AsyncIterator[asyncio.StreamReader]:
    """An SSE stream through the gateway, its first event already received."""
    async with connection(gw.host, gw.port) as (reader, writer):
        writer.write(STREAM)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            await reader.readuntil(b"\n\n")
        yield reader


async def refused(gw: GatewayProcess) -> bool:
    """True when a new connection is refused (not accepted, nor left unanswered)."""
    try:
        reply = await raw_http(gw.host, gw.port, HEALTHZ, timeout=1)
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        return False  # accepted by the kernel, answered by no one: the old hang
    return not reply  # accepted and closed at once is a refusal too


async def ends(reader: asyncio.StreamReader, *, within: float) -> tuple[float, int]:
    """Read the stream to its end: (seconds it took, events received meanwhile)."""
    started = time.monotonic()
    events = 0
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                events += chunk.count(b"\n\n")
    return time.monotonic() - started, events


def assert_quiet(output: str) -> None:
    for marker in ("Traceback", " ERROR ", " CRITICAL "):
        assert marker not in output, output


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_refuses_new_connections_and_drains_a_live_stream(
    upstream: FakeUpstream, workers: str
) -> None:
    gw = GatewayProcess(upstream.url, env={**ENV, "GATEWAY_WORKERS": workers})
    async with gw, live_stream(gw) as stream:
        gw.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # New connections are refused promptly, while the stream goes on.
        await eventually(
            lambda: refused(gw), timeout=1.5, interval=0.05, what="new connections refused"
        )
        took, events = await ends(stream, within=GRACE + 5)
        elapsed = time.monotonic() - signalled
        assert events > 0  # it was not cut off at once
        assert GRACE - 0.5 < elapsed < GRACE + 3, (took, elapsed)
        assert await asyncio.to_thread(gw.proc.wait, 10) == 0
    assert_quiet(gw.output())
    assert "Draining" in gw.output()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_is_logged_and_ignored(upstream: FakeUpstream, workers: str) -> None:
    async with GatewayProcess(upstream.url, env={**ENV, "GATEWAY_WORKERS": workers}) as gw:
        gw.proc.send_signal(signal.SIGHUP)

        def logged() -> bool:
            assert gw.proc.poll() is None, gw.output()
            return "SIGHUP ignored" in gw.output()

        await eventually(logged, what=gw.output)
        reply = await raw_http(gw.host, gw.port, HEALTHZ, timeout=5)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        assert gw.proc.poll() is None
    assert_quiet(gw.output())


async def test_readyz_answers_503_while_draining() -> None:
    async with started(GatewayApp(load_settings({}))) as app:
        try:
            assert (await asgi_get(app, "/readyz"))[0] == 200
            lifecycle.draining.set()
            status, body = await asgi_get(app, "/readyz")
            assert status == 503
            assert json.loads(body)["error"]["message"] == "The gateway is shutting down."
            assert (await asgi_get(app, "/healthz"))[0] == 200  # alive, just leaving
        finally:
            lifecycle.draining.clear()
