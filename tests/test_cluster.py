"""The Redis store on a real three-primary Redis Cluster.

The admission script touches only keys that share the secret's hash tag, so
it runs unchanged on a cluster; these tests prove it on one, including the
script cache being flushed on every primary and a gateway process configured
with GATEWAY_REDIS_CLUSTER=true.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import cast

import aiohttp
import pytest

from gateway.errors import ConfigError
from gateway.ratelimit import Outcome
from gateway.settings import load_settings
from gateway.store.base import AdmitRequest, SessionRecord
from gateway.store.redis import RedisStore, connect
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisCluster, create_session, eventually, subscribed


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as running:
        yield running


@pytest.fixture
async def store(cluster: RedisCluster) -> AsyncIterator[RedisStore]:
    client = connect(cluster.url, cluster=True, timeout=2.0)
    await client.flushall()
    store = RedisStore(client, prefix="ct", pubsub_url=cluster.url)
    yield store
    await store.close()


def _hash(n: int) -> str:
    return f"{n:064x}"


async def test_keys_of_one_secret_share_a_slot_and_sessions_spread_over_primaries(
    store: RedisStore, cluster: RedisCluster
) -> None:
    client = cluster.client()
    try:
        owners = set()
        for n in range(12):
            keys = store.keys.secret(_hash(n))
            slots = {await client.cluster_keyslot(key) for key in keys}
            assert len(slots) == 1, keys
            node = client.get_node_from_key(keys[0])
            assert node is not None, keys
            owners.add(node.name)
        # Twelve secrets land on more than one primary, so the tests below
        # exercise more than one node.
        assert len(owners) > 1
    finally:
        await client.aclose()


async def test_exact_limits_on_every_primary(store: RedisStore) -> None:
    expires = int(time.time()) + 600
    for n in range(6):
        await store.register(SessionRecord(_hash(n), f"cksess_c{n}", "u", expires, n + 1))
    for n in range(6):
        request = AdmitRequest(_hash(n), False, 10, None)
        decisions = await asyncio.gather(*(store.admit(request) for _ in range(n + 4)))
        outcomes = [d.outcome for d in decisions]
        assert outcomes.count(Outcome.ADMITTED) == n + 1
        assert outcomes.count(Outcome.RATE_LIMITED) == 3


async def test_script_flush_on_every_primary_is_recovered(
    store: RedisStore, cluster: RedisCluster
) -> None:
    await store.register(SessionRecord(_hash(1), "cksess_f", "u", int(time.time()) + 600, 2))
    request = AdmitRequest(_hash(1), False, 10, None)
    assert (await store.admit(request)).outcome is Outcome.ADMITTED
    for node in cluster.nodes:
        client = node.client()
        await client.script_flush()
        await client.aclose()
    decisions = await asyncio.gather(store.admit(request), store.admit(request))
    # The NOSCRIPT replies did not run the script, so nothing was counted twice.
    assert sorted(d.outcome for d in decisions) == [Outcome.ADMITTED, Outcome.RATE_LIMITED]


async def test_revocation_by_session_id_and_its_announcement(
    store: RedisStore, cluster: RedisCluster
) -> None:
    await store.register(SessionRecord(_hash(7), "cksess_r", "u", int(time.time()) + 600, 5))
    # An async generator underneath; the Store interface only promises iteration.
    announcements = cast(AsyncGenerator[str | None, None], store.revocations())
    listener = asyncio.ensure_future(anext(announcements))
    # The store subscribes through the node its URL names; wait until that
    # node counts the subscriber, so the announcement cannot be missed.
    node = cluster.nodes[0].client()
    await eventually(lambda: subscribed(node, "ct:revocations"), what="the store to subscribe")
    await node.aclose()
    result = await store.revoke(secret_hash=None, session_id="cksess_r", reason="t", replica="x")
    assert result.secret_hash == _hash(7)
    assert await asyncio.wait_for(listener, 5) == _hash(7)
    await announcements.aclose()
    decision = await store.admit(AdmitRequest(_hash(7), False, 10, None))
    assert decision.outcome is Outcome.REVOKED
    info = await store.lookup("cksess_r")
    assert info is not None
    assert info.status == "revoked"


def test_user_limits_are_refused_on_a_cluster_at_start_up() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_USER_MAX_REQUESTS_PER_1_MINUTE"):
        load_settings(
            {
                "GATEWAY_REDIS_URL": "redis://127.0.0.1:7000",
                "GATEWAY_REDIS_CLUSTER": "true",
                "GATEWAY_USER_MAX_REQUESTS_PER_1_MINUTE": "5",
            }
        )


async def test_gateway_on_a_cluster_admits_exactly_the_limit_and_honours_cancel(
    cluster: RedisCluster, upstream: FakeUpstream
) -> None:
    async with (
        GatewayProcess(
            upstream.url, redis_url=cluster.url, env={"GATEWAY_REDIS_CLUSTER": "true"}
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        session = await create_session(http, gateway.url, limit=4)
        auth = {"Authorization": f"Bearer {session['client_secret']}"}

        async def call() -> int:
            async with http.post(
                f"{gateway.url}/v1/chatkit/conversation", headers=auth, json={}
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call() for _ in range(9)))
        assert sorted(statuses) == [200] * 4 + [429] * 5
        assert upstream.count("/v1/chatkit/conversation") == 4

        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions/{session['id']}/cancel",
            headers={"Authorization": "Bearer sk-test"},
        ) as response:
            assert response.status == 200
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation", headers=auth, json={}
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "client_secret_revoked"
        assert upstream.count("/v1/chatkit/conversation") == 4
