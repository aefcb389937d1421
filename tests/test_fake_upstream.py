"""The fake ChatKit API and the process harness behave as the gateway tests assume."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from yarl import URL

from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisCluster,
    RedisServer,
    assert_never_logged,
    free_port,
    gateway_env,
    raw_http,
)
from tests.processes import ServerProcess

API_KEY = {"Authorization": "Bearer sk-test"}
SESSION_BODY: dict[str, Any] = {"user": "user_1", "workflow": {"id": "wf_123"}}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def create_session(
    http: aiohttp.ClientSession, up: FakeUpstream, body: object = SESSION_BODY
) -> dict[str, Any]:
    async with http.post(f"{up.url}/v1/chatkit/sessions", json=body, headers=API_KEY) as resp:
        assert resp.status == 200, await resp.text()
        session: dict[str, Any] = await resp.json()
        return session


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events = []
    for _ in range(count):
        frame = await resp.content.readuntil(b"\n\n")
        assert frame.startswith(b"data: ")
        events.append(json.loads(frame[len(b"data: ") :]))
    return events


# -- sessions -------------------------------------------------------------------


async def test_session_create_resolves_every_default(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(clock=lambda: 1_000.0) as up:
        session = await create_session(http, up)
    assert session.pop("id").startswith("cksess_")
    assert session.pop("client_secret").startswith("ek_")
    assert session == {
        "object": "chatkit.session",
        "expires_at": 1_600,
        "user": "user_1",
        "workflow": {
            "id": "wf_123",
            "version": None,
            "state_variables": None,
            "tracing": {"enabled": True},
        },
        "rate_limits": {"max_requests_per_1_minute": 10},
        "max_requests_per_1_minute": 10,
        "status": "active",
        "chatkit_configuration": {
            "automatic_thread_titling": {"enabled": True},
            "file_upload": {"enabled": False, "max_file_size": 512, "max_files": 10},
            "history": {"enabled": True, "recent_threads": None},
        },
    }


async def test_session_create_honours_options_and_is_stored(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    body = {
        "user": "user_2",
        "workflow": {"id": "wf_9", "version": "3", "state_variables": {"plan": "pro"}},
        "expires_after": {"anchor": "created_at", "seconds": 60},
        "rate_limits": {"max_requests_per_1_minute": 3},
        "chatkit_configuration": {"file_upload": {"enabled": True, "max_file_size": 8}},
    }
    session = await create_session(http, upstream, body)
    assert session["max_requests_per_1_minute"] == 3
    assert session["rate_limits"] == {"max_requests_per_1_minute": 3}
    assert session["workflow"]["version"] == "3"
    assert session["workflow"]["state_variables"] == {"plan": "pro"}
    assert session["chatkit_configuration"]["file_upload"]["max_file_size"] == 8
    assert session["expires_at"] - time.time() == pytest.approx(60, abs=2)
    assert upstream.sessions[session["id"]] == session


WORKFLOW = {"id": "wf_1"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"workflow": WORKFLOW}, "user"),  # user is required
        ({"user": "", "workflow": WORKFLOW}, "user"),  # ... and non-empty
        ({"user": 7, "workflow": WORKFLOW}, "user"),  # ... and a string
        ({"user": "u"}, "workflow"),  # workflow is required
        ({"user": "u", "workflow": {}}, "workflow.id"),  # workflow.id is required
        (
            {"user": "u", "workflow": WORKFLOW, "expires_after": {"anchor": "x", "seconds": 5}},
            "expires_after.anchor",
        ),  # the only anchor is created_at
        (
            {"user": "u", "workflow": WORKFLOW, "expires_after": {"anchor": "created_at"}},
            "expires_after.seconds",
        ),  # seconds is required inside expires_after
        (
            {
                "user": "u",
                "workflow": WORKFLOW,
                "expires_after": {"anchor": "created_at", "seconds": 601},
            },
            "expires_after.seconds",
        ),  # at most 600 s
        (
            {
                "user": "u",
                "workflow": WORKFLOW,
                "expires_after": {"anchor": "created_at", "seconds": True},
            },
            "expires_after.seconds",
        ),  # a JSON boolean is not an integer
        (
            {"user": "u", "workflow": WORKFLOW, "rate_limits": {"max_requests_per_1_minute": 0}},
            "rate_limits.max_requests_per_1_minute",
        ),  # at least one request per minute
        (
            {
                "user": "u",
                "workflow": {"id": "w", "state_variables": {str(i): i for i in range(65)}},
            },
            "workflow.state_variables",
        ),  # at most 64 state variables
        (
            {
                "user": "u",
                "workflow": WORKFLOW,
                "chatkit_configuration": {"file_upload": {"max_file_size": 513}},
            },
            "chatkit_configuration.file_upload.max_file_size",
        ),  # uploads are capped at 512 MB
        ([], None),  # the body must be an object
    ],
)
async def test_session_create_rejects_bad_bodies(
    http: aiohttp.ClientSession, upstream: FakeUpstream, body: object, param: str | None
) -> None:
    async with http.post(f"{upstream.url}/v1/chatkit/sessions", json=body, headers=API_KEY) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert upstream.sessions == {}


async def test_session_create_rejects_unparseable_json(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    url = f"{upstream.url}/v1/chatkit/sessions"
    async with http.post(url, data=b"{nope", headers=API_KEY) as resp:
        assert resp.status == 400
        assert "parse the JSON body" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,  # no credentials at all
        "Bearer ek_client_secret",  # a client secret is not an API key
        "Basic sk-test",  # wrong scheme
        "Bearer sk-other",  # not the one key this fake accepts
    ],
)
async def test_api_key_endpoints_reject_anything_but_the_key(
    http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with FakeUpstream(api_key="sk-test") as up:
        for method, path in [
            ("POST", "sessions"),
            ("GET", "threads"),
            ("POST", "sessions/x/cancel"),
        ]:
            async with http.request(
                method, f"{up.url}/v1/chatkit/{path}", json=SESSION_BODY, headers=headers
            ) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["type"] == "invalid_request_error"


# -- cancel -----------------------------------------------------------------------


async def test_cancel_returns_the_full_session_marked_cancelled(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    session = await create_session(http, upstream)
    url = f"{upstream.url}/v1/chatkit/sessions/{session['id']}/cancel"
    async with http.post(url, headers=API_KEY) as resp:
        assert resp.status == 200
        cancelled = await resp.json()
    assert cancelled == {**session, "status": "cancelled"}
    assert upstream.sessions[session["id"]]["status"] == "cancelled"


async def test_cancel_in_the_stale_spec_shape_omits_the_secret(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.cancel_shape = "stale"
    session = await create_session(http, upstream)
    url = f"{upstream.url}/v1/chatkit/sessions/{session['id']}/cancel"
    async with http.post(url, headers=API_KEY) as resp:
        cancelled = await resp.json()
    assert set(cancelled) == {
        "id",
        "object",
        "workflow",
        "scope",
        "max_requests_per_1_minute",
        "ttl_seconds",
        "status",
        "cancelled_at",
    }
    assert cancelled["status"] == "cancelled"
    assert cancelled["scope"] == {"customer_id": "user_1"}


async def test_cancel_of_unknown_session_is_the_real_404(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    url = f"{upstream.url}/v1/chatkit/sessions/cksess_nope/cancel"
    async with http.post(url, headers=API_KEY) as resp:
        assert resp.status == 404
        assert await resp.json() == {
            "error": {
                "message": "Chatkit Session with id 'cksess_nope' not found.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }


# -- threads ----------------------------------------------------------------------


async def get_json(http: aiohttp.ClientSession, url: str, status: int = 200) -> Any:
    async with http.get(url, headers=API_KEY) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


@pytest.mark.parametrize(
    ("query", "ids", "has_more"),
    [
        ("", ["cthr_seed2", "cthr_seed1", "cthr_seed0"], False),  # newest first by default
        ("?order=asc", ["cthr_seed0", "cthr_seed1", "cthr_seed2"], False),
        ("?limit=1", ["cthr_seed2"], True),
        ("?limit=1&after=cthr_seed2", ["cthr_seed1"], True),  # cursor follows the order
        ("?before=cthr_seed0", ["cthr_seed2", "cthr_seed1"], False),
        ("?user=user_bob", ["cthr_seed2"], False),
        ("?limit=0", [], True),
    ],
)
async def test_thread_list_pages(
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
    query: str,
    ids: list[str],
    has_more: bool,
) -> None:
    page = await get_json(http, f"{upstream.url}/v1/chatkit/threads{query}")
    assert page["object"] == "list"
    assert [thread["id"] for thread in page["data"]] == ids
    assert page["first_id"] == (ids[0] if ids else None)
    assert page["last_id"] == (ids[-1] if ids else None)
    assert page["has_more"] is has_more


async def test_thread_retrieve_items_and_delete(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    base = f"{upstream.url}/v1/chatkit/threads"
    assert (await get_json(http, f"{base}/cthr_seed1"))["object"] == "chatkit.thread"
    items = await get_json(http, f"{base}/cthr_seed1/items?order=asc")
    assert [item["type"] for item in items["data"]] == [
        "chatkit.user_message",
        "chatkit.assistant_message",
    ]
    await get_json(http, f"{base}?limit=101", status=400)
    async with http.delete(f"{base}/cthr_seed1", headers=API_KEY) as resp:
        assert await resp.json() == {
            "id": "cthr_seed1",
            "object": "chatkit.thread.deleted",
            "deleted": True,
        }
    await get_json(http, f"{base}/cthr_seed1", status=404)


# -- client traffic ---------------------------------------------------------------


async def test_client_traffic_is_echoed_and_recorded(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    headers = [("Authorization", "Bearer ek_abc"), ("X-Dup", "1"), ("X-Dup", "2")]
    # encoded=True: the client would otherwise normalise %2F to "/".
    url = URL(f"{upstream.url}/v1/chatkit/conversation?b=2&a=%2F", encoded=True)
    async with http.post(url, data=b"hello", headers=headers) as resp:
        echo = await resp.json()
    assert echo["object"] == "chatkit.echo"
    assert (echo["method"], echo["path"], echo["query"]) == (
        "POST",
        "/v1/chatkit/conversation",
        "b=2&a=%2F",
    )
    assert echo["headers"]["x-dup"] == ["1", "2"]
    assert echo["body_bytes"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    [seen] = upstream.requests
    assert seen.authorization == "Bearer ek_abc"
    assert [(n, v) for n, v in seen.headers if n.lower() == "x-dup"] == [
        ("X-Dup", "1"),
        ("X-Dup", "2"),
    ]
    assert (seen.status, seen.completed, seen.disconnected) == (200, True, False)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Accept": "text/event-stream"}, {}),  # asked for by Accept
        ({}, {"stream": True}),  # asked for in the JSON envelope
    ],
)
async def test_streaming_answers_spaced_sse_events(
    http: aiohttp.ClientSession,
    upstream: FakeUpstream,
    headers: dict[str, str],
    body: dict[str, Any],
) -> None:
    url = f"{upstream.url}/v1/chatkit/conversation?events=3&interval=0.2"
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        arrivals = []
        for index in range(3):
            [event] = await read_events(resp, 1)
            arrivals.append(time.monotonic())
            assert event["index"] == index
        assert await resp.content.read() == b""  # no [DONE], nothing after the last event
    # Each event reached the wire on its own, not all at the end.
    assert arrivals[1] - arrivals[0] >= 0.15
    assert arrivals[2] - arrivals[1] >= 0.15


async def test_upload_is_hashed_as_it_streams(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256(chunk * 64).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):  # 4 MiB, sent chunked
            yield chunk

    async with http.post(f"{upstream.url}/v1/chatkit/files", data=body()) as resp:
        echo = await resp.json()
    assert (echo["body_bytes"], echo["body_sha256"]) == (len(chunk) * 64, expected)
    assert upstream.requests[0].completed


async def test_response_header_knobs(http: aiohttp.ClientSession, upstream: FakeUpstream) -> None:
    url = f"{upstream.url}/v1/chatkit/conversation?set_cookies=3&hop=1"
    async with http.get(url) as resp:
        assert len(resp.headers.getall("Set-Cookie")) == 3
        assert resp.headers["Connection"] == "X-Hop-Secret, keep-alive"
        for name in ("X-Hop-Secret", "Keep-Alive", "Proxy-Connection", "X-End-To-End"):
            assert name in resp.headers


async def test_paths_outside_chatkit_are_404_but_healthz_answers(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    async with http.get(f"{upstream.url}/v1/models") as resp:
        assert resp.status == 404
    async with http.get(f"{upstream.url}/healthz") as resp:
        assert resp.status == 200


# -- faults -----------------------------------------------------------------------


async def test_status_fault_runs_out_after_times(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    fault = upstream.inject(
        "status", path_prefix="/v1/chatkit/conversation", times=2, status=503,
        headers={"Retry-After": "1"},
    )  # fmt: skip
    statuses = []
    for _ in range(3):
        async with http.post(f"{upstream.url}/v1/chatkit/conversation") as resp:
            statuses.append(resp.status)
            if resp.status == 503:
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["type"] == "server_error"
    assert statuses == [503, 503, 200]
    assert fault.hits == 2


async def test_a_chunked_status_fault_sends_its_answer_without_a_length(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("status", status=200, message="x" * 200_000, chunked=True)
    async with http.post(f"{upstream.url}/v1/chatkit/conversation") as resp:
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert (await resp.json())["error"]["message"] == "x" * 200_000


async def test_fault_matching_by_method_and_forever(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("status", method="GET", times=None, status=429)
    url = f"{upstream.url}/v1/chatkit/conversation"
    for _ in range(3):
        async with http.get(url) as resp:
            assert resp.status == 429
    async with http.post(url) as resp:
        assert resp.status == 200
    upstream.clear_faults()
    async with http.get(url) as resp:
        assert resp.status == 200


async def test_delay_fault_answers_late(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("delay", seconds=0.3)
    started = time.monotonic()
    async with http.post(f"{upstream.url}/v1/chatkit/conversation") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.3


async def test_stall_fault_holds_until_the_client_leaves(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("stall")
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(TimeoutError):
        await http.post(f"{upstream.url}/v1/chatkit/conversation", timeout=timeout)
    await upstream.wait_for(lambda: upstream.active == 0)
    [seen] = upstream.requests
    assert (seen.fault, seen.status, seen.disconnected) == ("stall", None, True)


async def test_reset_fault_drops_the_connection(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.post(f"{upstream.url}/v1/chatkit/conversation", data=b"x")
    await upstream.wait_for(lambda: upstream.active == 0)
    [seen] = upstream.requests
    assert (seen.aborted, seen.disconnected, seen.completed) == (True, False, True)


async def test_stall_mid_stream_sends_some_events_then_nothing(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("stall_mid_stream", after=2)
    url = f"{upstream.url}/v1/chatkit/conversation?interval=0"
    async with http.post(url, json={"stream": True}) as resp:
        assert [e["index"] for e in await read_events(resp, 2)] == [0, 1]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await resp.content.readuntil(b"\n\n")
        resp.close()  # go away mid-stream
    await upstream.wait_for(lambda: upstream.active == 0)
    assert upstream.requests[0].disconnected


async def test_reset_mid_stream_cuts_the_body(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    upstream.inject("reset_mid_stream", after=2)
    # A mid-stream fault forces a stream even without the stream flag.
    async with http.post(f"{upstream.url}/v1/chatkit/conversation?interval=0") as resp:
        await read_events(resp, 2)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()
    await upstream.wait_for(lambda: upstream.active == 0)
    assert upstream.requests[0].aborted


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"x-fake-fault": "status", "x-fake-fault-status": "418"}, 418),
        ({"x-fake-fault": "delay", "x-fake-fault-seconds": "0.05"}, 200),
        ({"x-fake-fault": "meltdown"}, 400),  # unknown faults are refused loudly
    ],
)
async def test_faults_selected_by_request_header(
    http: aiohttp.ClientSession, upstream: FakeUpstream, headers: dict[str, str], status: int
) -> None:
    async with http.post(f"{upstream.url}/v1/chatkit/conversation", headers=headers) as resp:
        assert resp.status == status


def test_inject_refuses_nonsense() -> None:
    up = FakeUpstream()
    with pytest.raises(ValueError, match="unknown fault"):
        up.inject("meltdown")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status=<int>"):
        up.inject("status")
    with pytest.raises(ValueError, match="times"):
        up.inject("stall", times=0)


# -- recording --------------------------------------------------------------------


async def test_wait_for_wakes_when_requests_arrive(
    http: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    waiter = asyncio.create_task(
        upstream.wait_for(lambda: upstream.count("/v1/chatkit/", method="post") == 3)
    )
    for _ in range(3):
        async with http.post(f"{upstream.url}/v1/chatkit/conversation"):
            pass
    async with http.get(f"{upstream.url}/v1/chatkit/threads", headers=API_KEY):
        pass
    await waiter
    assert upstream.count() == 4
    assert upstream.count("/v1/chatkit/threads") == 1
    upstream.reset_records()
    assert upstream.count() == 0


async def test_wait_for_times_out_with_context(upstream: FakeUpstream) -> None:
    with pytest.raises(TimeoutError, match="condition still false"):
        await upstream.wait_for(lambda: False, timeout=0.05)


# -- harness ----------------------------------------------------------------------


async def test_raw_http_reads_one_framed_response(upstream: FakeUpstream) -> None:
    host, port = upstream.url.removeprefix("http://").split(":")
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # keep-alive: no close to wait for
    reply = await raw_http(host, int(port), request, read_until_close=False)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b'{"status": "ok"}')
    stream = (
        b"GET /v1/chatkit/x?events=2&interval=0 HTTP/1.1\r\n"
        b"Host: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    reply = await raw_http(host, int(port), stream, read_until_close=False)
    assert reply.count(b"data: ") == 2
    assert reply.endswith(b"0\r\n\r\n")


def test_gateway_env_replaces_stale_gateway_variables() -> None:
    base = {"PATH": "/bin", "GATEWAY_REDIS_URL": "redis://stale", "GATEWAY_DEBUG": "1"}
    env = gateway_env("http://up", port=8123, extra={"GATEWAY_LOG_LEVEL": "debug"}, base=base)
    assert env == {
        "PATH": "/bin",
        "PYTHONUNBUFFERED": "1",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": "8123",
        "GATEWAY_UPSTREAM_URL": "http://up",
        "GATEWAY_LOG_LEVEL": "debug",
    }


async def test_gateway_process_reports_an_early_exit_with_its_output() -> None:
    crash = [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)code 3.*boom"):
        await GatewayProcess("http://127.0.0.1:9", command=crash).astart()


async def test_gateway_process_waits_for_healthz_and_stops_cleanly(
    http: aiohttp.ClientSession,
) -> None:
    # The standalone fake stands in for the gateway: it serves /healthz too.
    stand_in = [sys.executable, "-m", "tests.fake_upstream", "--port", "{port}"]
    async with GatewayProcess("http://127.0.0.1:9", command=stand_in) as proc:
        async with http.get(f"{proc.url}/healthz") as resp:
            assert resp.status == 200
        assert await proc.astop() == 0
    assert "listening on" in proc.output()


def test_assert_never_logged_names_the_process_but_never_the_secret() -> None:
    # A child that prints and exits: start() fails, and what it printed stays readable.
    chatty = ServerProcess(
        [sys.executable, "-c", "print('ek_leaked')"], env=os.environ, port=free_port()
    )
    with pytest.raises(RuntimeError, match="exited with code 0"):
        chatty.start()
    assert_never_logged([chatty], ["ek_other"])
    with pytest.raises(AssertionError) as failure:
        assert_never_logged([chatty], ["ek_other", "ek_leaked"], "a client secret")
    assert str(failure.value).startswith("a client secret in the log of the server on http://")
    assert "ek_leaked" not in str(failure.value)


async def test_redis_url_fixture_gives_an_empty_database(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def test_redis_pause_makes_it_hang_and_resume_recovers() -> None:
    with RedisServer() as server:
        # No retries: redis-py would otherwise retry the timeout with backoff.
        client = server.client(socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
        try:
            await client.set("k", "v")
            server.pause()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.get("k")
            server.resume()
            await client.aclose()  # the timed-out connection is unusable
            client = server.client(socket_timeout=2)
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    ("appendonly", "survives"),
    [
        (True, True),  # appendfsync=always: every acknowledged write is on disk
        (False, False),  # no persistence at all: a restart starts empty
    ],
)
async def test_redis_state_across_a_kill_and_restart(appendonly: bool, survives: bool) -> None:
    with RedisServer(appendonly=appendonly, appendfsync="always") as server:
        client = server.client()
        await client.set("k", "v")
        await client.aclose()
        port = server.port
        server.kill()
        server.restart()
        assert server.port == port
        client = server.client()
        try:
            assert (await client.get("k") == b"v") is survives
        finally:
            await client.aclose()


async def test_redis_cluster_forms_and_serves_every_slot() -> None:
    with RedisCluster() as cluster:
        assert len(cluster.startup_nodes) == 3
        client = cluster.client()
        try:
            # Keys spread over all three masters' slot ranges.
            for key in ("a", "b", "c", "{user}:1"):
                await client.set(key, key)
                assert await client.get(key) == key.encode()
        finally:
            await client.aclose()
