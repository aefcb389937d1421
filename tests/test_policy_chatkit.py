"""Workflow policy in front of a real ``openai-chatkit`` server.

Two gateway replicas share one Redis in front of the example's ChatKit server
(the real SDK). Requests are what ChatKit JS custom mode posts: envelopes to
``POST /chatkit``. Each test counts what the server actually received, so an
admission is proven by the server seeing it, a refusal by it not.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from openai.types.beta.chatkit import ChatSession

from tests.chatkit_server import ChatKitServerProcess, sse_events, threads_create_body
from tests.harness import GatewayProcess, RedisServer, running, sdk_create

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_policy-issuer-test-0123456789"
SIGNING_KEY = "policy-issuer-test-signing-key-0123456789"
POLICIES: dict[str, dict[str, Any]] = {
    # The documented shape: turns per user per day, reads per session per minute.
    "wf_p": {
        "session_limit_counts": "turn",
        "limits": {
            "turn": {"user": {"1d": 4}},
            "read": {"session": {"1m": 5}},
        },
        "models": ["gpt-allowed"],
    },
    # A refused turn answered as ChatKit would, in the conversation.
    "wf_c": {"limit_answer": "chatkit"},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[ChatKitServerProcess]:
    chatkit = ChatKitServerProcess(signing_key=SIGNING_KEY, workflow_ids=list(POLICIES))
    async with running((chatkit,)):
        yield chatkit


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    module_redis: RedisServer, server: ChatKitServerProcess
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    env = {
        "GATEWAY_WORKFLOWS": json.dumps(
            {wf: {"upstream": server.url, "policy": policy} for wf, policy in POLICIES.items()}
        ),
        "GATEWAY_ISSUER_API_KEYS": API_KEY,
        "GATEWAY_IDENTITY_SIGNING_KEY": SIGNING_KEY,
        "GATEWAY_ACCESS_LOG": "true",
    }
    a = GatewayProcess("none", redis_url=module_redis.url, env=env)
    b = GatewayProcess("none", redis_url=module_redis.url, env=env)
    async with running((a, b)) as started:
        yield started


async def create(
    gateway: GatewayProcess, user: str, workflow: str = "wf_p", **kw: Any
) -> ChatSession:
    return await sdk_create(gateway, API_KEY, user=user, workflow={"id": workflow}, **kw)


async def send(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    secret: str,
    envelope: dict[str, Any] | bytes,
) -> tuple[int, bytes, Any]:
    """One custom-mode POST /chatkit: (status, body, headers)."""
    data = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    async with http.post(
        f"{gateway.url}/chatkit",
        data=io.BytesIO(data) if len(data) > 65536 else data,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.read(), response.headers


def turn(text: str, model: str | None = None) -> bytes:
    body = json.loads(threads_create_body(text))
    if model is not None:
        body["params"]["input"]["inference_options"]["model"] = model
    return json.dumps(body).encode()


LIST = {"type": "threads.list", "params": {"limit": 20, "order": "desc"}}


def seen_types(server: ChatKitServerProcess, session_id: str) -> list[str | None]:
    return [
        r.type
        for r in server.seen()
        if r.context is not None and r.context.session_id == session_id
    ]


async def test_a_page_load_of_reads_does_not_consume_turns(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session = await create(a, "page_user", rate_limits={"max_requests_per_1_minute": 2})
    status, raw, _ = await send(http, a, session.client_secret, turn("hello"))
    assert status == 200
    thread_id = next(e["thread"]["id"] for e in sse_events(raw) if e["type"] == "thread.created")
    # What a page load makes: the history, then the open thread and its items.
    reads = [
        LIST,
        {"type": "threads.get_by_id", "params": {"thread_id": thread_id}},
        {"type": "items.list", "params": {"thread_id": thread_id, "limit": 50}},
        LIST,
    ]
    for i, envelope in enumerate(reads):
        status, _, headers = await send(http, (a, b)[i % 2], session.client_secret, envelope)
        assert status == 200, envelope
        assert headers["ratelimit-policy"] == '"read-session-1m";q=5;w=60'
    # Four reads later, the session still has its second turn, and no third.
    assert (await send(http, b, session.client_secret, turn("again")))[0] == 200
    status, body, headers = await send(http, a, session.client_secret, turn("one more"))
    assert status == 429
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    await server.wait_for(lambda: len(seen_types(server, session.id)) == 6)
    assert seen_types(server, session.id) == [
        "threads.create",
        "threads.list",
        "threads.get_by_id",
        "items.list",
        "threads.list",
        "threads.create",
    ]


async def test_the_read_limit_is_exact_across_replicas(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "reader")
    results = await asyncio.gather(
        *(send(http, replicas[i % 2], session.client_secret, LIST) for i in range(12))
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [429] * 7
    refused = next(body for status, body, _ in results if status == 429)
    message = json.loads(refused)["error"]["message"]
    assert "'read' requests" in message
    assert "5 per 1m" in message
    await server.wait_for(lambda: len(seen_types(server, session.id)) == 5)
    assert seen_types(server, session.id) == ["threads.list"] * 5


async def test_a_users_daily_turns_hold_across_the_users_sessions_and_replicas(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    # A fresh session per page load must not multiply the user's turns.
    sessions = [await create((a, b)[i % 2], "daily_user") for i in range(3)]
    statuses = []
    for i in range(6):
        session = sessions[i % 3]
        status, body, headers = await send(http, (a, b)[i % 2], session.client_secret, turn("t"))
        statuses.append(status)
    assert statuses == [200] * 4 + [429] * 2
    error = json.loads(body)["error"]
    assert "'turn' requests: this user's sessions allow 4 per 1d" in error["message"]
    assert 86_000 <= int(headers["retry-after"]) <= 86_400
    assert '"turn-user-1d";q=4;w=86400' in headers["ratelimit-policy"]
    # Another user of the same workflow is untouched.
    other = await create(a, "another_user")
    assert (await send(http, b, other.client_secret, turn("hi")))[0] == 200


async def test_an_unknown_request_type_counts_as_a_turn(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session = await create(a, "future_user", rate_limits={"max_requests_per_1_minute": 1})
    future = {"type": "threads.something_newer", "params": {}}
    status, _, _ = await send(http, a, session.client_secret, future)
    assert status != 429  # admitted and forwarded: the server decides what it means
    status, _, _ = await send(http, b, session.client_secret, turn("after"))
    assert status == 429  # the unknown type took the session's one turn
    await server.wait_for(lambda: len(seen_types(server, session.id)) == 1)
    assert "Unknown ChatKit request type 'threads.something_newer'" in a.output()


async def test_only_the_workflows_models_may_be_asked_for(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "model_user")
    status, body, _ = await send(http, replicas[1], session.client_secret, turn("x", "gpt-dear"))
    error = json.loads(body)["error"]
    assert (status, error["code"], error["param"]) == (
        400,
        "model_not_allowed",
        "params.input.inference_options.model",
    )
    assert (await send(http, replicas[1], session.client_secret, turn("y", "gpt-allowed")))[
        0
    ] == 200
    assert (await send(http, replicas[0], session.client_secret, turn("z")))[0] == 200  # default
    await server.wait_for(lambda: len(seen_types(server, session.id)) == 2)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid_json"),  # not JSON at all
        (b"[1, 2]", "invalid_json"),  # JSON, not an object
        (b'{"params": {}}', "invalid_json"),  # no type
        (b'{"type": 7}', "invalid_json"),  # a type that is not a string
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # nesting past any parser's depth
    ],
)
async def test_a_body_that_is_not_an_envelope_is_refused_and_never_forwarded(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
    body: bytes,
    code: str,
) -> None:
    session = await create(replicas[0], "garbage_user")
    status, answer, _ = await send(http, replicas[1], session.client_secret, body)
    error = json.loads(answer)["error"]
    assert (status, error["code"], error["type"]) == (400, code, "invalid_request_error")
    assert seen_types(server, session.id) == []


async def test_an_envelope_past_its_bound_is_refused(
    replicas: tuple[GatewayProcess, GatewayProcess],
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "big_user")
    padded = {"type": "threads.list", "params": {"pad": "x" * (1024 * 1024)}}
    status, answer, _ = await send(http, replicas[0], session.client_secret, padded)
    assert (status, json.loads(answer)["error"]["code"]) == (413, "request_too_large")


async def test_limit_answer_chatkit_refuses_a_turn_with_an_error_event(
    replicas: tuple[GatewayProcess, GatewayProcess],
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session = await create(a, "chatkit_user", "wf_c", rate_limits={"max_requests_per_1_minute": 1})
    assert (await send(http, a, session.client_secret, turn("first")))[0] == 200
    status, raw, headers = await send(http, b, session.client_secret, turn("second"))
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    [event] = sse_events(raw)
    assert event["type"] == "error"
    assert event["allow_retry"] is True
    assert "Rate limit reached" in event["message"]
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    await server.wait_for(lambda: len(seen_types(server, session.id)) == 1)
    # Counted as a rejection, in the access log with the workflow and class.
    log = b.output()
    assert "outcome=rate_limit_exceeded" in log
    assert "workflow=wf_c class=turn" in log
