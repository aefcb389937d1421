"""The Redis store behind Redis Sentinel: a failover is followed within seconds.

Real processes: a master, a replica and three ``redis-server --sentinel``
watching them (quorum two). The master is killed, or handed over with
``SENTINEL FAILOVER`` while it keeps running; admissions and the revocation
feed must resume on the promoted replica within seconds, and no session may
be admitted beyond its limit across the change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.auth import SecretHasher
from gateway.errors import ConfigError
from gateway.ratelimit import Outcome
from gateway.settings import load_settings
from gateway.store.base import AdmitRequest, SessionRecord
from gateway.store.redis import RedisStore, connect_sentinel
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisSentinels,
    RedisServer,
    collecting,
    eventually,
    subscribed,
)

API_KEY = "sk-test-sentinel"
CONVERSATION = "/v1/chatkit/conversation"


@pytest.fixture
def sentinels() -> Iterator[RedisSentinels]:
    with RedisSentinels() as running:
        yield running


def _hash(n: int) -> str:
    return f"{n:064x}"


async def _feed_on(server: RedisServer, channel: str) -> bool:
    client = server.client()
    try:
        return await subscribed(client, channel)
    finally:
        await client.aclose()


async def _replicated(master: RedisServer) -> None:
    """Wait until the replica has every write so far: the test is about the
    gateway, not about what asynchronous replication may lose in a crash."""
    client = master.client()
    try:
        assert await client.wait(1, 5000) == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # a master name without sentinels, and sentinels without a name
        ({"GATEWAY_REDIS_SENTINEL_MASTER": "m"}, "go together"),
        ({"GATEWAY_REDIS_SENTINELS": "127.0.0.1:26379"}, "go together"),
        # an address without a port
        (
            {"GATEWAY_REDIS_SENTINELS": "127.0.0.1", "GATEWAY_REDIS_SENTINEL_MASTER": "m"},
            "not host:port",
        ),
        # Sentinel and Cluster are different deployments
        (
            {
                "GATEWAY_REDIS_SENTINELS": "127.0.0.1:26379",
                "GATEWAY_REDIS_SENTINEL_MASTER": "m",
                "GATEWAY_REDIS_URL": "redis://127.0.0.1:7000",
                "GATEWAY_REDIS_CLUSTER": "true",
            },
            "exclude each other",
        ),
    ],
)
def test_sentinel_settings_are_checked_at_start_up(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_sentinels_alone_select_the_redis_store() -> None:
    settings = load_settings(
        {
            "GATEWAY_REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380",
            "GATEWAY_REDIS_SENTINEL_MASTER": "m",
        }
    )
    assert settings.uses_redis
    assert settings.redis_sentinel_list == (("10.0.0.1", 26379), ("::1", 26380))


async def test_a_users_class_windows_span_the_users_sessions_behind_sentinel(
    sentinels: RedisSentinels,
) -> None:
    client = connect_sentinel(
        sentinels.addresses, RedisSentinels.MASTER_NAME, url=None, timeout=2.0
    )
    store = RedisStore(client, prefix="snp", pubsub_url="")
    hasher = SecretHasher(b"sentinel-pepper")
    try:
        expires = int(time.time()) + 600
        hashes = []
        for n in range(2):
            secret = f"ek_{hasher.user_tag('dana')}_sentinel-secret-{n}"
            hashes.append(hasher(secret.encode()))
            record = SessionRecord(
                hashes[-1],
                f"cksess_snp{n}",
                "dana",
                expires,
                50,
                issued=True,
                counts="turn",
                windows={"turn": "u86400:3"},
                models=("gpt-allowed",),
            )
            await store.register(record)
        # A model the workflow does not list is refused before any window counts.
        refused = [
            (await store.admit(AdmitRequest(hashes[n % 2], False, 10, None, "turn", model="x")))
            for n in range(2)
        ]
        assert [d.outcome for d in refused] == [Outcome.MODEL_NOT_ALLOWED] * 2
        # Admissions undone (turns refused for a spent budget) count nowhere.
        for n in range(2):
            request = AdmitRequest(hashes[n], False, 10, None, "turn")
            undone = await store.admit(request)
            assert undone.admitted
            await store.unadmit(request, undone.member)
        outcomes = [
            (await store.admit(AdmitRequest(hashes[n % 2], False, 10, None, "turn"))).outcome
            for n in range(5)
        ]
        assert outcomes == [Outcome.ADMITTED] * 3 + [Outcome.CLASS_RATE_LIMITED] * 2
    finally:
        await store.close()


async def test_a_killed_master_is_replaced_and_admissions_and_the_feed_resume(
    sentinels: RedisSentinels,
) -> None:
    old = sentinels.master()
    client = connect_sentinel(
        sentinels.addresses, RedisSentinels.MASTER_NAME, url=None, timeout=0.5
    )
    store = RedisStore(client, prefix="sn", pubsub_url="", ping_seconds=0.5)
    try:
        async with collecting(store.revocations()) as heard:
            limit = 12
            limited, probe = _hash(1), _hash(2)
            expires = int(time.time()) + 600
            await store.register(SessionRecord(limited, "cksess_lim", "u", expires, limit))
            await store.register(SessionRecord(probe, "cksess_probe", "u", expires, 10_000))
            admitted = 0
            for _ in range(limit // 2):
                decision = await store.admit(AdmitRequest(limited, False, 10, None))
                admitted += decision.outcome is Outcome.ADMITTED
            assert admitted == limit // 2
            await _replicated(old)
            await eventually(lambda: _feed_on(old, "sn:revocations"), what="the feed on the master")

            old.kill()
            killed_at = time.monotonic()
            refused = 0

            async def resumed() -> bool:
                # Load on the limited secret meanwhile: what it is refused must not count.
                nonlocal admitted, refused
                answers = await asyncio.gather(
                    store.admit(AdmitRequest(probe, False, 10, None)),
                    store.admit(AdmitRequest(limited, False, 10, None)),
                    return_exceptions=True,
                )
                probe_answer, limited_answer = answers
                if isinstance(limited_answer, BaseException):
                    refused += 1
                else:
                    admitted += limited_answer.outcome is Outcome.ADMITTED
                return not isinstance(probe_answer, BaseException)

            await eventually(
                resumed, timeout=20, interval=0.05, what="admissions to resume after the failover"
            )
            resumed_at = time.monotonic()
            new = sentinels.master()
            assert new is not old

            # Exactly the limit, across the failover: the counts made before it
            # were on the replica, and the refusals during it counted nothing.
            for _ in range(limit):
                decision = await store.admit(AdmitRequest(limited, False, 10, None))
                admitted += decision.outcome is Outcome.ADMITTED
            assert admitted == limit

            await eventually(lambda: None in heard, timeout=10, what="the feed to resubscribe")
            feed_back_at = time.monotonic()
            await store.revoke(secret_hash=probe, session_id=None, reason="t", replica="x")
            await eventually(lambda: probe in heard, timeout=5, what="the announcement")
            print(
                f"sentinel, master killed: admissions resumed {resumed_at - killed_at:.2f}s "
                f"after the kill ({refused} refused meanwhile); feed back within "
                f"{feed_back_at - killed_at:.2f}s"
            )
            assert resumed_at - killed_at < 10.0
    finally:
        await store.close()


async def _converse(http: aiohttp.ClientSession, gateway: GatewayProcess, secret: str) -> int:
    async with http.post(
        f"{gateway.url}{CONVERSATION}",
        headers={"Authorization": f"Bearer {secret}"},
        json={"type": "threads.create", "params": {}},
    ) as response:
        await response.read()
        return response.status


async def _create(
    http: aiohttp.ClientSession, gateway: GatewayProcess, limit: int
) -> tuple[str, str]:
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "user": "u1",
            "workflow": {"id": "wf_sentinel"},
            "rate_limits": {"max_requests_per_1_minute": limit},
        },
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return body["id"], body["client_secret"]


async def test_a_gateway_follows_a_failover_admits_exactly_the_limit_and_hears_the_new_master(
    sentinels: RedisSentinels, upstream: FakeUpstream
) -> None:
    old = sentinels.master()
    env = {
        "GATEWAY_REDIS_SENTINELS": sentinels.setting,
        "GATEWAY_REDIS_SENTINEL_MASTER": RedisSentinels.MASTER_NAME,
        "GATEWAY_REDIS_TIMEOUT": "1.0",
    }
    async with GatewayProcess(upstream.url, env=env) as gateway, aiohttp.ClientSession() as http:
        # Large enough that the session is still admitted when the master
        # is back, with requests every 50 ms.
        limit = 30
        _, secret = await _create(http, gateway, limit)
        _, streamed = await _create(http, gateway, 100)
        statuses = [await _converse(http, gateway, secret) for _ in range(4)]
        assert statuses == [200] * 4
        await _replicated(old)
        stream = await http.post(
            f"{gateway.url}{CONVERSATION}?events=300&interval=0.1",
            json={"type": "threads.create", "params": {}},
            headers={"Authorization": f"Bearer {streamed}", "Accept": "text/event-stream"},
        )
        assert stream.status == 200

        async def until_closed() -> float:
            try:
                async for _ in stream.content:
                    pass
            except aiohttp.ClientPayloadError:
                pass  # cut off mid-body: what closing a stream looks like to a client
            finally:
                stream.release()
            return time.monotonic()

        reader = asyncio.create_task(until_closed())

        old.kill()
        killed_at = time.monotonic()
        resumed_at: float | None = None

        async def limit_reached() -> bool:
            # Requests all along: refused while no master answers, then counted.
            nonlocal resumed_at
            statuses.append(await _converse(http, gateway, secret))
            if statuses[-1] != 503 and resumed_at is None:
                resumed_at = time.monotonic()
            return statuses[-1] == 429

        await eventually(
            limit_reached, timeout=20, interval=0.05, what=lambda: f"a 429; answers: {statuses}"
        )
        switched = sentinels.master() is not old
        assert switched, "the sentinels never switched masters"
        assert resumed_at is not None
        print(
            f"sentinel, gateway: admissions resumed {resumed_at - killed_at:.2f}s after the "
            f"master was killed ({statuses.count(503)} answered 503 meanwhile)"
        )
        # Refused while no master answered (503, which counts nothing), then
        # exactly the rest of the limit on the promoted replica.
        assert statuses.count(200) == limit, statuses
        assert set(statuses) <= {200, 429, 503}
        assert resumed_at - killed_at < 10.0

        # A revocation announced on the new master reaches the gateway's feed.
        new = sentinels.master()
        client = new.client()
        try:
            secret_hash = SecretHasher(None)(streamed.encode())
            await client.set(f"ckg:{{{secret_hash}}}:r", 1, ex=600)
            await client.publish("ckg:revocations", secret_hash)
        finally:
            await client.aclose()
        revoked_at = time.monotonic()
        try:
            async with asyncio.timeout(15):
                ended = await reader
        except TimeoutError:
            print(gateway.output())
            raise
        print(f"sentinel, gateway: stream closed {ended - revoked_at:.2f}s after the announcement")
        assert ended - revoked_at < 5.0
