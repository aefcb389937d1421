"""A cancel revokes the session's secret on every replica, and is never lost.

Two gateway replicas (A and B) share one real Redis; the official ``openai``
SDK creates and cancels sessions, and client traffic is plain HTTP with the
client secret as a bearer token. The fake upstream's request records show
which requests reached it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio

from gateway.auth import SecretHasher
from tests import fake_upstream
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Replicas,
    assert_never_logged,
    converse,
    eventually,
    metric_value,
    open_stream,
    openai_sdk,
    running,
    scrape,
    sdk_cancel,
    sdk_create,
    until_closed,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "sk-test-cancel"
CONVERSATION = "/v1/chatkit/conversation"
REVOCATION_TTL = 7200  # not the default, so the test sees the setting applied
RETENTION = 3600  # GATEWAY_SESSION_RETENTION_SECONDS
UPSTREAM_READ_TIMEOUT = 3.0  # the "stall" row waits this long for its 504
HASH = SecretHasher(None)  # no GATEWAY_SECRET_PEPPER is configured

# -- fixtures: one Redis, one fake upstream, two replicas for the module ----------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(aof_redis: RedisServer, fake: FakeUpstream) -> AsyncIterator[Replicas]:
    def replica(name: str) -> GatewayProcess:
        return GatewayProcess(
            fake.url,
            redis_url=aof_redis.url,
            env={
                "GATEWAY_REPLICA_ID": name,
                # Short, so a paused Redis fails a write quickly; not shorter,
                # so a busy machine does not make a healthy Redis look down.
                "GATEWAY_REDIS_TIMEOUT": "1.0",
                "GATEWAY_UPSTREAM_READ_TIMEOUT": str(UPSTREAM_READ_TIMEOUT),
                "GATEWAY_REVOCATION_TTL_SECONDS": str(REVOCATION_TTL),
                "GATEWAY_SESSION_RETENTION_SECONDS": str(RETENTION),
            },
        )

    async with running((replica("replica-a"), replica("replica-b"))) as started:
        yield started


@pytest.fixture(autouse=True)
def fresh(aof_redis: RedisServer, fake: FakeUpstream, replicas: Replicas) -> Iterator[None]:
    """Each test starts with a running Redis and a fake without faults or records,
    and ends with no client secret the upstream ever issued in either replica's log."""
    aof_redis.ensure_running()
    fake.clear_faults()
    fake.reset_records()
    fake.cancel_shape = "full"
    yield
    aof_redis.ensure_running()
    issued = [session["client_secret"] for session in fake.sessions.values()]
    assert_never_logged(replicas, issued, "a client secret")


# -- helpers --------------------------------------------------------------------


async def create_session(gateway: GatewayProcess, **extra: Any) -> tuple[str, str, int]:
    """(session id, client secret, expires_at) of a session created through ``gateway``."""
    session = await sdk_create(
        gateway, API_KEY, user="user_cancel", workflow={"id": "wf_cancel"}, **extra
    )
    return session.id, session.client_secret, session.expires_at


async def unseen_session(http: aiohttp.ClientSession, fake: FakeUpstream) -> str:
    """The id of a session created on the upstream directly: no replica ever saw it."""
    async with http.post(
        f"{fake.url}/v1/chatkit/sessions",
        json={"user": "user_elsewhere", "workflow": {"id": "wf_cancel"}},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as response:
        assert response.status == 200
        session_id: str = (await response.json())["id"]
    return session_id


REVOKED = (401, "client_secret_revoked")
ADMITTED = (200, None)


async def everywhere(
    http: aiohttp.ClientSession, replicas: Replicas, secret: str
) -> list[tuple[int, str | None]]:
    """What each replica answers a client request with ``secret``."""
    return [await converse(http, gateway, secret) for gateway in replicas]


async def metric(
    http: aiohttp.ClientSession, gateway: GatewayProcess, name: str, **labels: str
) -> float:
    """One sample of the replica's /metrics (0 when the labelled child does not exist yet)."""
    return metric_value(await scrape(http, gateway.url), name, **labels) or 0.0


async def redis_flag(server: RedisServer, key: str) -> tuple[bool, int]:
    """(exists, TTL in seconds) of a key, read with a client of the test's own."""
    client = server.client(socket_timeout=2)
    try:
        exists = bool(await client.exists(key))
        ttl = int(await client.ttl(key))
    finally:
        await client.aclose()
    return exists, ttl


def secret_key(secret: str) -> str:
    return f"ckg:{{{HASH(secret.encode())}}}:r"


def session_key(session_id: str) -> str:
    return f"ckg:{{sid:{session_id}}}:r"


def cancel_path(session_id: str) -> str:
    return f"/v1/chatkit/sessions/{session_id}/cancel"


# -- the cancel flow ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cancel_shape",
    [
        "full",  # the cancel reply echoes client_secret: both hash sources agree
        "stale",  # the API reference's example: no client_secret, the registry alone
    ],
)
async def test_cancel_through_one_replica_revokes_the_secret_on_every_replica(
    replicas: Replicas, fake: FakeUpstream, http: aiohttp.ClientSession, cancel_shape: str
) -> None:
    a, b = replicas
    fake.cancel_shape = cancel_shape  # type: ignore[assignment]
    session_id, secret, _ = await create_session(a)
    assert await converse(http, a, secret) == (200, None)
    assert await converse(http, b, secret) == (200, None)

    async with openai_sdk(b, API_KEY) as client:
        raw = await client.beta.chatkit.sessions.with_raw_response.cancel(session_id)
    cancelled = raw.parse()

    assert raw.status_code == 200
    assert cancelled.id == session_id
    assert cancelled.status == "cancelled"
    assert raw.headers["x-chatkit-gateway-revocation"] == "stored"
    upstream_answer = raw.http_response.json()
    if cancel_shape == "full":
        assert upstream_answer == fake.sessions[session_id]
    else:
        assert "client_secret" not in upstream_answer
        assert upstream_answer["cancelled_at"] > 0
    reached = fake.count(CONVERSATION)
    assert await everywhere(http, replicas, secret) == [REVOKED, REVOKED]
    assert fake.count(CONVERSATION) == reached == 2


@pytest.mark.parametrize(
    ("fault", "params", "error", "status"),
    [
        # the upstream does not know the session
        ("status", {"status": 404}, openai.NotFoundError, 404),
        # the upstream refuses (the SDK would retry this; max_retries=0 here)
        ("status", {"status": 409}, openai.ConflictError, 409),
        # the upstream fails
        ("status", {"status": 500}, openai.InternalServerError, 500),
        # the upstream never answers: the gateway gives up with 504
        ("stall", {}, openai.InternalServerError, 504),
    ],
)
async def test_failed_cancel_leaves_the_secret_admitted(
    replicas: Replicas,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    aof_redis: RedisServer,
    fault: Any,
    params: dict[str, Any],
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    a, b = replicas
    session_id, secret, _ = await create_session(a)
    fake.inject(fault, path_prefix=cancel_path(session_id), **params)

    async with openai_sdk(b, API_KEY) as client:
        with pytest.raises(error) as raised:
            await client.beta.chatkit.sessions.cancel(session_id)

    assert raised.value.status_code == status
    assert fake.count(cancel_path(session_id)) == 1
    assert await everywhere(http, replicas, secret) == [ADMITTED, ADMITTED]
    assert await redis_flag(aof_redis, secret_key(secret)) == (False, -2)
    assert await redis_flag(aof_redis, session_key(session_id)) == (False, -2)


async def test_a_cancel_the_sdk_retries_after_an_upstream_failure_revokes_once_it_succeeds(
    replicas: Replicas, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    session_id, secret, _ = await create_session(a)
    fake.inject(
        "status",
        path_prefix=cancel_path(session_id),
        status=500,
        headers={"retry-after-ms": "10"},  # retry at once rather than after ~0.5 s
    )

    async with openai_sdk(b, API_KEY, max_retries=2) as client:
        cancelled = await client.beta.chatkit.sessions.cancel(session_id)

    assert cancelled.status == "cancelled"
    assert [seen.status for seen in fake.requests if seen.path == cancel_path(session_id)] == [
        500,
        200,
    ]
    assert await everywhere(http, replicas, secret) == [REVOKED, REVOKED]


async def test_cancelling_an_unseen_session_is_recorded_and_a_late_registration_is_born_revoked(
    replicas: Replicas,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    aof_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    session_id = await unseen_session(http, fake)
    unknown_before = await metric(
        http, b, "chatkit_gateway_revocations_total", source="cancel", known="false"
    )

    async with openai_sdk(b, API_KEY) as client:
        raw = await client.beta.chatkit.sessions.with_raw_response.cancel(session_id)

    assert raw.status_code == 200
    assert raw.parse().status == "cancelled"
    assert fake.count(cancel_path(session_id)) == 1
    assert raw.headers["x-chatkit-gateway-revocation"] == "stored"
    unknown_after = await metric(
        http, b, "chatkit_gateway_revocations_total", source="cancel", known="false"
    )
    assert unknown_after == unknown_before + 1
    assert (await redis_flag(aof_redis, session_key(session_id)))[0]

    # A gateway now learns a create response carrying that id (a cancel that
    # raced ahead of the registration): the session is born revoked.
    original = fake_upstream.build_session

    def same_id(body: object, *, now: float) -> fake_upstream.JSONObject:
        return {**original(body, now=now), "id": session_id}

    monkeypatch.setattr(fake_upstream, "build_session", same_id)
    late_id, late_secret, _ = await create_session(a)
    assert late_id == session_id
    assert await everywhere(http, replicas, late_secret) == [REVOKED, REVOKED]
    assert fake.count(CONVERSATION) == 0


async def test_repeated_and_concurrent_cancels_are_harmless(
    replicas: Replicas, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    session_id, secret, _ = await create_session(a)
    assert await converse(http, b, secret) == (200, None)

    async def cancel_through(gateway: GatewayProcess) -> tuple[int, str, str]:
        async with openai_sdk(gateway, API_KEY) as client:
            raw = await client.beta.chatkit.sessions.with_raw_response.cancel(session_id)
        return raw.status_code, raw.parse().status, raw.headers["x-chatkit-gateway-revocation"]

    # Five at once, through both replicas; then once more, as an SDK retry would.
    concurrent = await asyncio.gather(*(cancel_through((a, b)[i % 2]) for i in range(5)))
    repeated = await cancel_through(a)

    assert concurrent == [(200, "cancelled", "stored")] * 5
    assert repeated == (200, "cancelled", "stored")
    assert fake.count(cancel_path(session_id)) == 6
    assert await everywhere(http, replicas, secret) == [REVOKED, REVOKED]


async def test_revocations_expire_with_the_session_or_after_the_configured_ttl(
    replicas: Replicas, fake: FakeUpstream, http: aiohttp.ClientSession, aof_redis: RedisServer
) -> None:
    a, b = replicas
    # A session the gateway knows: the flag lives as long as its record would.
    session_id, secret, expires_at = await create_session(
        a, expires_after={"anchor": "created_at", "seconds": 300}
    )
    await sdk_cancel(b, API_KEY, session_id)
    exists, ttl = await redis_flag(aof_redis, secret_key(secret))
    expected = expires_at + RETENTION - time.time()
    assert exists
    assert expected - 30 <= ttl <= expected + 1, (ttl, expected)

    # A session it never saw: no expiry is known, so GATEWAY_REVOCATION_TTL_SECONDS.
    unseen_id = await unseen_session(http, fake)
    await sdk_cancel(b, API_KEY, unseen_id)
    exists, ttl = await redis_flag(aof_redis, session_key(unseen_id))
    assert exists
    assert REVOCATION_TTL - 30 <= ttl <= REVOCATION_TTL, ttl


# -- never lost: the store fails between the upstream's success and the write --------


@pytest.mark.parametrize(
    "outage",
    [
        "pause",  # SIGSTOP: Redis hangs, writes time out
        "kill",  # SIGKILL, then a restart from the append-only file
    ],
)
async def test_a_revocation_the_store_missed_is_enforced_at_once_and_stored_later(
    replicas: Replicas,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    aof_redis: RedisServer,
    outage: str,
) -> None:
    a, b = replicas
    session_id, secret, _ = await create_session(a)
    assert await converse(http, b, secret) == (200, None)
    # The upstream takes a second to answer the cancel; Redis goes away meanwhile.
    fake.inject("delay", path_prefix=cancel_path(session_id), seconds=1.0)

    async def cancel_through_a() -> Any:
        async with openai_sdk(a, API_KEY) as client:
            return await client.beta.chatkit.sessions.with_raw_response.cancel(session_id)

    cancelling = asyncio.create_task(cancel_through_a())
    await fake.wait_for(lambda: fake.count(cancel_path(session_id)) == 1, timeout=10)
    if outage == "pause":
        aof_redis.pause()
    else:
        aof_redis.kill()
    raw = await cancelling

    # The caller gets the upstream's answer, marked as not yet stored.
    assert raw.status_code == 200
    assert raw.parse().status == "cancelled"
    assert raw.headers["x-chatkit-gateway-revocation"] == "pending"
    # Enforced by this replica at once, without Redis (any Redis call would 503).
    reached = fake.count(CONVERSATION)
    assert await converse(http, a, secret) == (401, "client_secret_revoked")
    assert fake.count(CONVERSATION) == reached
    assert await metric(http, a, "chatkit_gateway_revocations_pending") == 1

    if outage == "pause":
        aof_redis.resume()
    else:
        aof_redis.start()

    async def stored() -> bool:
        return (await redis_flag(aof_redis, secret_key(secret)))[0]

    await eventually(stored, timeout=30, what="the pending revocation reached Redis")

    async def drained() -> bool:
        return await metric(http, a, "chatkit_gateway_revocations_pending") == 0

    await eventually(drained, timeout=10, what="replica A's pending count back to 0")
    answers: list[tuple[int, str | None]] = []

    async def b_says_revoked() -> bool:
        # After a restart each pooled Redis connection fails its first command
        # (redis-py finds out it is dead only by using it), which the gateway
        # answers 503, failing closed: a rejection too, but not yet the verdict.
        answers.append(await converse(http, b, secret))
        return answers[-1] == (401, "client_secret_revoked")

    await eventually(b_says_revoked, timeout=10, what="replica B rejects the secret as revoked")
    assert set(answers) <= {(401, "client_secret_revoked"), (503, "store_unavailable")}
    assert await converse(http, a, secret) == (401, "client_secret_revoked")
    assert fake.count(CONVERSATION) == reached


async def test_a_cancel_while_redis_is_down_is_enforced_by_the_replica_that_saw_the_session(
    replicas: Replicas, fake: FakeUpstream, http: aiohttp.ClientSession, aof_redis: RedisServer
) -> None:
    # Redis is down before the cancel, so the registry cannot be read, and
    # the reply has no client_secret: only the replica's memory of the
    # sessions it saw created can name the secret to refuse.
    a, _ = replicas
    fake.cancel_shape = "stale"
    session_id, secret, _ = await create_session(a)
    aof_redis.pause()
    async with openai_sdk(a, API_KEY) as client:
        raw = await client.beta.chatkit.sessions.with_raw_response.cancel(session_id)
    assert raw.status_code == 200
    assert raw.headers["x-chatkit-gateway-revocation"] == "pending"
    reached = fake.count(CONVERSATION)
    assert await converse(http, a, secret) == (401, "client_secret_revoked")
    assert fake.count(CONVERSATION) == reached
    aof_redis.resume()

    async def stored() -> bool:
        return (await redis_flag(aof_redis, secret_key(secret)))[0]

    await eventually(stored, timeout=30, what="the pending revocation reached Redis")


# -- streams in flight ----------------------------------------------------------------

STREAM_EVENTS = 100  # 10 s of events at 0.1 s: far from their natural end in these tests


async def test_open_streams_close_on_every_replica_within_two_seconds_of_a_cancel(
    replicas: Replicas, http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    session_id, secret, _ = await create_session(a)
    streams = [
        await open_stream(http, a, secret, events=STREAM_EVENTS),
        await open_stream(http, b, secret, events=STREAM_EVENTS),
    ]
    readers = [asyncio.create_task(until_closed(r)) for r in streams]

    await sdk_cancel(b, API_KEY, session_id)
    cancelled_at = time.monotonic()
    async with asyncio.timeout(15):
        results = await asyncio.gather(*readers)

    for (seen, ended), where in zip(results, ("A", "B"), strict=True):
        assert seen < STREAM_EVENTS, f"the stream on replica {where} ran to its end"
        assert ended - cancelled_at < 2.0, f"replica {where} took {ended - cancelled_at:.2f}s"


async def test_a_request_waiting_for_the_upstream_is_refused_when_its_secret_is_revoked(
    replicas: Replicas, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    # Admitted on A, then the upstream takes its time; a cancel through B
    # lands meanwhile. The caller gets 401 client_secret_revoked rather than
    # the answer of a request its secret no longer covers.
    a, b = replicas
    session_id, secret, _ = await create_session(a)
    fake.inject("delay", path_prefix=CONVERSATION, seconds=10.0)
    waiting = asyncio.create_task(converse(http, a, secret))
    await fake.wait_for(lambda: fake.active >= 1, timeout=10)
    await sdk_cancel(b, API_KEY, session_id)
    cancelled_at = time.monotonic()
    async with asyncio.timeout(15):
        assert await waiting == (401, "client_secret_revoked")
    assert time.monotonic() - cancelled_at < 2.0
    # And the upstream saw the request go away.
    await fake.wait_for(lambda: fake.active == 0, timeout=10)


async def test_a_stream_is_closed_even_when_its_revocation_was_announced_during_a_feed_gap(
    replicas: Replicas, http: aiohttp.ClientSession, aof_redis: RedisServer
) -> None:
    a, _ = replicas
    session_id, secret, _ = await create_session(a)
    reader = asyncio.create_task(
        until_closed(await open_stream(http, a, secret, events=STREAM_EVENTS))
    )

    # Cut every replica's revocation subscription, then revoke and announce it
    # while nobody listens (one pipeline: no replica can resubscribe in between).
    # Pub/sub does not replay, so only a re-check on resubscribing can find it.
    client = aof_redis.client(socket_timeout=5)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        pipe.set(secret_key(secret), 1, ex=600)
        pipe.set(session_key(session_id), 1, ex=600)
        pipe.publish("ckg:revocations", HASH(secret.encode()))
        killed, *_, listeners = await pipe.execute()
    finally:
        await client.aclose()
    revoked_at = time.monotonic()
    assert killed >= 2  # both replicas were subscribed
    assert listeners == 0  # the announcement reached no one
    async with asyncio.timeout(15):
        seen, ended = await reader

    assert seen < STREAM_EVENTS, "the stream ran to its end"
    assert ended - revoked_at < 2.0, f"closed {ended - revoked_at:.2f}s after the revocation"
