"""The self-hosted example: its ChatKit server alone, then the whole chain through a gateway.

The first half talks to the example's ChatKit server directly, as something that
bypassed the gateway would: it must refuse any request without the gateway's
identity (or, with a signing key, without a valid assertion) and keep each
user's threads to that user. The second half runs what ``examples/self-hosted/run``
runs: gateway (issuer mode), ChatKit server and app backend, and checks that a
session minted with the official ``openai`` SDK streams a thread through the
gateway with the right user in the server's context.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest

from tests.chatkit_server import (
    EXAMPLE_DIR,
    ChatKitServerProcess,
    WebAppProcess,
    sse_events,
    threads_create_body,
)
from tests.fake_model import FakeModel
from tests.harness import GatewayProcess, free_port, openai_sdk

SIGNING_KEY = "test-identity-signing-key-0123456789abcdef"  # >= 32 bytes for HS256
WORKFLOW = "wf_example"
API_KEY = "sk-test-example-issuer-key"


def identity(user: str = "alice", session: str = "cksess_alice", **more: str) -> dict[str, str]:
    """The identity headers the gateway adds (user percent-encoded)."""
    headers = {
        "X-ChatKit-User": quote(user, safe=""),
        "X-ChatKit-Session-Id": session,
        "X-ChatKit-Workflow-Id": WORKFLOW,
        "X-ChatKit-Expires-At": str(int(time.time()) + 600),
    }
    headers.update(more)
    return headers


def assertion(key: str = SIGNING_KEY, **overrides: Any) -> str:
    """An assertion as the gateway makes it; ``overrides`` replace or (None) drop claims."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "chatkit-gateway",
        "aud": WORKFLOW,
        "sub": "alice",
        "sid": "cksess_alice",
        "iat": now,
        "exp": now + 60,
        "jti": "req_1",
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str]
) -> tuple[int, bytes]:
    async with http.post(url, data=body, headers=dict(headers)) as response:
        return response.status, await response.read()


def assistant_text(events: list[dict[str, Any]]) -> str:
    """The assistant message's final text, from its ``thread.item.done`` event."""
    for event in events:
        item = event.get("item", {})
        if event["type"] == "thread.item.done" and item.get("type") == "assistant_message":
            return str(item["content"][0]["text"])
    raise AssertionError(f"no finished assistant message in {events}")


# --- the ChatKit server on its own -----------------------------------------------------------


async def test_chatkit_server_refuses_requests_without_the_gateways_identity(
    http: aiohttp.ClientSession,
) -> None:
    async with ChatKitServerProcess() as chatkit:
        status, body = await post(http, chatkit.url, threads_create_body("hi"), {})
        assert status == 401
        assert json.loads(body)["error"]["code"] == "missing_identity"
        [seen] = chatkit.seen()
        assert seen.context is None  # refused before the ChatKit SDK saw anything


async def test_context_is_built_from_the_identity_headers(http: aiohttp.ClientSession) -> None:
    async with ChatKitServerProcess() as chatkit:
        headers = identity(
            user="Zoë 🙂", session="cksess_42", **{"X-ChatKit-Workflow-Version": "3"}
        )
        status, body = await post(http, chatkit.url, threads_create_body("hello there"), headers)
        assert status == 200
        assert assistant_text(sse_events(body)) == "Zoë 🙂 said: hello there"
        [seen] = chatkit.seen()
        assert seen.type == "threads.create"
        assert seen.context is not None
        assert seen.context.user == "Zoë 🙂"  # percent-decoded UTF-8
        assert seen.context.session_id == "cksess_42"
        assert seen.context.workflow_id == WORKFLOW
        assert seen.context.workflow_version == "3"


async def test_threads_are_visible_only_to_the_user_who_made_them(
    http: aiohttp.ClientSession,
) -> None:
    async with ChatKitServerProcess() as chatkit:
        _, body = await post(http, chatkit.url, threads_create_body("mine"), identity("alice"))
        thread_id = sse_events(body)[0]["thread"]["id"]
        list_threads = json.dumps({"type": "threads.list", "params": {}}).encode()
        get_thread = json.dumps(
            {"type": "threads.get_by_id", "params": {"thread_id": thread_id}}
        ).encode()

        _, alices = await post(http, chatkit.url, list_threads, identity("alice"))
        assert [t["id"] for t in json.loads(alices)["data"]] == [thread_id]
        _, bobs = await post(http, chatkit.url, list_threads, identity("bob", "cksess_bob"))
        assert json.loads(bobs)["data"] == []
        status, _ = await post(http, chatkit.url, get_thread, identity("bob", "cksess_bob"))
        assert status == 404  # the same answer as for an id that never existed


async def test_a_workflow_the_server_does_not_serve_is_refused(
    http: aiohttp.ClientSession,
) -> None:
    async with ChatKitServerProcess(workflow_ids=["wf_other"]) as chatkit:
        status, body = await post(http, chatkit.url, threads_create_body("hi"), identity())
        assert status == 401
        assert json.loads(body)["error"]["code"] == "unknown_workflow"


@pytest.fixture(scope="module")
def signed_server() -> Iterator[ChatKitServerProcess]:
    """One server that verifies assertions, for the whole table below."""
    with ChatKitServerProcess(signing_key=SIGNING_KEY) as chatkit:
        yield chatkit


@pytest.mark.parametrize(
    ("make_assertion", "code"),
    [
        # a request that did not come through the gateway
        pytest.param(lambda: None, "missing_assertion", id="none"),
        pytest.param(
            lambda: assertion(key="another-key-of-at-least-32-bytes-0123456789"),
            "invalid_assertion",
            id="signed-with-another-key",
        ),
        # beyond the 5 s leeway
        pytest.param(
            lambda: assertion(exp=int(time.time()) - 30), "invalid_assertion", id="expired"
        ),
        # made for another workflow's server (which may share the key)
        pytest.param(lambda: assertion(aud="wf_other"), "invalid_assertion", id="other-workflow"),
        pytest.param(lambda: assertion(iss="someone-else"), "invalid_assertion", id="other-issuer"),
        # the headers say alice; the signed claim is the one to believe, and they differ
        pytest.param(lambda: assertion(sub="mallory"), "invalid_assertion", id="other-user"),
        pytest.param(
            lambda: assertion(sid="cksess_other"), "invalid_assertion", id="other-session"
        ),
        pytest.param(lambda: assertion(sid=None), "invalid_assertion", id="missing-claim"),
        pytest.param(lambda: "not-a-jwt", "invalid_assertion", id="not-a-jwt"),
    ],
)
async def test_with_a_signing_key_only_a_valid_assertion_is_accepted(
    http: aiohttp.ClientSession,
    signed_server: ChatKitServerProcess,
    make_assertion: Callable[[], str | None],
    code: str,
) -> None:
    token = make_assertion()
    headers = identity() if token is None else identity(**{"X-ChatKit-Assertion": token})
    status, body = await post(http, signed_server.url, threads_create_body("hi"), headers)
    assert status == 401
    assert json.loads(body)["error"]["code"] == code
    # A valid one, on the same server, passes: the refusal was about the token.
    headers = identity(**{"X-ChatKit-Assertion": assertion()})
    status, _ = await post(http, signed_server.url, threads_create_body("hi"), headers)
    assert status == 200


async def test_a_slow_stream_arrives_event_by_event_and_a_cut_is_recorded(
    http: aiohttp.ClientSession,
) -> None:
    async with ChatKitServerProcess() as chatkit:
        arrivals: list[float] = []
        async with http.post(
            chatkit.url, data=threads_create_body("slow 20 0.1"), headers=identity()
        ) as response:
            async for line in response.content:
                if line.startswith(b"data: ") and b"text_delta" in line:
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 3:
                        break  # leaving the block closes the connection mid-stream
        # Three deltas 0.1 s apart arrived separately, not as one buffered burst.
        assert arrivals[-1] - arrivals[0] >= 0.15
        await chatkit.wait_for(lambda: len(chatkit.cancelled()) == 1)
        [cut] = chatkit.cancelled()
        assert (cut.user, cut.session_id) == ("alice", "cksess_alice")


async def test_the_app_backend_reports_an_unreachable_gateway_without_details(
    http: aiohttp.ClientSession,
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with WebAppProcess(gateway_url=nowhere, api_key=API_KEY, workflow_id=WORKFLOW) as app:
        async with http.post(f"{app.base_url}/api/chatkit/session") as response:
            assert response.status == 502
            assert await response.json() == {"error": "session_unavailable"}
        assert API_KEY not in app.output()


# --- the whole example through a gateway (issuer mode) --------------------------------------


def issuer_gateway(chatkit: ChatKitServerProcess, redis_url: str, **more: str) -> GatewayProcess:
    """A gateway that issues sessions for ``WORKFLOW``, served by ``chatkit``.

    There is no OpenAI upstream: the hosted API's address is a closed port.
    """
    env = {
        "GATEWAY_WORKFLOWS": json.dumps({WORKFLOW: {"upstream": chatkit.url}}),
        "GATEWAY_ISSUER_API_KEYS": "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest(),
        **more,
    }
    return GatewayProcess("http://127.0.0.1:9", redis_url=redis_url, env=env)


async def test_a_session_from_the_sdk_streams_a_thread_through_the_gateway(
    http: aiohttp.ClientSession, redis_url: str
) -> None:
    async with (
        ChatKitServerProcess(signing_key=SIGNING_KEY, workflow_ids=[WORKFLOW]) as chatkit,
        issuer_gateway(chatkit, redis_url, GATEWAY_IDENTITY_SIGNING_KEY=SIGNING_KEY) as gateway,
    ):
        async with openai_sdk(gateway, API_KEY) as client:
            session = await client.beta.chatkit.sessions.create(
                user="alice",
                workflow={"id": WORKFLOW},
                rate_limits={"max_requests_per_1_minute": 10},
            )
        assert session.client_secret.startswith("ek_")
        assert session.id.startswith("cksess_")

        headers = {
            "Authorization": f"Bearer {session.client_secret}",
            "X-ChatKit-User": "mallory",  # a client's claim; the gateway must drop it
        }
        arrivals: list[float] = []
        async with http.post(
            f"{gateway.url}/chatkit", data=threads_create_body("slow 3 0.2"), headers=headers
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = b""
            async for line in response.content:
                raw += line
                if b"text_delta" in line:
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 3
        assert arrivals[-1] - arrivals[0] >= 0.3  # passed on as they came, not buffered
        assert "tick 3" in assistant_text(sse_events(raw))

        [seen] = chatkit.seen()
        assert seen.status == 200
        assert seen.context is not None
        assert (seen.context.user, seen.context.session_id) == ("alice", session.id)
        assert seen.context.workflow_id == WORKFLOW
        assert seen.authorization is False  # the secret never reaches the ChatKit server
        assert [v for k, v in seen.chatkit_headers if k == "x-chatkit-user"] == ["alice"]
        assert session.client_secret not in json.dumps(seen.chatkit_headers)


async def test_a_cancel_on_one_replica_ends_the_chatkit_servers_stream_on_the_other(
    http: aiohttp.ClientSession, redis_url: str
) -> None:
    async with (
        ChatKitServerProcess(workflow_ids=[WORKFLOW]) as chatkit,
        issuer_gateway(chatkit, redis_url) as a,
        issuer_gateway(chatkit, redis_url) as b,
    ):
        async with openai_sdk(a, API_KEY) as client:
            session = await client.beta.chatkit.sessions.create(
                user="dave", workflow={"id": WORKFLOW}
            )
            headers = {"Authorization": f"Bearer {session.client_secret}"}
            deltas = 0
            async with http.post(
                f"{b.url}/chatkit", data=threads_create_body("slow 100 0.1"), headers=headers
            ) as response:
                assert response.status == 200
                try:
                    async for line in response.content:
                        if b"text_delta" in line:
                            deltas += 1
                            if deltas == 2:  # live on replica B: cancel on replica A
                                cancelled = await client.beta.chatkit.sessions.cancel(session.id)
                                assert cancelled.status == "cancelled"
                except aiohttp.ClientPayloadError:
                    pass  # the cut may show as an unfinished chunked body
        assert 2 <= deltas < 100, "the stream was not cut"
        # The ChatKit SDK saw its stream end early, as when a browser goes away.
        await chatkit.wait_for(lambda: len(chatkit.cancelled()) == 1)
        assert chatkit.cancelled()[0].session_id == session.id
        status, body = await post(http, f"{b.url}/chatkit", threads_create_body("again"), headers)
        assert status == 401
        assert json.loads(body)["error"]["code"] == "client_secret_revoked"
        assert len(chatkit.seen()) == 1


async def test_the_example_app_backend_mints_a_secret_that_reaches_its_user(
    http: aiohttp.ClientSession, redis_url: str
) -> None:
    async with (
        ChatKitServerProcess(workflow_ids=[WORKFLOW]) as chatkit,
        issuer_gateway(chatkit, redis_url) as gw,
        WebAppProcess(gateway_url=gw.url, api_key=API_KEY, workflow_id=WORKFLOW) as app,
    ):
        async with http.post(
            f"{app.base_url}/api/chatkit/session", cookies={"example_user": "carol"}
        ) as response:
            assert response.status == 200, await response.text()
            minted = await response.json()
        assert minted["expires_at"] > time.time()

        headers = {"Authorization": f"Bearer {minted['client_secret']}"}
        status, body = await post(http, f"{gw.url}/chatkit", threads_create_body("hi"), headers)
        assert status == 200
        assert assistant_text(sse_events(body)) == "carol said: hi"
        [seen] = chatkit.seen()
        assert seen.context is not None
        assert seen.context.user == "carol"

        # The page's settings point ChatKit JS at the gateway, not at the ChatKit server.
        async with http.get(f"{app.base_url}/config.js") as response:
            assert f'"url": "{gw.url}/chatkit"' in await response.text()


@pytest.mark.parametrize("with_model", [False, True], ids=["echo", "model"])
async def test_the_run_command_starts_everything_and_stops_it(
    http: aiohttp.ClientSession, with_model: bool
) -> None:
    async with FakeModel(api_key="sk-example-run-model-key-0123") as model:
        await run_the_example(http, model if with_model else None)


async def run_the_example(http: aiohttp.ClientSession, model: FakeModel | None) -> None:
    """``run`` as a user starts it; with ``model``, given an OpenAI key that
    only the gateway may use (the fake model stands in for OpenAI)."""
    app_port, gateway_port, chatkit_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "CHATKIT_", "EXAMPLE_", "OPENAI_")) and k != "REDIS_URL"
    }
    env.update(
        EXAMPLE_APP_PORT=str(app_port),
        EXAMPLE_GATEWAY_PORT=str(gateway_port),
        EXAMPLE_CHATKIT_PORT=str(chatkit_port),
        VENV=str(Path(sys.executable).parent.parent),
    )
    if model is not None:
        env.update(
            OPENAI_API_KEY=model.api_key,
            EXAMPLE_MODEL_UPSTREAM=model.url,
            OPENAI_AGENTS_DISABLE_TRACING="1",
        )
    run = await asyncio.create_subprocess_exec(
        str(EXAMPLE_DIR / "run"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, so nothing outlives the test
    )
    output = b""
    try:
        assert run.stdout is not None
        async with asyncio.timeout(60):
            while f"Open http://127.0.0.1:{app_port}".encode() not in output:
                line = await run.stdout.readline()
                assert line, f"run exited before printing its URL:\n{output.decode()}"
                output += line
        app = f"http://127.0.0.1:{app_port}"
        async with http.post(f"{app}/api/chatkit/session") as response:
            assert response.status == 200, output.decode()
            secret = (await response.json())["client_secret"]
        # The page's origin may call the gateway: run configured CORS for it.
        async with http.options(
            f"http://127.0.0.1:{gateway_port}/chatkit",
            headers={
                "Origin": app,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        ) as response:
            assert response.headers.get("Access-Control-Allow-Origin") == app
        # Through the gateway, which signs the identity the server verifies.
        status, body = await post(
            http,
            f"http://127.0.0.1:{gateway_port}/chatkit",
            threads_create_body("hello"),
            {"Authorization": f"Bearer {secret}"},
        )
        assert status == 200
        if model is None:
            assert assistant_text(sse_events(body)).endswith(" said: hello")
        else:
            # The model answered through the gateway, which alone held the key.
            assert assistant_text(sse_events(body)) == model.answer
            assert [c.authorization for c in model.calls] == [f"Bearer {model.api_key}"]
            assert model.api_key.encode() not in output
        # The ChatKit server itself refuses anyone else: there is an assertion to check.
        status, _ = await post(
            http,
            f"http://127.0.0.1:{chatkit_port}/chatkit",
            threads_create_body("hello"),
            identity(session="cksess_forged"),
        )
        assert status == 401
    finally:
        if run.returncode is None:
            run.terminate()  # run's trap stops the three servers it started
            try:
                await asyncio.wait_for(run.wait(), 15)
            except TimeoutError:
                os.killpg(run.pid, signal.SIGKILL)
                await run.wait()
    for port in (app_port, gateway_port, chatkit_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
