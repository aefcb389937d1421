"""Apps and bans on the other stores: a real Redis Cluster, and the embedded store.

On a cluster a user's index, an app's window and each session's keys sit in
different hash slots (often on different nodes): two replicas on a
three-primary cluster must still count exactly, evict the oldest session and
cut its stream, and ban a user with every session revoked in its own slot.
The embedded store (one gateway, no Redis) keeps the same rules in-process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import openai
import pytest
import pytest_asyncio

from tests.chatkit_server import ChatKitServerProcess
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisCluster, free_port, running
from tests.test_tenancy import (
    ADMIN_TOKEN,
    APPS,
    BILLING_KEY,
    BURST_KEY,
    LEGACY_KEY,
    SIGNING_KEY,
    STARTUP,
    SUPPORT_KEYS,
    Replica,
    admin,
    create,
    digest,
    ends_within,
    live_stream,
    status_of,
    user_name,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[ChatKitServerProcess]:
    process = ChatKitServerProcess(
        signing_key=SIGNING_KEY, workflow_ids=["wf_a", "wf_b"], startup_timeout=STARTUP
    )
    async with running((process,)):
        yield process


def env_for(server: ChatKitServerProcess, admin_port: int) -> dict[str, str]:
    return {
        "GATEWAY_WORKFLOWS": json.dumps(
            {"wf_a": {"upstream": server.url}, "wf_b": {"upstream": server.url}}
        ),
        "GATEWAY_ISSUER_KEYS": json.dumps(APPS),
        "GATEWAY_ISSUER_API_KEYS": digest(LEGACY_KEY),
        "GATEWAY_IDENTITY_SIGNING_KEY": SIGNING_KEY,
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "GATEWAY_ADMIN_PORT": str(admin_port),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def on_cluster(
    cluster: RedisCluster, server: ChatKitServerProcess, fake: FakeUpstream
) -> AsyncIterator[tuple[Replica, Replica]]:
    made = []
    for _ in range(2):
        admin_port = free_port()
        env = {**env_for(server, admin_port), "GATEWAY_REDIS_CLUSTER": "true"}
        made.append(
            Replica(
                GatewayProcess(fake.url, redis_url=cluster.url, env=env, startup_timeout=STARTUP),
                f"http://127.0.0.1:{admin_port}",
            )
        )
    async with running([r.process for r in made]):
        yield made[0], made[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedded(server: ChatKitServerProcess) -> AsyncIterator[Replica]:
    admin_port = free_port()
    process = GatewayProcess("none", env=env_for(server, admin_port), startup_timeout=STARTUP)
    async with running((process,)):
        yield Replica(process, f"http://127.0.0.1:{admin_port}")


async def test_on_a_cluster_the_create_window_is_exact_and_the_oldest_session_is_cut(
    on_cluster: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    a, b = on_cluster

    async def one(i: int) -> str | None:
        try:
            await create(on_cluster[i % 2], BURST_KEY, user_name(f"cburst{i}"))
        except openai.RateLimitError as exc:
            return exc.code
        return None

    codes = await asyncio.gather(*(one(i) for i in range(9)))
    assert codes.count(None) == 5
    assert codes.count("session_rate_limit_exceeded") == 4

    user = user_name("creload")
    oldest = await create(a, SUPPORT_KEYS[0], user)
    second = await create(b, SUPPORT_KEYS[1], user)
    async with live_stream(http, b, oldest.client_secret) as stream:
        third = await create(a, SUPPORT_KEYS[0], user)
        assert await ends_within(stream, 2.0) < 2.0
    assert await status_of(http, a, oldest.client_secret) == 401
    assert await status_of(http, a, second.client_secret) == 200
    assert await status_of(http, b, third.client_secret) == 200


async def test_on_a_cluster_a_ban_cuts_a_stream_on_the_other_replica_and_refuses_creates(
    on_cluster: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    a, b = on_cluster
    user = user_name("cbanned")
    # Sessions whose keys hash to different slots than the user's index.
    sessions = [
        await create(a, SUPPORT_KEYS[0], user),
        await create(b, LEGACY_KEY, user, workflow="wf_b"),
        await create(a, BILLING_KEY, user, workflow="wf_b"),
    ]
    async with live_stream(http, b, sessions[0].client_secret) as stream:
        status, result = await admin(
            http, a, "POST", "/admin/revoke", {"user": user, "for_seconds": 60}
        )
        assert status == 200
        assert await ends_within(stream, 2.0) < 2.0
    assert result["revoked"] == 3
    for session in sessions:
        assert await status_of(http, b, session.client_secret) == 401
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await create(b, SUPPORT_KEYS[0], user)
    assert refused.value.code == "user_banned"
    status, view = await admin(http, b, "GET", f"/admin/users/{user}")
    assert (status, view["sessions"]) == (200, [])
    assert view["banned_for_seconds"] > 50


async def test_the_embedded_store_keeps_the_same_rules(
    embedded: Replica, http: aiohttp.ClientSession
) -> None:
    user = user_name("embedded")
    with pytest.raises(openai.PermissionDeniedError):
        await create(embedded, BILLING_KEY, user, workflow="wf_a")
    first = await create(embedded, BILLING_KEY, user, workflow="wf_b")
    with pytest.raises(openai.RateLimitError) as refused:
        await create(embedded, BILLING_KEY, user, workflow="wf_b")
    assert refused.value.code == "too_many_active_sessions"
    oldest = await create(embedded, SUPPORT_KEYS[0], user)
    async with live_stream(http, embedded, oldest.client_secret) as stream:
        await create(embedded, SUPPORT_KEYS[1], user)
        await create(embedded, SUPPORT_KEYS[0], user)
        assert await ends_within(stream, 2.0) < 2.0
    status, result = await admin(
        http, embedded, "POST", "/admin/revoke", {"user": user, "for_seconds": 30}
    )
    assert (status, result["revoked"]) == (200, 3)  # billing's and support's two
    assert await status_of(http, embedded, first.client_secret) == 401
    with pytest.raises(openai.PermissionDeniedError):
        await create(embedded, SUPPORT_KEYS[0], user)
    status, app = await admin(http, embedded, "GET", "/admin/apps/support")
    assert (status, app["active_sessions"]) == (200, 0)
