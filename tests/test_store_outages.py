"""The gateway through Redis outages, end to end: real gateway processes.

Started while its Redis is down, it serves anyway (exiting would turn a Redis
outage during a rollout into a crash loop): client routes answer 503
store_unavailable (fail closed) until Redis answers. A full Redis is loud.
Either is logged once, not once per request.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisServer,
    cancel_session,
    converse,
    create_session,
    eventually,
    fill_redis,
    metric_value,
    scrape,
)

NEVER_ISSUED = "ek_never_issued_secret"
API_KEY = "sk-test-outages"


async def test_gateway_starts_without_redis_and_serves_once_redis_is_back(
    upstream: FakeUpstream,
) -> None:
    redis_server = RedisServer()
    redis_server.stop()  # the port is chosen; nothing listens on it yet
    gateway = GatewayProcess(upstream.url, redis_url=redis_server.url)
    try:
        async with gateway, aiohttp.ClientSession() as http:
            # Started (/healthz answered, or astart would have raised), and fails closed.
            answers = [await converse(http, gateway, NEVER_ISSUED) for _ in range(20)]
            assert answers == [(503, "store_unavailable")] * 20

            await asyncio.to_thread(redis_server.start)
            answer = answers[-1]

            async def recovered() -> bool:
                nonlocal answer
                answer = await converse(http, gateway, NEVER_ISSUED)
                return answer != (503, "store_unavailable")

            await eventually(recovered, timeout=10, interval=0.05, what="the gateway to recover")
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
            # A high limit: the rate limit is never the reason for a refusal.
            session = await create_session(
                http, gateway.url, limit=1000, user="user_full", api_key=API_KEY
            )
            secret = session["client_secret"]
            assert await converse(http, gateway, secret) == (200, None)

            # Filled to the last bytes, and topped up before every request:
            # Redis frees client buffers now and then, and an admission could
            # fit the room so freed.
            probe = redis_server.client()
            fillers = 0

            # Fail closed, and say why: once in the log, in /readyz and in a metric.
            answers = []
            for _ in range(20):
                fillers = await fill_redis(probe, fillers)
                answers.append(await converse(http, gateway, secret))
            assert set(answers) <= {(200, None), (503, "store_unavailable")}
            assert answers.count((503, "store_unavailable")) >= 19, answers
            async with http.get(f"{gateway.url}/readyz") as resp:
                ready = await resp.json()
            assert ready["store_full"] is True
            assert ready["revocation_listener"] == "up"
            samples = await scrape(http, gateway.url)
            assert metric_value(samples, "chatkit_gateway_store_full") == 1

            # A cancel protects a user: it is stored although Redis is full.
            await cancel_session(http, gateway.url, session["id"], api_key=API_KEY)
            async with http.get(f"{gateway.url}/readyz") as resp:
                assert (await resp.json())["pending_revocations"] == 0
            await probe.aclose()
        output = gateway.output()
    assert output.count("Redis is full") == 1, output
