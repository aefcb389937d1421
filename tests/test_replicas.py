"""Three gateway processes, one real Redis, one fake ChatKit API: exact everywhere.

Every test here drives real ``python -m gateway serve`` processes over real
sockets. The replicas, the fake upstream and the Redis server are shared by
the module (starting processes is the slow part); each test makes its own
sessions, so their windows never meet. Redis runs with ``appendonly yes`` and
``appendfsync always`` so the restart test can show that state survives, and
that test runs last.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import openai
import pytest
import pytest_asyncio
import redis.asyncio
from multidict import CIMultiDictProxy

from gateway.store.redis import ADMIT_SHA
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Samples,
    eventually,
    metric_value,
    redis_key_contents,
    running,
    scrape,
    wall_clock_reach,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = {"Authorization": "Bearer sk-test-replicas"}
WINDOW = 60
DURATION = re.compile(r"^(\d+ms|\d+(\.\d+)?s|\d+m\d+(\.\d+)?s)$")
RATELIMIT = re.compile(r'^"session";r=(\d+);t=(\d+)$')


# -- fixtures: one Redis, one upstream, three replicas -----------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    fake: FakeUpstream, aof_redis: RedisServer
) -> AsyncIterator[Sequence[GatewayProcess]]:
    gateways = [
        GatewayProcess(fake.url, redis_url=aof_redis.url, env={"GATEWAY_REPLICA_ID": f"r{i}"})
        for i in range(3)
    ]
    async with running(gateways) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No connection cap: a burst must reach the replicas all at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


# -- helpers -------------------------------------------------------------------------


async def create_session(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    *,
    limit: int | None = None,
    user: str | None = None,
    expires_after: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user": user or f"user_{uuid.uuid4().hex[:8]}",
        "workflow": {"id": "wf_replicas"},
    }
    if limit is not None:
        body["rate_limits"] = {"max_requests_per_1_minute": limit}
    if expires_after is not None:
        body["expires_after"] = {"anchor": "created_at", "seconds": expires_after}
    async with http.post(f"{gateway.url}/v1/chatkit/sessions", json=body, headers=API_KEY) as resp:
        assert resp.status == 200, await resp.text()
        session: dict[str, Any] = await resp.json()
    return session


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    replica: int

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, self.body
        return error


async def client_call(
    http: aiohttp.ClientSession,
    gateways: Sequence[GatewayProcess],
    index: int,
    *,
    secret: str | None = None,
    authorization: str | None = None,
    path: str = "/v1/chatkit/conversation",
) -> Reply:
    """One client request through replica ``index % len(gateways)``."""
    headers = {}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    if authorization is not None:
        headers["Authorization"] = authorization
    replica = index % len(gateways)
    async with http.post(
        gateways[replica].url + path, json={"type": "threads.list"}, headers=headers
    ) as resp:
        return Reply(resp.status, resp.headers, await resp.read(), replica)


async def burst(
    http: aiohttp.ClientSession, gateways: Sequence[GatewayProcess], secret: str, count: int
) -> list[Reply]:
    """``count`` concurrent requests, round-robin over the replicas, all at once."""
    return await asyncio.gather(
        *(client_call(http, gateways, i, secret=secret) for i in range(count))
    )


def reached(fake: FakeUpstream, secret: str) -> int:
    """Requests carrying ``secret`` that the upstream saw."""
    return sum(1 for seen in fake.requests if seen.authorization == f"Bearer {secret}")


class Statuses(Counter[int]):
    """Status counts that show the unexpected bodies when a comparison fails."""

    def __init__(self, replies: Sequence[Reply]) -> None:
        super().__init__(reply.status for reply in replies)
        self.odd = {r.body for r in replies if r.status not in (200, 429)}

    def __repr__(self) -> str:
        return f"{dict(self)} {sorted(self.odd)[:3] if self.odd else ''}"


def statuses(replies: Sequence[Reply]) -> Statuses:
    return Statuses(replies)


def check_429(reply: Reply, *, limit: int, window: int = WINDOW) -> int:
    """Assert a well-formed 429 and return its retry-after-ms."""
    assert reply.status == 429
    assert reply.error["code"] == "rate_limit_exceeded"
    retry_after = int(reply.headers["Retry-After"])
    retry_after_ms = int(reply.headers["retry-after-ms"])
    assert 1 <= retry_after <= window
    assert 1 <= retry_after_ms <= window * 1000
    assert retry_after == max(1, math.ceil(retry_after_ms / 1000))
    assert reply.headers["x-ratelimit-limit-requests"] == str(limit)
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(reply.headers["x-ratelimit-reset-requests"])
    return retry_after_ms


# -- exact admission across replicas ---------------------------------------------------


@pytest.mark.parametrize("limit", [1, 7, 25])
async def test_burst_across_replicas_admits_exactly_the_limit(
    limit: int,
    replicas: Sequence[GatewayProcess],
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
) -> None:
    session = await create_session(http, replicas[0], limit=limit)
    secret = session["client_secret"]
    started = time.time()
    replies = await burst(http, replicas, secret, 3 * limit + 5)
    finished = time.time()

    assert statuses(replies) == {200: limit, 429: 2 * limit + 5}
    assert reached(fake, secret) == limit
    # Every replica took part in the decision, admitting or refusing.
    assert {r.replica for r in replies} == {0, 1, 2}

    admitted = [r for r in replies if r.status == 200]
    remaining = []
    for reply in admitted:
        assert reply.headers["RateLimit-Policy"] == f'"session";q={limit};w={WINDOW}'
        match = RATELIMIT.match(reply.headers["RateLimit"])
        assert match, reply.headers["RateLimit"]
        remaining.append(int(match[1]))
        assert reply.headers["x-ratelimit-limit-requests"] == str(limit)
        assert DURATION.match(reply.headers["x-ratelimit-reset-requests"])
    # One atomic decision each: every admission saw a different count.
    assert sorted(remaining) == list(range(limit))

    for reply in replies:
        if reply.status == 429:
            wait_ms = check_429(reply, limit=limit)
            # The oldest admission was stamped after the burst started and the
            # refusal before it finished: the wait is the real time left.
            assert (started + WINDOW - finished) * 1000 - 2 <= wait_ms <= WINDOW * 1000


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("revoked", "client_secret_revoked"),  # cancelled through another replica
        ("expired", "client_secret_expired"),  # expires_after.seconds = 1, then waited out
        ("unknown", "invalid_client_secret"),  # a well-formed secret no session issued
        ("missing", "missing_client_secret"),  # no Authorization header
        ("basic", "invalid_authorization"),  # wrong scheme
        ("empty", "invalid_authorization"),  # "Bearer " and nothing
        ("garbage", "invalid_authorization"),  # bytes outside the token alphabet
        ("duplicate", "invalid_authorization"),  # two Authorization headers
    ],
)
async def test_bad_secrets_are_refused_without_reaching_upstream(
    case: str,
    code: str,
    replicas: Sequence[GatewayProcess],
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
) -> None:
    authorization: str | None = None
    if case == "revoked":
        session = await create_session(http, replicas[0])
        assert (await client_call(http, replicas, 0, secret=session["client_secret"])).status == 200
        async with http.post(
            f"{replicas[1].url}/v1/chatkit/sessions/{session['id']}/cancel", headers=API_KEY
        ) as resp:
            assert resp.status == 200
        authorization = f"Bearer {session['client_secret']}"
    elif case == "expired":
        session = await create_session(http, replicas[0], expires_after=1)
        # Redis compares against its own TIME, the clock this machine shares.
        await wall_clock_reach(session["expires_at"] + 0.05)
        authorization = f"Bearer {session['client_secret']}"
    elif case == "unknown":
        authorization = f"Bearer ek_{secrets.token_urlsafe(32)}"
    elif case == "basic":
        authorization = "Basic dXNlcjpwYXNz"
    elif case == "empty":
        authorization = "Bearer "
    elif case == "garbage":
        authorization = "Bearer ek_{not}<a>token"

    probe = f"/v1/chatkit/probe/{uuid.uuid4().hex}"
    replies = []
    for index in range(len(replicas)):
        if case == "duplicate":
            url = replicas[index].url + probe
            headers = [("Authorization", "Bearer ek_one"), ("Authorization", "Bearer ek_two")]
            async with http.post(url, json={}, headers=headers) as resp:
                replies.append(Reply(resp.status, resp.headers, await resp.read(), index))
        else:
            replies.append(
                await client_call(http, replicas, index, authorization=authorization, path=probe)
            )

    for reply in replies:
        assert reply.status == 401, reply.body
        assert reply.error["code"] == code
        assert reply.error["type"] == "invalid_request_error"
        assert "RateLimit" not in reply.headers
        token = (authorization or "").partition(" ")[2]
        assert not token or token.encode() not in reply.body  # never echoed
    assert fake.count(probe) == 0


async def test_user_limit_spans_sessions_and_replicas(
    fake: FakeUpstream,
    aof_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    gateways = [
        GatewayProcess(
            fake.url,
            redis_url=aof_redis.url,
            env={"GATEWAY_USER_MAX_REQUESTS_PER_1_MINUTE": "5"},
        )
        for _ in range(2)
    ]
    async with running(gateways):
        user = f"user_{uuid.uuid4().hex[:8]}"
        one = await create_session(http, gateways[0], limit=10, user=user)
        two = await create_session(http, gateways[1], limit=10, user=user)
        replies = await asyncio.gather(
            *(
                client_call(http, gateways, i, secret=(one, two)[i // 2 % 2]["client_secret"])
                for i in range(20)
            )
        )
    assert statuses(replies) == {200: 5, 429: 15}
    assert reached(fake, one["client_secret"]) + reached(fake, two["client_secret"]) == 5
    for reply in replies:
        if reply.status == 429:
            check_429(reply, limit=5)
            assert "user allows 5 requests" in reply.error["message"]
        else:
            assert reply.headers["RateLimit-Policy"] == '"session";q=10;w=60, "user";q=5;w=60'


def _counter(samples: Samples, name: str, **labels: str) -> float:
    return metric_value(samples, name, **labels) or 0.0


async def test_report_only_mode_admits_but_reports(
    fake: FakeUpstream,
    aof_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    async with running(
        [GatewayProcess(fake.url, redis_url=aof_redis.url, env={"GATEWAY_ENFORCE": "false"})]
    ) as (gateway,):
        before = await scrape(http, gateway.url)
        session = await create_session(http, gateway, limit=2)
        secret = session["client_secret"]
        replies = [await client_call(http, [gateway], 0, secret=secret) for _ in range(5)]
        unknown = f"ek_{secrets.token_urlsafe(32)}"
        stranger = await client_call(http, [gateway], 0, secret=unknown)
        probe = f"/v1/chatkit/probe/{uuid.uuid4().hex}"
        anonymous = await client_call(http, [gateway], 0, path=probe)  # no Authorization
        after = await scrape(http, gateway.url)

    assert [r.status for r in replies] == [200] * 5
    assert reached(fake, secret) == 5  # over the limit, and still forwarded
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == [
        "1",
        "0",
        "0",
        "0",
        "0",
    ]
    for reply in replies[2:]:
        assert reply.headers["RateLimit"].startswith('"session";r=0;')
        assert "Retry-After" not in reply.headers  # nothing was refused
    assert stranger.status == 200
    assert reached(fake, unknown) == 1
    assert anonymous.status == 200
    assert fake.count(probe) == 1

    name = "chatkit_gateway_report_only_would_reject_total"
    assert (
        _counter(after, name, outcome="rate_limited")
        - _counter(before, name, outcome="rate_limited")
        == 3
    )
    for outcome in ("unknown", "malformed"):
        assert _counter(after, name, outcome=outcome) - _counter(before, name, outcome=outcome) == 1


async def test_openai_sdk_retries_a_429_after_the_advertised_wait(
    fake: FakeUpstream, aof_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    events: list[tuple[str, float, int | None, dict[str, str]]] = []

    async def on_request(request: httpx2.Request) -> None:
        events.append(("request", time.monotonic(), None, {}))

    async def on_response(response: httpx2.Response) -> None:
        events.append(("response", time.monotonic(), response.status_code, dict(response.headers)))

    async with running(
        [GatewayProcess(fake.url, redis_url=aof_redis.url, env={"GATEWAY_WINDOW_SECONDS": "2"})]
    ) as (gateway,):
        session = await create_session(http, gateway, limit=1)
        secret = session["client_secret"]
        async with (
            httpx2.AsyncClient(
                event_hooks={"request": [on_request], "response": [on_response]}
            ) as transport,
            openai.AsyncOpenAI(
                api_key=secret,
                base_url=f"{gateway.url}/v1",
                max_retries=2,
                http_client=transport,
            ) as client,
        ):
            first = await client.post("/chatkit/conversation", body={"n": 1}, cast_to=object)
            started = time.monotonic()
            second = await client.post("/chatkit/conversation", body={"n": 2}, cast_to=object)
            elapsed = time.monotonic() - started

    assert isinstance(first, dict)
    assert isinstance(second, dict)
    assert second["object"] == "chatkit.echo"
    assert [(kind, status) for kind, _, status, _ in events] == [
        ("request", None),
        ("response", 200),
        ("request", None),
        ("response", 429),
        ("request", None),  # the SDK's retry
        ("response", 200),
    ]
    refused_at, headers = events[3][1], events[3][3]
    wait = int(headers["retry-after-ms"]) / 1000
    assert 0 < wait <= 2
    assert events[4][1] - refused_at >= wait - 0.01  # it waited as told, not its own backoff
    assert elapsed >= wait
    assert reached(fake, secret) == 2


# -- one Redis command per decision ----------------------------------------------------

# What admit.lua calls; INFO commandstats counts calls made inside scripts too.
SCRIPT_COMMANDS = {
    "time",
    "exists",
    "hmget",
    "zremrangebyscore",
    "zcard",
    "zrange",
    "zadd",
    "pexpire",
}
# Per connection, not per request: redis-py introduces itself (HELLO, CLIENT
# SETINFO) when a replica's pool opens a connection.
CONNECTION_SETUP = {"hello", "client|setinfo"}
#: Liveness checks on a timer (the readiness monitor's PING, the revocation
#: feed's keepalive): a few per replica whatever the traffic, never per request.
TIMED_CHECKS = {"ping"}


async def _commandstats(client: redis.asyncio.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


async def test_each_client_request_costs_exactly_one_redis_command(
    replicas: Sequence[GatewayProcess],
    aof_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    async def load() -> tuple[list[Reply], dict[str, int]]:
        """160 requests: 3 sessions x 40 (20 admitted each) and 40 unknown secrets."""
        sessions = [await create_session(http, replicas[i], limit=20) for i in range(3)]
        keys = [s["client_secret"] for s in sessions] + [f"ek_{secrets.token_urlsafe(24)}"]
        client = aof_redis.client()
        try:
            # Sessions are registered before the measurement starts.
            await client.config_resetstat()
            replies = await asyncio.gather(
                *(client_call(http, replicas, i, secret=keys[i % 4]) for i in range(160))
            )
            stats = await _commandstats(client)
        finally:
            await client.aclose()
        assert statuses(replies) == {200: 60, 429: 60, 401: 40}
        return replies, stats

    await load()  # warm-up: the replicas' connection pools reach their working size
    replies, stats = await load()

    requests = len(replies)
    stats.pop("config|resetstat")
    assert stats.pop("evalsha") == requests
    # Each EVALSHA ran the script exactly once (no NOSCRIPT, no second try):
    # the script calls TIME, EXISTS and HMGET once per run, and nothing else
    # the gateway does calls them.
    for name in ("time", "exists", "hmget"):
        assert stats[name] == requests, name
    others = {
        name: calls
        for name, calls in stats.items()
        if name not in SCRIPT_COMMANDS | CONNECTION_SETUP | TIMED_CHECKS
    }
    assert others == {}, f"commands besides EVALSHA during the load: {others}"
    # Timed checks run every few seconds per replica: bounded by the clock.
    assert stats.get("ping", 0) <= 20, f"{stats.get('ping')} pings during the load"
    setup = sum(stats.get(name, 0) for name in CONNECTION_SETUP)
    assert setup <= requests // 10, f"{setup} connection set-ups for {requests} requests"
    print(f"\n{requests} client requests -> Redis commandstats: {stats}")


# -- surviving Redis: script cache flushed, server restarted --------------------------


async def test_script_flush_during_traffic_is_survived(
    replicas: Sequence[GatewayProcess],
    fake: FakeUpstream,
    aof_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    limit = 25
    session = await create_session(http, replicas[0], limit=limit)
    secret = session["client_secret"]
    client = aof_redis.client()
    replies: list[Reply] = []
    counter = iter(range(10**6))

    async def worker(total: int) -> None:
        while (index := next(counter)) < total:
            replies.append(await client_call(http, replicas, index, secret=secret))

    try:
        await client.config_resetstat()
        first = [asyncio.create_task(worker(3 * limit + 5)) for _ in range(6)]
        # Flush once traffic is flowing: the next EVALSHA on every replica
        # finds the cache empty.
        await eventually(
            lambda: len(replies) >= 10, timeout=30, interval=0.005, what="traffic to flow"
        )
        await client.script_flush()
        await asyncio.gather(*first)
        errors = await client.info("errorstats")
        reloaded = (await client.script_exists(ADMIT_SHA))[0]
    finally:
        await client.aclose()

    assert statuses(replies) == {200: limit, 429: 2 * limit + 5}
    assert reached(fake, secret) == limit
    # The flush really bit: Redis answered NOSCRIPT, and the gateways reloaded.
    assert int(errors.get("errorstat_NOSCRIPT", {}).get("count", 0)) >= 1
    assert reloaded
    # And a fresh session is exact afterwards.
    fresh = (await create_session(http, replicas[1], limit=7))["client_secret"]
    assert statuses(await burst(http, replicas, fresh, 3 * 7 + 5)) == {200: 7, 429: 19}
    assert reached(fake, fresh) == 7


async def test_redis_restart_during_traffic_is_survived(
    replicas: Sequence[GatewayProcess],
    fake: FakeUpstream,
    aof_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    # A: part of its quota used before the restart; it must still be used after.
    a = (await create_session(http, replicas[0], limit=10))["client_secret"]
    assert [(await client_call(http, replicas, i, secret=a)).status for i in range(6)] == [200] * 6
    # B: exhausted before the restart, and hammered throughout it.
    b_limit = 20
    b = (await create_session(http, replicas[1], limit=b_limit))["client_secret"]

    replies: list[tuple[float, Reply]] = []
    stop = asyncio.Event()
    counter = iter(range(10**9))

    async def worker() -> None:
        while not stop.is_set():
            reply = await client_call(http, replicas, next(counter), secret=b)
            replies.append((time.monotonic(), reply))

    workers = [asyncio.create_task(worker()) for _ in range(6)]
    try:
        await eventually(
            lambda: sum(r.status == 200 for _, r in replies) >= b_limit and len(replies) >= 40,
            timeout=30,
            interval=0.005,
            what="B's quota used up before the restart",
        )
        await asyncio.to_thread(aof_redis.restart)
        restarted = time.monotonic()
        # Keep going until every replica has decided again after the restart.
        await eventually(
            lambda: (
                {r.replica for t, r in replies if t > restarted and r.status == 429} == {0, 1, 2}
            ),
            timeout=30,
            interval=0.005,
            what="every replica deciding again after the restart",
        )
    finally:
        stop.set()
        await asyncio.gather(*workers)

    by_status = statuses([r for _, r in replies])
    assert by_status[200] == b_limit  # not one more, before, during or after
    assert reached(fake, b) == b_limit
    assert set(by_status) <= {200, 429, 503}
    for _, reply in replies:
        if reply.status == 503:
            assert reply.error["code"] == "store_unavailable"
        elif reply.status == 429:
            check_429(reply, limit=b_limit)

    # A's six admissions survived the restart: exactly four remain.
    after = await burst(http, replicas, a, 3 * 10 + 5)
    assert statuses(after) == {200: 4, 429: 31}
    assert reached(fake, a) == 10
    # And a fresh session is exact, on every replica, after the restart.
    c = (await create_session(http, replicas[2], limit=7))["client_secret"]
    assert statuses(await burst(http, replicas, c, 3 * 7 + 5)) == {200: 7, 429: 19}
    assert reached(fake, c) == 7


# -- at rest -------------------------------------------------------------------------


async def test_no_secret_is_at_rest_in_redis(aof_redis: RedisServer, fake: FakeUpstream) -> None:
    # The fake upstream issued every session the module's tests created.
    issued = [session["client_secret"] for session in fake.sessions.values()]
    assert issued, "the module's tests created sessions"
    needles = [s.encode() for s in issued]
    client = aof_redis.client()
    try:
        keys = [key async for key in client.scan_iter(count=1000)]
        assert keys
        for key in keys:
            kind, values = await redis_key_contents(client, key)
            blob = key + b"\x00" + values
            assert not any(needle in blob for needle in needles), key
            if kind != b"stream":  # the capped audit log is shared, see the contract test
                # -1 means no TTL; -2 that the key expired since the scan found it.
                assert await client.pttl(key) != -1, key
    finally:
        await client.aclose()
