"""/readyz: "this process accepts traffic", whatever the store is doing."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from typing import Any

import aiohttp
import pytest

from gateway.app import GatewayApp
from gateway.errors import StoreUnavailable
from gateway.health import StoreMonitor
from gateway.metrics import Metrics
from gateway.settings import load_settings
from gateway.store.memory import MemoryStore
from gateway.types import Message
from tests.doubles import asgi_get, collector_restored, started
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisServer, eventually, metric_value, scrape

FAST_CHECKS = {"GATEWAY_STORE_CHECK_INTERVAL_SECONDS": "0.1", "GATEWAY_REDIS_TIMEOUT": "0.5"}


async def readyz(http: aiohttp.ClientSession, gateway: GatewayProcess) -> tuple[int, Any, float]:
    started = time.monotonic()
    async with http.get(f"{gateway.url}/readyz") as response:
        body = await response.json()
        return response.status, body, time.monotonic() - started


async def store_up(http: aiohttp.ClientSession, gateway: GatewayProcess) -> float | None:
    return metric_value(await scrape(http, gateway.url), "chatkit_gateway_store_up")


async def test_ready_while_redis_hangs_or_is_down_and_the_body_says_so(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    redis_server.ensure_running()
    async with (
        GatewayProcess(upstream.url, redis_url=redis_server.url, env=FAST_CHECKS) as gateway,
        aiohttp.ClientSession() as http,
    ):

        async def store_is(up: bool) -> bool:
            _, body, _ = await readyz(http, gateway)
            return bool(body["store"]["up"] is up)

        await eventually(
            lambda: store_is(True), timeout=10, interval=0.05, what="the first store check"
        )
        assert await store_up(http, gateway) == 1

        redis_server.pause()  # hung: the port accepts, nothing answers
        try:
            await eventually(
                lambda: store_is(False),
                timeout=10,
                interval=0.05,
                what="the check to notice the hung store",
            )
            status, body, seconds = await readyz(http, gateway)
            assert status == 200
            assert body["status"] == "ready"
            assert body["store"]["backend"] == "redis"
            assert seconds < 0.5  # a probe never waits for the store
            assert await store_up(http, gateway) == 0
        finally:
            redis_server.resume()
        await eventually(
            lambda: store_is(True), timeout=10, interval=0.05, what="the store to come back"
        )

        redis_server.stop()  # down: connections refused
        try:
            await eventually(
                lambda: store_is(False),
                timeout=10,
                interval=0.05,
                what="the check to notice the stopped store",
            )
            status, _, _ = await readyz(http, gateway)
            assert status == 200
        finally:
            redis_server.start()
        await eventually(
            lambda: store_is(True), timeout=10, interval=0.05, what="the restarted store"
        )
        assert await store_up(http, gateway) == 1
        output = gateway.output()
    # Each change of state is logged once, not once per check.
    assert output.count("The store is unreachable") == 2, output
    assert output.count("The store is reachable") == 3, output


async def test_readiness_follows_the_store_only_when_asked(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    redis_server.ensure_running()
    env = {**FAST_CHECKS, "GATEWAY_READINESS_REQUIRES_STORE": "true"}
    async with (
        GatewayProcess(upstream.url, redis_url=redis_server.url, env=env) as gateway,
        aiohttp.ClientSession() as http,
    ):

        async def status_is(expected: int) -> bool:
            status, _, _ = await readyz(http, gateway)
            return status == expected

        await eventually(lambda: status_is(200), timeout=10, interval=0.05, what="ready")
        redis_server.stop()
        try:
            await eventually(
                lambda: status_is(503),
                timeout=10,
                interval=0.05,
                what="unready while the store is down",
            )
            _, body, _ = await readyz(http, gateway)
            assert body["error"]["code"] == "store_unavailable"
        finally:
            redis_server.start()
        await eventually(lambda: status_is(200), timeout=10, interval=0.05, what="ready again")


async def test_readyz_is_503_until_started_and_after_shutdown() -> None:
    # While the server drains, lifecycle.draining says so (test_shutdown); the
    # app's own start and stop are what this test drives.
    app = GatewayApp(load_settings({"GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9"}))
    status, body = await asgi_get(app, "/readyz")
    assert (status, json.loads(body)["error"]["code"]) == (503, "starting")
    async with started(app):
        status, body = await asgi_get(app, "/readyz")
        assert status == 200
        assert json.loads(body)["store"]["backend"] == "embedded"
    status, body = await asgi_get(app, "/readyz")
    assert (status, json.loads(body)["error"]["code"]) == (503, "draining")
    status, _ = await asgi_get(app, "/healthz")
    assert status == 200  # alive: stopping is not a reason to restart the process


async def test_a_failed_start_up_logs_its_traceback_and_stops_what_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The metrics port is taken, so start-up fails after the store checks,
    # the revocation feed and the upstream pool have started.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = load_settings(
            {
                "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9",
                "GATEWAY_METRICS_PORT": str(taken.getsockname()[1]),
            }
        )
        app = GatewayApp(settings)
        inbox: list[Message] = [{"type": "lifespan.startup"}]
        sent: list[Message] = []

        async def receive() -> Message:
            return inbox.pop(0)

        async def send(message: Message) -> None:
            sent.append(message)

        with collector_restored(), caplog.at_level(logging.CRITICAL, logger="gateway.app"):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("Start-up failed")]
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, OSError)
    assert error.errno == errno.EADDRINUSE
    assert app.components is not None
    assert app.components.session.closed
    status, body = await asgi_get(app, "/readyz")
    assert (status, json.loads(body)["error"]["code"]) == (503, "draining")


class FlakyStore(MemoryStore):
    """Its pings fail in the ways listed, then answer."""

    def __init__(self, failures: list[BaseException]) -> None:
        super().__init__()
        self.failures = failures
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if self.failures:
            raise self.failures.pop(0)


async def test_the_store_check_survives_its_own_bugs_and_keeps_the_gauge_current() -> None:
    metrics = Metrics()
    store = FlakyStore([RuntimeError("a bug"), StoreUnavailable("Redis is unavailable")])
    monitor = StoreMonitor(store, metrics=metrics, interval=0.01, timeout=1.0)
    monitor.start()
    try:
        await eventually(
            lambda: store.pings >= 3 and monitor.up is True,
            timeout=10,
            what=lambda: f"3 pings and the store up; {store.pings} pings, up={monitor.up}",
        )
    finally:
        await monitor.stop()
    assert metrics.registry.get_sample_value("chatkit_gateway_store_up") == 1


async def test_a_hung_store_check_gives_up_after_the_timeout() -> None:
    class HungStore(MemoryStore):
        async def ping(self) -> None:
            await asyncio.Event().wait()

    metrics = Metrics()
    monitor = StoreMonitor(HungStore(), metrics=metrics, interval=1.0, timeout=0.05)
    assert await monitor.check() is False
    assert monitor.report() == {
        "backend": "embedded",
        "up": False,
        "error": "the store did not answer in time",
    }
    assert metrics.registry.get_sample_value("chatkit_gateway_store_up") == 0
