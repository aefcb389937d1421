"""Token and dollar budgets, end to end.

Two gateway replicas share one Redis; the example's real ``openai-chatkit``
server answers turns through replica B with the Agents SDK and the turn's
model token, while turns go through replica A; behind them, the fake
Responses API. What the store charged is read back from Redis and compared
with what the fake reported.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
import redis.asyncio

from gateway.model.budgets import ChargeRecord
from gateway.model.prices import Prices
from gateway.model.usage import Usage
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
    eventually,
    free_port,
    gateway_env,
    sdk_create,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_budgets-test-0123456789"
ADMIN_TOKEN = "budgets-admin-token-0123456789"
ADMIN_PORT = free_port()
MODEL = "gpt-5-mini"
LONG_ANSWER = " ".join(["word"] * 600)
WORKFLOWS = {
    # Generous: usage is counted, nothing refused unless a test spends it.
    "wf_count": {"tokens": {"user": {"1d": 1_000_000}}, "usd": {"user": {"1d": 100.0}}},
    # For the concurrency test: direct calls against a small user budget.
    "wf_tight": {"tokens": {"user": {"1d": 1000}}, "reserve_output_tokens": 20},
    # Spent by one long answer (an output beyond its reservation is charged in full).
    "wf_tokens": {"tokens": {"user": {"1d": 300}}, "reserve_output_tokens": 10},
    "wf_usd": {"usd": {"user": {"1d": 0.001}}, "reserve_output_tokens": 10},
    "wf_chatkit": {
        "tokens": {"user": {"1d": 300}},
        "reserve_output_tokens": 10,
        "limit_answer": "chatkit",
    },
    # A spent budget and turn windows: refused turns must count in none.
    "wf_gate": {
        "tokens": {"user": {"1d": 300}},
        "reserve_output_tokens": 10,
        "limits": {"turn": {"session": {"1d": 3}, "user": {"1d": 3}}},
    },
    "wf_gate_chatkit": {
        "tokens": {"user": {"1d": 300}},
        "reserve_output_tokens": 10,
        "limits": {"turn": {"session": {"1d": 3}, "user": {"1d": 3}}},
        "limit_answer": "chatkit",
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(module_redis: RedisServer, model: FakeModel) -> AsyncIterator[ModelStack]:
    async with model_stack(
        module_redis.url,
        model,
        model=MODEL,
        workflows=WORKFLOWS,
        env={"GATEWAY_ISSUER_API_KEYS": API_KEY},
        env_a={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "GATEWAY_ADMIN_PORT": str(ADMIN_PORT)},
    ) as replicas:
        yield replicas


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(module_redis: RedisServer) -> AsyncIterator[RedisStore]:
    """The replicas' Redis, read the way the gateway reads it."""
    kit = RedisStore(
        connect(module_redis.url, cluster=False, timeout=5.0), pubsub_url=module_redis.url
    )
    yield kit
    await kit.close()


@pytest.fixture(autouse=True)
def answer_restored(model: FakeModel) -> None:
    model.answer = "The quick brown fox jumps over the lazy dog"
    model.ending = "completed"


async def post_turn(gateway: GatewayProcess, secret: str, text: str) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.url}/chatkit",
            data=threads_create_body(text),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        ) as response,
    ):
        return response.status, response.headers, await response.read()


async def charges(store: RedisStore, workflow: str, user: str, count: int) -> list[ChargeRecord]:
    """The user's charges once ``count`` have settled (settling follows the answer)."""
    found: list[ChargeRecord] = []

    async def settled() -> bool:
        found[:] = await store.budget_charges(workflow, user)
        return len(found) >= count

    await eventually(settled, what=f"{count} charges for {user}")
    return found


async def test_usage_charged_equals_usage_reported_across_replicas(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
) -> None:
    a, _, _ = stack
    session = await sdk_create(a, API_KEY, user="carol", workflow={"id": "wf_count"})
    first = len(model.calls)
    for text in ("one", "two"):
        status, _, raw = await post_turn(a, session.client_secret, text)
        assert status == 200
        assert "fox" in json.dumps(sse_events(raw))
    reported = [c.usage for c in model.calls[first:]]
    recorded = await charges(store, "wf_count", "carol", 2)
    price = Prices.load(None)(MODEL)
    assert price is not None
    assert len(recorded) == 2
    for record, usage in zip(recorded, reported, strict=True):
        assert usage is not None
        assert record.session_id == session.id
        assert record.model == MODEL
        assert (
            record.charge.input_tokens,
            record.charge.cached_input_tokens,
            record.charge.output_tokens,
        ) == (usage["input"], usage["cached"], usage["output"])
        assert record.charge.usd_micros == pytest.approx(
            price.cost(Usage(usage["input"], usage["cached"], usage["output"]))
        )


async def test_where_the_money_went_by_admin_api_and_cli(
    stack: ModelStack,
    module_redis: RedisServer,
    store: RedisStore,
) -> None:
    a, _, _ = stack
    session = await sdk_create(a, API_KEY, user="judy", workflow={"id": "wf_count"})
    for text in ("one", "two"):
        assert (await post_turn(a, session.client_secret, text))[0] == 200
    recorded = await charges(store, "wf_count", "judy", 2)
    expected = {
        "calls": 2,
        "input_tokens": sum(r.charge.input_tokens for r in recorded),
        "cached_input_tokens": sum(r.charge.cached_input_tokens for r in recorded),
        "output_tokens": sum(r.charge.output_tokens for r in recorded),
        "total_tokens": sum(r.charge.tokens for r in recorded),
        "usd": round(sum(r.charge.usd_micros for r in recorded) / 1_000_000, 6),
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{ADMIN_PORT}/admin/users/judy/usage",
            params={"workflow": "wf_count"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response,
    ):
        assert response.status == 200
        report = await response.json()
    assert list(report["workflows"]) == ["wf_count"]
    usage = report["workflows"]["wf_count"]
    assert usage["windows"]["1d"] == expected
    assert usage["windows"]["1m"] == expected  # all of it just now
    assert usage["sessions"][session.id]["1d"] == expected
    assert usage["models"][MODEL]["1d"] == expected
    env = {
        **gateway_env("none", port=free_port(), redis_url=module_redis.url),
        "GATEWAY_WORKFLOWS": json.dumps(
            {wf: {"upstream": "http://127.0.0.1:1/chatkit"} for wf in WORKFLOWS}
        ),
        "GATEWAY_ISSUER_API_KEYS": API_KEY,
    }
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "--user", "judy",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await cli.communicate()
    assert cli.returncode == 0, err
    printed = json.loads(out)
    assert sorted(printed["workflows"]) == sorted(WORKFLOWS)
    assert printed["workflows"]["wf_count"]["windows"]["1d"] == expected


async def test_twenty_concurrent_calls_are_admitted_exactly_as_far_as_they_fit(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
) -> None:
    a, b, chatkit = stack
    session = await sdk_create(a, API_KEY, user="dave", workflow={"id": "wf_tight"})
    status, _, _ = await post_turn(a, session.client_secret, "spend a little")
    assert status == 200
    [spent] = await charges(store, "wf_tight", "dave", 1)
    token = turn_token(chatkit, session.id)
    model.hold = asyncio.Event()
    client = openai.AsyncOpenAI(api_key=token, base_url=f"{b.url}/v1", max_retries=0)
    calls_before = len(model.calls)

    async def call() -> str:
        try:
            stream = await client.responses.create(
                model=MODEL, input="x" * 200, max_output_tokens=50, stream=True
            )
            async for _ in stream:
                pass
        except openai.RateLimitError as exc:
            return f"refused: {exc.code}"
        return "admitted"

    try:
        async with client:
            tasks = [asyncio.ensure_future(call()) for _ in range(20)]
            # Every admitted call is held at the model with its reservation
            # standing; every other one has been refused by then.
            await eventually(
                lambda: sum(t.done() for t in tasks) + model.streams_open == 20,
                timeout=30,
                what="each call admitted or refused",
            )
            admitted_calls = model.calls[calls_before:]
            reservation = math.ceil(admitted_calls[0].raw_bytes / 4) + 50
            expected = (1000 - spent.charge.tokens) // reservation
            assert 0 < expected < 20  # "nearly spent": some fit, most do not
            assert model.streams_open == expected
            model.hold.set()
            outcomes = await asyncio.gather(*tasks)
    finally:
        model.hold.set()
        model.hold = None
    assert outcomes.count("admitted") == expected
    assert outcomes.count("refused: budget_exceeded") == 20 - expected
    recorded = await charges(store, "wf_tight", "dave", 1 + expected)
    assert sum(r.charge.tokens for r in recorded) <= 1000  # no overshoot


async def test_a_cut_stream_is_charged_its_reservation(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
) -> None:
    a, b, chatkit = stack
    session = await sdk_create(a, API_KEY, user="erin", workflow={"id": "wf_count"})
    assert (await post_turn(a, session.client_secret, "hi"))[0] == 200
    await charges(store, "wf_count", "erin", 1)
    token = turn_token(chatkit, session.id)
    model.ending = "cut"
    client = openai.AsyncOpenAI(api_key=token, base_url=f"{b.url}/v1", max_retries=0)
    async with client:
        stream = await client.responses.create(
            model=MODEL, input="cut me", max_output_tokens=77, stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    raw_bytes = model.calls[-1].raw_bytes
    recorded = await charges(store, "wf_count", "erin", 2)
    cut = recorded[-1].charge
    assert (cut.input_tokens, cut.output_tokens) == (math.ceil(raw_bytes / 4), 77)


@pytest.mark.parametrize("workflow", ["wf_tokens", "wf_usd"])
async def test_a_spent_daily_budget_stops_the_users_next_turn(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
    workflow: str,
) -> None:
    a, b, _ = stack
    user = f"frank-{workflow}"
    first = await sdk_create(a, API_KEY, user=user, workflow={"id": workflow})
    model.answer = LONG_ANSWER  # more output than reserved: charged in full
    status, _, _ = await post_turn(a, first.client_secret, "spend it all")
    assert status == 200
    await charges(store, workflow, user, 1)
    # The user's next turn, in another session, on either replica: refused.
    second = await sdk_create(b, API_KEY, user=user, workflow={"id": workflow})
    for gateway in (a, b):
        status, headers, raw = await post_turn(gateway, second.client_secret, "more")
        assert status == 429
        error = json.loads(raw)["error"]
        assert error["code"] == "budget_exceeded"
        assert "user's 1d budget" in error["message"]
        assert 0 < int(headers["Retry-After"]) <= 86400
    # Reads are never refused for a spent budget.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{a.url}/chatkit",
            json={"type": "threads.list", "params": {"limit": 5}},
            headers={"Authorization": f"Bearer {second.client_secret}"},
        ) as response,
    ):
        assert response.status == 200
    # Another user of the workflow is not affected.
    other = await sdk_create(a, API_KEY, user=f"grace-{workflow}", workflow={"id": workflow})
    model.answer = "short"
    assert (await post_turn(a, other.client_secret, "hello"))[0] == 200


async def test_a_spent_budget_is_told_in_the_conversation_when_the_workflow_asks(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
) -> None:
    a, _, _ = stack
    session = await sdk_create(a, API_KEY, user="ivan", workflow={"id": "wf_chatkit"})
    model.answer = LONG_ANSWER
    assert (await post_turn(a, session.client_secret, "spend it"))[0] == 200
    await charges(store, "wf_chatkit", "ivan", 1)
    status, headers, raw = await post_turn(a, session.client_secret, "more")
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    [event] = sse_events(raw)
    assert event["type"] == "error"
    assert "user's 1d budget" in event["message"]
    assert int(headers["Retry-After"]) > 0


@pytest.mark.parametrize("workflow", ["wf_gate", "wf_gate_chatkit"])
async def test_turns_refused_for_a_spent_budget_consume_no_quota(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
    module_redis: RedisServer,
    workflow: str,
) -> None:
    """K turns refused for a spent budget, on both replicas, leave the
    session's and the user's turn windows whole and never reach the ChatKit
    server: once the budget frees, the user's turn windows give exactly the
    turns they allow."""
    a, b, chatkit = stack
    user = f"olga-{workflow}"
    first = await sdk_create(a, API_KEY, user=user, workflow={"id": workflow})
    model.answer = LONG_ANSWER
    assert (await post_turn(a, first.client_secret, "spend it all"))[0] == 200  # user: 1 of 3
    await charges(store, workflow, user, 1)
    second = await sdk_create(b, API_KEY, user=user, workflow={"id": workflow})
    for gateway in (a, b, a, b, a):
        status, headers, raw = await post_turn(gateway, second.client_secret, "more")
        if workflow == "wf_gate":
            assert status == 429
            assert json.loads(raw)["error"]["code"] == "budget_exceeded"
        else:
            assert status == 200
            [event] = sse_events(raw)
            assert event["type"] == "error"
            assert "budget" in event["message"]
        assert int(headers["Retry-After"]) > 0
    # The budget frees (its day is over, here: its keys are gone).
    client = redis.asyncio.Redis.from_url(module_redis.url)
    try:
        await client.delete(*store.keys.budget(workflow, user))
    finally:
        await client.aclose()
    model.answer = "short"
    # The user's window allows 3 turns a day and the first session took one:
    # exactly 2 more, as if the 5 refusals had never been.
    assert (await post_turn(a, second.client_secret, "one"))[0] == 200
    assert (await post_turn(b, second.client_secret, "two"))[0] == 200
    status, headers, raw = await post_turn(a, second.client_secret, "three")
    if workflow == "wf_gate":
        assert status == 429
        assert "this user's sessions allow 3 per 1d" in json.loads(raw)["error"]["message"]
    else:
        [event] = sse_events(raw)
        assert "this user's sessions allow 3 per 1d" in event["message"]
    assert '"turn-user-1d";r=0' in headers["ratelimit"]
    reached = [
        r for r in chatkit.seen() if r.context is not None and r.context.session_id == second.id
    ]
    assert len(reached) == 2  # the two admitted turns only


async def test_an_unpriced_model_is_refused_under_a_dollar_budget(
    stack: ModelStack,
    model: FakeModel,
    store: RedisStore,
) -> None:
    a, b, chatkit = stack
    session = await sdk_create(a, API_KEY, user="heidi", workflow={"id": "wf_count"})
    assert (await post_turn(a, session.client_secret, "hi"))[0] == 200
    token = turn_token(chatkit, session.id)
    calls = len(model.calls)
    client = openai.AsyncOpenAI(api_key=token, base_url=f"{b.url}/v1", max_retries=0)
    async with client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="made-up-model", input="hi")
        # A dated snapshot of a priced model is priced; a whole (not streamed)
        # answer is charged its body's usage.
        await client.responses.create(model=f"{MODEL}-2025-08-07", input="hi")
    assert caught.value.code == "model_not_priced"
    assert len(model.calls) == calls + 1
    reported = model.calls[-1].usage
    assert reported is not None
    recorded = await charges(store, "wf_count", "heidi", 2)
    whole = recorded[-1]
    assert whole.model == f"{MODEL}-2025-08-07"
    assert (whole.charge.input_tokens, whole.charge.output_tokens) == (
        reported["input"],
        reported["output"],
    )
    assert whole.charge.usd_micros > 0
