"""The gateway through Redis outages, end to end: real gateway processes.

Started while its Redis is down, it serves anyway (exiting would turn a Redis
outage during a rollout into a crash loop): client routes answer 503
store_unavailable (fail closed) until Redis answers. A full Redis is loud.
Either is logged once, not once per request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisServer, fill_redis, metric_value, scrape

NEVER_ISSUED = "ek_never_issued_secret"
API_KEY = {"Authorization": "Bearer sk-test-outages"}


async def _client_call(
    http: aiohttp.ClientSession, gateway: GatewayProcess, secret: str = NEVER_ISSUED
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {secret}"}
    async with http.post(
        f"{gateway.url}/v1/chatkit/conversation", json={}, headers=headers
    ) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body["error"]["code"] if resp.status != 200 else ""


async def test_gateway_starts_without_redis_and_serves_once_redis_is_back(
    upstream: FakeUpstream,
) -> None:
    redis_server = RedisServer()
    redis_server.stop()  # the port is chosen; nothing listens on it yet
    gateway = GatewayProcess(upstream.url, redis_url=redis_server.url)
    try:
        async with gateway, aiohttp.ClientSession() as http:
            # Started (/healthz answered, or astart would have raised), and fails closed.
            answers = [await _client_call(http, gateway) for _ in range(20)]
            assert answers == [(503, "store_unavailable")] * 20

            await asyncio.to_thread(redis_server.start)
            deadline = time.monotonic() + 10
            while (answer := await _client_call(http, gateway)) == (503, "store_unavailable"):
                assert time.monotonic() < deadline, "never recovered"
                await asyncio.sleep(0.05)
            # Redis answered: an unknown secret is now refused for what it is.
            assert answer == (401, "invalid_client_secret")
            async with http.get(f"{gateway.url}/readyz") as resp:
                assert resp.status == 200
        output = gateway.output()
    finally:
        redis_server.close()

    assert "chatkit-gateway ready" in output
    # One line for the outage (not one per refused request), one for the recovery.
    # Once from the store (what clients get) and once from the readiness
    # check (what /readyz says): never once per refused request.
    assert output.count("client requests are refused with 503") == 1, output
    assert output.count("Redis answers again") == 1, output


async def test_a_full_redis_is_loud_and_still_takes_cancels(upstream: FakeUpstream) -> None:
    with RedisServer(
        extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    ) as redis_server:
        async with (
            GatewayProcess(upstream.url, redis_url=redis_server.url) as gateway,
            aiohttp.ClientSession() as http,
        ):
            session = await _create_session(http, gateway)
            secret = session["client_secret"]
            assert await _client_call(http, gateway, secret) == (200, "")

            # Filled to the last bytes, and topped up before every request:
            # Redis frees client buffers now and then, and an admission could
            # fit the room so freed.
            probe = redis_server.client()
            fillers = 0

            # Fail closed, and say why: once in the log, in /readyz and in a metric.
            answers = []
            for _ in range(20):
                fillers = await fill_redis(probe, fillers)
                answers.append(await _client_call(http, gateway, secret))
            assert set(answers) <= {(200, ""), (503, "store_unavailable")}
            assert answers.count((503, "store_unavailable")) >= 19, answers
            async with http.get(f"{gateway.url}/readyz") as resp:
                ready = await resp.json()
            assert ready["store_full"] is True
            assert ready["revocation_listener"] == "up"
            samples = await scrape(http, gateway.url)
            assert metric_value(samples, "chatkit_gateway_store_full") == 1

            # A cancel protects a user: it is stored although Redis is full.
            async with http.post(
                f"{gateway.url}/v1/chatkit/sessions/{session['id']}/cancel", headers=API_KEY
            ) as resp:
                assert resp.status == 200
            async with http.get(f"{gateway.url}/readyz") as resp:
                assert (await resp.json())["pending_revocations"] == 0
            await probe.aclose()
        output = gateway.output()
    assert output.count("Redis is full") == 1, output


async def _create_session(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, Any]:
    body = {
        "user": "user_full",
        "workflow": {"id": "wf_full"},
        "rate_limits": {"max_requests_per_1_minute": 1000},  # never the reason for a refusal
    }
    async with http.post(f"{gateway.url}/v1/chatkit/sessions", json=body, headers=API_KEY) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
    return answer
