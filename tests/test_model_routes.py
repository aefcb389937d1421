"""The gateway as a self-hosted ChatKit server's way to the model.

Two gateway replicas share one Redis and hold the only model key; the
example's real ``openai-chatkit`` server answers turns with the Agents SDK,
whose ``AsyncOpenAI`` client has the turn's model token as its key and
replica B as its base URL, while the turns themselves go through replica A.
Behind the replicas, the fake Responses and Chat Completions API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai.types.beta.chatkit import ChatSession

from gateway.store.base import AuditEntry
from gateway.store.redis import RedisStore, connect
from tests.chatkit_server import (
    ModelStack,
    model_stack,
    sse_events,
    threads_create_body,
    turn_token,
)
from tests.fake_model import FakeModel
from tests.harness import (
    GatewayProcess,
    RedisServer,
    assert_never_logged,
    eventually,
    metric_value,
    scrape,
    sdk_cancel,
    sdk_create,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_model-routes-test-0123456789"
WORKFLOW = "wf_model"
MODEL = "gpt-5-mini"
GRACE_SECONDS = 5


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(module_redis: RedisServer, model: FakeModel) -> AsyncIterator[ModelStack]:
    env = {
        "GATEWAY_ISSUER_API_KEYS": API_KEY,
        "GATEWAY_MODEL_TOKEN_GRACE_SECONDS": str(GRACE_SECONDS),
        "GATEWAY_AUDIT_MODEL_USAGE": "true",
    }
    async with model_stack(
        module_redis.url, model, model=MODEL, workflows={WORKFLOW: None}, env=env
    ) as replicas:
        yield replicas


@pytest.fixture(autouse=True)
def key_never_logged(stack: ModelStack, model: FakeModel) -> Iterator[None]:
    yield
    assert_never_logged(stack, [model.api_key], "the model key")


async def create(gateway: GatewayProcess, user: str = "alice") -> ChatSession:
    return await sdk_create(gateway, API_KEY, user=user, workflow={"id": WORKFLOW})


async def post_chatkit(
    gateway: GatewayProcess, secret: str, body: bytes, *, extra: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One ChatKit request with ``secret`` as the bearer: its status and body."""
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gateway.url}/chatkit", data=body, headers={**headers, **(extra or {})}) as r,
    ):
        return r.status, await r.read()


async def turn(gateway: GatewayProcess, secret: str, text: str) -> list[dict[str, Any]]:
    status, body = await post_chatkit(gateway, secret, threads_create_body(text))
    assert status == 200
    return sse_events(body)


def model_client(replica: GatewayProcess, token: str) -> openai.AsyncOpenAI:
    """The official SDK as the ChatKit server holds it: a model token as its key."""
    return openai.AsyncOpenAI(api_key=token, base_url=f"{replica.url}/v1", max_retries=0)


async def after_a_turn(stack: ModelStack, text: str) -> tuple[ChatSession, openai.AsyncOpenAI]:
    """A new session that has had one turn through replica A, and the SDK
    client the ChatKit server would have: that turn's model token, replica B."""
    a, b, chatkit = stack
    session = await create(a)
    await turn(a, session.client_secret, text)
    return session, model_client(b, turn_token(chatkit, session.id))


async def test_a_turn_is_answered_by_the_model_through_the_gateway(
    stack: ModelStack, model: FakeModel
) -> None:
    a, b, chatkit = stack
    session = await create(a)
    calls_before = len(model.calls)
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, b.url)
    events = await turn(a, session.client_secret, "hello model")
    text = json.dumps(events)
    assert "fox" in text
    assert "lazy" in text
    [call] = model.calls[calls_before:]
    # The real key reached the model; the ChatKit server had only its token.
    assert call.path == "/v1/responses"
    assert call.authorization == f"Bearer {model.api_key}"
    token = turn_token(chatkit, session.id)
    assert token.startswith("ckmt_")
    assert token not in json.dumps(call.headers)
    assert call.usage is not None
    async with aiohttp.ClientSession() as http:
        after = await scrape(http, b.url)

    def counted(samples: Any, kind: str) -> float:
        labels = {"workflow": WORKFLOW, "model": MODEL, "kind": kind}
        return metric_value(samples, "chatkit_gateway_model_tokens_total", **labels) or 0.0

    assert counted(after, "output") - counted(before, "output") == call.usage["output"]
    assert counted(after, "input") - counted(before, "input") == (
        call.usage["input"] - call.usage["cached"]
    )


async def test_reads_carry_no_model_token(
    stack: ModelStack,
) -> None:
    a, _, chatkit = stack
    session = await create(a)
    body = json.dumps({"type": "threads.list", "params": {"limit": 5}}).encode()
    status, _ = await post_chatkit(a, session.client_secret, body)
    assert status == 200
    [read] = [
        r for r in chatkit.seen() if r.context is not None and r.context.session_id == session.id
    ]
    assert read.type == "threads.list"
    assert read.header("x-chatkit-model-token") is None


async def test_the_official_sdk_calls_the_model_with_a_token_and_sees_no_usage_chunk(
    stack: ModelStack, model: FakeModel
) -> None:
    _, client = await after_a_turn(stack, "first")
    async with client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    # The gateway asked for usage (to count it) and kept the chunk from a
    # caller that had not asked for it.
    assert model.calls[-1].body["stream_options"] == {"include_usage": True}
    assert model.calls[-1].usage is not None
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == model.answer


@pytest.mark.parametrize(
    "token",
    [
        "ckmt_" + "A" * 43,  # well-formed, never issued
        "not-a-model-token",  # a client secret's shape
    ],
)
async def test_an_invalid_token_is_refused_and_nothing_is_forwarded(
    stack: ModelStack,
    model: FakeModel,
    token: str,
) -> None:
    _, b, _ = stack
    calls = len(model.calls)
    client = model_client(b, token)
    async with client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.responses.create(model=MODEL, input="hi")
    assert caught.value.code == "invalid_model_token"
    assert len(model.calls) == calls


async def test_no_other_path_is_served_to_a_model_token(
    stack: ModelStack, model: FakeModel
) -> None:
    _, client = await after_a_turn(stack, "paths")
    calls = len(model.calls)
    async with client:
        with pytest.raises(openai.NotFoundError):
            await client.models.list()
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("resp_123")
    assert len(model.calls) == calls


async def test_a_token_dies_after_its_grace(stack: ModelStack, model: FakeModel) -> None:
    _, client = await after_a_turn(stack, "grace")

    async def refused() -> bool:
        try:
            await client.responses.create(model=MODEL, input="still?")
        except openai.AuthenticationError:
            return True
        return False

    async with client:
        await eventually(refused, timeout=GRACE_SECONDS + 10, what="the grace to end")


async def test_cancelling_the_session_refuses_its_token_and_cuts_its_model_stream(
    stack: ModelStack, model: FakeModel
) -> None:
    a, _, _ = stack
    session, client = await after_a_turn(stack, "before cancel")
    model.hold = asyncio.Event()
    try:
        async with client:
            stream = await client.responses.create(model=MODEL, input="long", stream=True)
            await eventually(lambda: model.streams_open == 1, what="the model stream")
            loop = asyncio.get_running_loop()
            cancelled_at = loop.time()
            await sdk_cancel(a, API_KEY, session.id)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
            assert loop.time() - cancelled_at < 2.0
            with pytest.raises(openai.AuthenticationError):
                await client.responses.create(model=MODEL, input="after")
    finally:
        model.hold.set()
        model.hold = None


async def test_a_client_cannot_bring_its_own_model_token_nor_use_one_as_a_secret(
    stack: ModelStack, model: FakeModel
) -> None:
    a, _, chatkit = stack
    session = await create(a)
    status, _ = await post_chatkit(
        a,
        session.client_secret,
        threads_create_body("forged"),
        extra={"X-ChatKit-Model-Token": "ckmt_forged"},
    )
    assert status == 200
    # The server got the gateway's token for this turn, and only that one.
    [seen] = [
        r for r in chatkit.seen() if r.context is not None and r.context.session_id == session.id
    ]
    tokens = [v for k, v in seen.chatkit_headers if k == "x-chatkit-model-token"]
    assert len(tokens) == 1
    assert tokens[0] != "ckmt_forged"
    # A model token is no client secret: the ChatKit routes refuse it.
    status, _ = await post_chatkit(a, tokens[0], b'{"type": "threads.list", "params": {}}')
    assert status == 401


async def test_a_turns_usage_is_audited_once_its_last_call_has_settled(
    stack: ModelStack,
    model: FakeModel,
    module_redis: RedisServer,
) -> None:
    a, _, _ = stack
    session = await create(a)
    first = len(model.calls)
    await turn(a, session.client_secret, "audit me")
    [call] = model.calls[first:]
    assert call.usage is not None
    store = RedisStore(
        connect(module_redis.url, cluster=False, timeout=5.0), pubsub_url=module_redis.url
    )
    found: list[AuditEntry] = []

    async def audited() -> bool:
        found[:] = [
            e
            for e in await store.audit_tail(1000)
            if e.reason == "model_usage" and e.session_id == session.id
        ]
        return bool(found)

    try:
        await eventually(audited, timeout=GRACE_SECONDS + 20, what="the turn's audit entry")
    finally:
        await store.close()
    [entry] = found
    assert entry.usage is not None
    assert entry.usage["calls"] == 1
    assert entry.usage["input_tokens"] == call.usage["input"]
    assert entry.usage["output_tokens"] == call.usage["output"]
    assert entry.usage["total_tokens"] == call.usage["input"] + call.usage["output"]
