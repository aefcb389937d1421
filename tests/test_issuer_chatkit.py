"""Issuer mode in front of real ``openai-chatkit`` servers.

Two gateway replicas share one Redis; two ChatKit servers (the example's, built
on the real SDK) serve workflows ``wf_a`` and ``wf_b`` and verify the gateway's
signed assertion. Sessions are created and cancelled with the official
``openai`` SDK; client traffic is what ChatKit JS custom mode sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from openai.types.beta.chatkit import ChatSession

from tests.chatkit_server import ChatKitServerProcess, sse_events, threads_create_body
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Replicas,
    assert_never_logged,
    running,
    sdk_cancel,
    sdk_create,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_chatkit-issuer-test-0123456789"
SIGNING_KEY = "chatkit-issuer-test-signing-key-0123456789"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers() -> AsyncIterator[tuple[ChatKitServerProcess, ChatKitServerProcess]]:
    a = ChatKitServerProcess(signing_key=SIGNING_KEY, workflow_ids=["wf_a"])
    b = ChatKitServerProcess(signing_key=SIGNING_KEY, workflow_ids=["wf_b"])
    async with running((a, b)) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    module_redis: RedisServer, servers: tuple[ChatKitServerProcess, ChatKitServerProcess]
) -> AsyncIterator[Replicas]:
    env = {
        "GATEWAY_WORKFLOWS": json.dumps(
            {"wf_a": {"upstream": servers[0].url}, "wf_b": {"upstream": servers[1].url}}
        ),
        "GATEWAY_ISSUER_API_KEYS": API_KEY,
        "GATEWAY_IDENTITY_SIGNING_KEY": SIGNING_KEY,
    }
    a = GatewayProcess("none", redis_url=module_redis.url, env=env)
    b = GatewayProcess("none", redis_url=module_redis.url, env=env)
    async with running((a, b)) as started:
        yield started


@pytest.fixture(autouse=True)
def no_secret_in_any_log(
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    replicas: Replicas,
) -> Iterator[None]:
    yield
    assert_never_logged((*servers, *replicas), [API_KEY], "the issuer API key")
    assert_never_logged((*servers, *replicas), SECRETS, "a client secret")


SECRETS: list[str] = []


async def create(gateway: GatewayProcess, **kwargs: Any) -> ChatSession:
    params: dict[str, Any] = {"user": "alice", "workflow": {"id": "wf_a"}, **kwargs}
    session = await sdk_create(gateway, API_KEY, **params)
    SECRETS.append(session.client_secret)
    return session


def post(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    secret: str,
    text: str,
    **headers: str,
) -> Any:
    """A ``threads.create`` as ChatKit JS custom mode posts it through its fetch."""
    return http.post(
        f"{gateway.url}/chatkit",
        data=threads_create_body(text),
        headers={
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/json",
            **headers,
        },
    )


async def test_a_stream_arrives_event_by_event_with_the_verified_identity(
    replicas: Replicas,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], user="Zoë", workflow={"id": "wf_a", "version": "2"})
    arrivals: list[float] = []
    raw = b""
    async with post(
        http, replicas[1], session.client_secret, "slow 4 0.3", **{"X-ChatKit-User": "mallory"}
    ) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.content.iter_any():
            raw += chunk
            if b"tick" in chunk:
                arrivals.append(time.monotonic())
    ticks = [e for e in sse_events(raw) if "tick" in json.dumps(e)]
    assert len(ticks) >= 4
    # Events 0.3 s apart arrive apart, not in one buffered lump at the end.
    assert arrivals[-1] - arrivals[0] >= 0.6
    seen = [r for r in servers[0].seen() if r.context is not None]
    request = seen[-1]
    assert request.context is not None
    assert request.context.user == "Zoë"
    assert request.context.session_id == session.id
    assert request.context.workflow_id == "wf_a"
    assert request.context.workflow_version == "2"
    assert request.authorization is False, "the client's Authorization reached the server"
    users = [v for n, v in request.chatkit_headers if n == "x-chatkit-user"]
    assert users == ["Zo%C3%AB"], "a spoofed X-ChatKit-User reached the server"


async def test_each_session_reaches_only_its_own_workflows_server(
    replicas: Replicas,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    http: aiohttp.ClientSession,
) -> None:
    before = [len(s.seen()) for s in servers]
    b_session = await create(replicas[0], user="bob", workflow={"id": "wf_b"})
    async with post(http, replicas[0], b_session.client_secret, "hello") as response:
        assert response.status == 200
        await response.read()
    assert len(servers[0].seen()) == before[0]
    assert len(servers[1].seen()) == before[1] + 1
    assert servers[1].seen()[-1].context is not None
    assert servers[1].seen()[-1].context.user == "bob"  # type: ignore[union-attr]


async def test_the_limit_holds_exactly_across_replicas(
    replicas: Replicas,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], rate_limits={"max_requests_per_1_minute": 3})
    before = len(servers[0].seen())

    async def one(i: int) -> int:
        async with post(http, replicas[i % 2], session.client_secret, f"n{i}") as response:
            await response.read()
            status: int = response.status
            return status

    statuses = sorted(await asyncio.gather(*(one(i) for i in range(10))))
    assert statuses == [200] * 3 + [429] * 7
    await servers[0].wait_for(lambda: len(servers[0].seen()) == before + 3)


async def test_cancel_on_one_replica_cuts_a_live_stream_on_the_other(
    replicas: Replicas,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session = await create(a, user="carol")
    raw = b""
    async with post(http, a, session.client_secret, "slow 50 0.1") as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            raw += chunk
            if b"tick" in raw:
                break
        cancelled = await sdk_cancel(b, API_KEY, session.id)
        assert cancelled.status == "cancelled"
        cut = time.monotonic()
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                raw += chunk
        assert time.monotonic() - cut < 2.0
    assert raw.count(b"tick") < 50
    # The ChatKit SDK saw the stream cut (and saves the partial answer).
    await servers[0].wait_for(
        lambda: any(c.session_id == session.id for c in servers[0].cancelled()), timeout=5
    )
    async with post(http, a, session.client_secret, "again") as response:
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (401, "client_secret_revoked")
    assert (await sdk_cancel(a, API_KEY, session.id)).status == "cancelled"  # repeated: still 200
