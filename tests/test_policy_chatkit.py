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
import jwt
import pytest
import pytest_asyncio
from openai.types.beta.chatkit import ChatSession

from tests.chatkit_server import ChatKitServerProcess, sse_events, threads_create_body
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Replicas,
    eventually,
    metric_value,
    running,
    scrape,
    sdk_create,
)

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
    # Small windows for every class but turn, to count each exactly.
    "wf_k": {
        "limits": {
            "write": {"session": {"1m": 3}},
            "upload": {"session": {"1m": 4}},
            "transcribe": {"session": {"1m": 2}},
        }
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[ChatKitServerProcess]:
    chatkit = ChatKitServerProcess(signing_key=SIGNING_KEY, workflow_ids=list(POLICIES))
    async with running((chatkit,)):
        yield chatkit


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    module_redis: RedisServer, server: ChatKitServerProcess
) -> AsyncIterator[Replicas]:
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


async def server_saw(server: ChatKitServerProcess, session_id: str, count: int) -> list[str | None]:
    """The request types the ChatKit server took for the session, once it has
    taken ``count`` of them (it records what it took on its own time)."""
    await server.wait_for(lambda: len(seen_types(server, session_id)) == count)
    return seen_types(server, session_id)


async def test_a_page_load_of_reads_does_not_consume_turns(
    replicas: Replicas,
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
    assert await server_saw(server, session.id, 6) == [
        "threads.create",
        "threads.list",
        "threads.get_by_id",
        "items.list",
        "threads.list",
        "threads.create",
    ]


async def test_the_read_limit_is_exact_across_replicas(
    replicas: Replicas,
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
    assert await server_saw(server, session.id, 5) == ["threads.list"] * 5


async def test_a_users_daily_turns_hold_across_the_users_sessions_and_replicas(
    replicas: Replicas,
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
    replicas: Replicas,
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
    await server_saw(server, session.id, 1)
    assert "Unknown ChatKit request type 'threads.something_newer'" in a.output()


async def test_only_the_workflows_models_may_be_asked_for(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    # N = 2 turns a minute; the user's daily turn window (4) is wider.
    session = await create(a, "model_user", rate_limits={"max_requests_per_1_minute": 2})
    before = await scrape(http, b.url)
    # K = 3 refused models, on both replicas, before any turn was admitted.
    for i, model in enumerate(["gpt-dear", "gpt-allowed-but-not-quite", ""]):
        status, body, headers = await send(
            http, (a, b)[i % 2], session.client_secret, turn("x", model)
        )
        error = json.loads(body)["error"]
        assert (status, error["code"], error["param"]) == (
            400,
            "model_not_allowed",
            "params.input.inference_options.model",
        )
        assert "ratelimit" not in headers  # decided before any window
    # A refused model consumed nothing: the session still has all N turns.
    statuses = [
        (await send(http, b, session.client_secret, turn("y", "gpt-allowed")))[0],
        (await send(http, a, session.client_secret, turn("z")))[0],  # the server's default
        (await send(http, b, session.client_secret, turn("w", "gpt-allowed")))[0],
    ]
    assert statuses == [200, 200, 429]
    # Only the two admitted turns reached the ChatKit server.
    assert await server_saw(server, session.id, 2) == ["threads.create"] * 2
    # Counted as rejections, not admissions.
    after = await scrape(http, b.url)
    decision = "chatkit_gateway_admission_decisions_total"
    refused = {"outcome": "model_not_allowed", "workflow": "other", "class": "turn", "app": "other"}
    gained = (metric_value(after, decision, **refused) or 0) - (
        metric_value(before, decision, **refused) or 0
    )
    assert gained == 1  # the one of the three that b answered
    await eventually(
        lambda: "outcome=model_not_allowed" in b.output(),
        what="the access-log line of the refusal",
    )


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
    replicas: Replicas,
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
    replicas: Replicas,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "big_user")
    padded = {"type": "threads.list", "params": {"pad": "x" * (1024 * 1024)}}
    status, answer, _ = await send(http, replicas[0], session.client_secret, padded)
    assert (status, json.loads(answer)["error"]["code"]) == (413, "request_too_large")


async def test_limit_answer_chatkit_refuses_a_turn_with_an_error_event(
    replicas: Replicas,
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
    await server_saw(server, session.id, 1)
    # Counted as a rejection, in the access log with the workflow and class.
    # (The line is written once the answer is sent, so it may trail the answer.)
    await eventually(
        lambda: (
            "outcome=rate_limit_exceeded" in b.output() and "workflow=wf_c class=turn" in b.output()
        ),
        what="the access-log line of the refusal",
    )


# -- the session's chatkit_configuration, enforced ------------------------------------

MIB = 1024 * 1024
UPLOADS = {"file_upload": {"enabled": True, "max_file_size": 1, "max_files": 2}}


def attach(size: float) -> dict[str, Any]:
    return {
        "type": "attachments.create",
        "params": {"name": "a.png", "size": size, "mime_type": "image/png"},
    }


async def upload(
    http: aiohttp.ClientSession, gateway: GatewayProcess, secret: str, path: str, size: int
) -> int | None:
    """Stream ``size`` bytes in 64 KiB reads to an upload URL (no Content-Length:
    the gateway can judge only the bytes). The answer's status, or None when the
    gateway closed the connection before the client could read one."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, size, 65536):
            yield b"x" * min(65536, size - start)

    try:
        async with http.post(
            f"{gateway.url}/chatkit/upload/{path}",
            data=chunks(),
            headers={"Authorization": f"Bearer {secret}"},
        ) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError:
        return None


def error_of(raw: bytes) -> tuple[str, str | None]:
    error = json.loads(raw)["error"]
    return error["code"], error["param"]


async def test_uploads_are_refused_when_the_session_disables_them(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "no_files_user")  # file_upload.enabled: false by default
    status, raw, _ = await send(http, replicas[1], session.client_secret, attach(10))
    assert (status, error_of(raw)[0]) == (400, "file_upload_disabled")
    async with http.post(
        f"{replicas[0].url}/chatkit/upload/f1",
        data=b"x" * 100,
        headers={"Authorization": f"Bearer {session.client_secret}"},
    ) as response:
        assert (response.status, error_of(await response.read())[0]) == (
            400,
            "file_upload_disabled",
        )
    assert seen_types(server, session.id) == []
    assert not [u for u in server.uploads() if u[0].endswith("/f1")]


async def test_a_declared_size_over_max_file_size_is_refused(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "big_file_user", chatkit_configuration=UPLOADS)
    status, raw, _ = await send(http, replicas[0], session.client_secret, attach(MIB + 1))
    assert (status, *error_of(raw)) == (400, "file_too_large", "params.size")
    status, raw, _ = await send(http, replicas[0], session.client_secret, attach(float("inf")))
    assert (status, *error_of(raw)) == (400, "file_too_large", "params.size")
    assert seen_types(server, session.id) == []


async def test_max_files_is_exact_across_replicas(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "many_files_user", chatkit_configuration=UPLOADS)
    results = await asyncio.gather(
        *(send(http, replicas[i % 2], session.client_secret, attach(1000)) for i in range(6))
    )
    refused = [error_of(raw) for status, raw, _ in results if status == 400]
    assert refused == [("too_many_files", None)] * 4
    assert await server_saw(server, session.id, 2) == ["attachments.create"] * 2


async def test_an_upload_whose_bytes_exceed_the_size_is_cut_whatever_was_declared(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "liar", chatkit_configuration=UPLOADS)
    # The client declared a small file, then sends 3 MiB to the upload URL.
    assert (await send(http, replicas[0], session.client_secret, attach(1000)))[0] != 400
    status = await upload(http, replicas[1], session.client_secret, "lie", 3 * MIB)
    assert status in (413, None)  # answered 413, or cut before the client read it
    await server.wait_for(lambda: any(u[0].endswith("/lie") for u in server.uploads()))
    [(_, received, complete)] = [u for u in server.uploads() if u[0].endswith("/lie")]
    assert not complete
    # The server never got more than the limit (with multipart framing) and one read.
    assert received <= MIB + 16 * 1024 + 65536
    # A file within the size goes through whole.
    assert await upload(http, replicas[0], session.client_secret, "fine", MIB) == 200
    await server.wait_for(lambda: any(u[0].endswith("/fine") for u in server.uploads()))
    assert [u for u in server.uploads() if u[0].endswith("/fine")] == [
        ("/chatkit/upload/fine", MIB, True)
    ]
    # A Content-Length over the size is refused before any byte is forwarded.
    async with http.post(
        f"{replicas[0].url}/chatkit/upload/declared",
        data=io.BytesIO(b"x" * (2 * MIB)),
        headers={"Authorization": f"Bearer {session.client_secret}"},
    ) as response:
        assert (response.status, error_of(await response.read())[0]) == (413, "file_too_large")
    assert not [u for u in server.uploads() if u[0].endswith("/declared")]


async def test_history_disabled_refuses_the_thread_list_only(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    configuration = {"history": {"enabled": False}}
    session = await create(replicas[0], "no_history", chatkit_configuration=configuration)
    status, raw, _ = await send(http, replicas[1], session.client_secret, LIST)
    assert (status, error_of(raw)[0]) == (400, "history_disabled")
    assert (await send(http, replicas[1], session.client_secret, turn("still talking")))[0] == 200
    assert await server_saw(server, session.id, 1) == ["threads.create"]


async def test_the_whole_configuration_reaches_the_server_as_header_and_claim(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    configuration = {"history": {"enabled": True, "recent_threads": 7}, **UPLOADS}
    session = await create(replicas[0], "configured", chatkit_configuration=configuration)
    assert (await send(http, replicas[1], session.client_secret, LIST))[0] == 200
    await server_saw(server, session.id, 1)
    [request] = [
        r for r in server.seen() if r.context is not None and r.context.session_id == session.id
    ]
    stated = json.loads(request.header("x-chatkit-configuration") or "null")
    assert stated == session.chatkit_configuration.model_dump()
    assert stated["history"]["recent_threads"] == 7
    assertion = request.header("x-chatkit-assertion")
    assert assertion is not None
    claims = jwt.decode(
        assertion, SIGNING_KEY, algorithms=["HS256"], audience="wf_p", issuer="chatkit-gateway"
    )
    assert claims["cfg"] == stated


async def test_admissions_are_counted_by_workflow_and_class(
    replicas: Replicas,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "metered", rate_limits={"max_requests_per_1_minute": 1})
    await send(http, replicas[0], session.client_secret, turn("one"))
    await send(http, replicas[0], session.client_secret, turn("two"))
    await send(http, replicas[0], session.client_secret, LIST)
    async with http.get(f"{replicas[0].url}/metrics") as response:
        text = await response.text()
    samples = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chatkit_gateway_admission_decisions_total{")
    }
    assert samples['app="default",class="turn",outcome="admitted",workflow="wf_p"'] >= 1
    assert samples['app="default",class="turn",outcome="rate_limited",workflow="wf_p"'] >= 1
    assert samples['app="default",class="read",outcome="admitted",workflow="wf_p"'] >= 1
    # Unknown secrets name no workflow: "other", never the client's word.
    assert all('workflow="wf_' in k or 'workflow="other"' in k for k in samples)


@pytest.mark.parametrize(
    ("envelope", "limit"),
    [
        ({"type": "items.feedback", "params": {"item_ids": ["x"], "kind": "positive"}}, 3),
        ({"type": "threads.update", "params": {"thread_id": "x", "title": "t"}}, 3),
        ({"type": "attachments.create", "params": {"name": "a", "size": 1, "mime_type": "t"}}, 4),
        ({"type": "input.transcribe", "params": {"audio_base64": "AAAA", "mime_type": "a"}}, 2),
    ],
)
async def test_each_class_limit_is_exact_across_replicas(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
    envelope: dict[str, Any],
    limit: int,
) -> None:
    session = await create(
        replicas[0],
        f"class_user_{envelope['type']}",
        "wf_k",
        chatkit_configuration={"file_upload": {"enabled": True, "max_files": 100}},
    )
    results = await asyncio.gather(
        *(send(http, replicas[i % 2], session.client_secret, envelope) for i in range(limit + 5))
    )
    # The admitted envelopes name no real thread or item, so the ChatKit
    # server answers them as it likes (200, 400, 404, 500); the statuses are
    # in the message so that a store refusal (503) shows as itself.
    statuses = sorted(status for status, _, _ in results)
    refused = [json.loads(body)["error"]["message"] for status, body, _ in results if status == 429]
    assert len(refused) == 5, statuses  # N admitted, not N + 1
    assert all("per 1m" in message for message in refused)
    assert await server_saw(server, session.id, limit) == [envelope["type"]] * limit


async def test_only_a_transcription_may_exceed_the_envelope_bound(
    replicas: Replicas,
    server: ChatKitServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    session = await create(replicas[0], "speaker", "wf_k")
    audio = "A" * (2 * MIB)  # past the 1 MiB envelope bound, within the transcribe one
    transcribe = {"type": "input.transcribe", "params": {"audio_base64": audio, "mime_type": "a"}}
    status, _, _ = await send(http, replicas[1], session.client_secret, transcribe)
    assert status != 413
    await server.wait_for(lambda: seen_types(server, session.id) == ["input.transcribe"])
    # The body is held before the secret is checked: one whose type comes
    # after 2 MiB is held to the ordinary bound.
    late = json.dumps({"params": {"audio_base64": audio}, "type": "input.transcribe"}).encode()
    status, body, _ = await send(http, replicas[1], session.client_secret, late)
    assert (status, error_of(body)[0]) == (413, "request_too_large")
    assert seen_types(server, session.id) == ["input.transcribe"]
