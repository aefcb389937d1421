"""Log lines: escaped, carrying the request's ids, JSON on request, throttled."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.errors import StreamAborted
from gateway.logs import (
    REQUEST_ID,
    UPSTREAM_REQUEST_ID,
    DropStreamAborted,
    JsonFormatter,
    RequestContext,
    TextFormatter,
    Throttled,
    escape,
)
from tests.harness import GatewayProcess, RedisServer, eventually, raw_http


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("/v1/chatkit/conversation", "/v1/chatkit/conversation"),  # nothing to escape
        ("/a\nGET /forged 200", "/a\\nGET /forged 200"),  # a decoded %0a cannot start a line
        ("/a\r\nx", "/a\\r\\nx"),  # nor a CR LF pair
        ("tab\there", "tab\\there"),
        ("bell\x07esc\x1b[31m", "bell\\x07esc\\x1b[31m"),  # terminal escapes are inert
        ("del\x7f c1\x85", "del\\x7f c1\\x85"),  # DEL and C1 (NEL) controls
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),  # Unicode line/paragraph separators
        ("caf\u00e9 \u4e2d", "caf\u00e9 \u4e2d"),  # printable non-ASCII stays readable
    ],
)
def test_escape_writes_control_characters_as_escapes(raw: str, logged: str) -> None:
    assert escape(raw) == logged


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def _with_context(record: logging.LogRecord, rid: str | None, upstream: str | None) -> None:
    rid_token = REQUEST_ID.set(rid)
    upstream_token = UPSTREAM_REQUEST_ID.set(upstream)
    try:
        RequestContext().filter(record)
    finally:
        REQUEST_ID.reset(rid_token)
        UPSTREAM_REQUEST_ID.reset(upstream_token)


def test_text_lines_carry_both_request_ids_and_stay_one_line() -> None:
    record = _record("refused %s", "path\ninjected")
    _with_context(record, "rid-1", "req_abc")
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith("gateway.test: refused path\\ninjected rid=rid-1 upstream_rid=req_abc")


def test_text_lines_outside_a_request_have_no_id() -> None:
    record = _record("started")
    _with_context(record, None, None)
    assert "rid=" not in TextFormatter().format(record)


def test_json_lines_are_one_object_with_ids_and_fields() -> None:
    record = _record("GET %s", "/x\n")
    record.fields = {"status": 200, "bytes_out": 12}
    _with_context(record, "rid-2", None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "GET /x\n"
    assert parsed["request_id"] == "rid-2"
    assert "upstream_request_id" not in parsed
    assert parsed["status"] == 200
    assert parsed["bytes_out"] == 12
    assert parsed["level"] == "WARNING"


def test_a_deliberately_cut_response_is_filtered_and_other_errors_are_not() -> None:
    class StreamAbortedLookalike(Exception):
        """Same name as a string match would see; a different exception."""

    StreamAbortedLookalike.__name__ = "StreamAborted"
    drop = DropStreamAborted()
    cut = _record("Exception in ASGI application", exc=StreamAborted("cut"))
    bug = _record("Exception in ASGI application", exc=StreamAbortedLookalike("real bug"))
    assert not drop.filter(cut)
    assert drop.filter(bug)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttled_logs_once_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    logger = logging.getLogger("gateway.test.throttled")
    throttled = Throttled(logger, 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(50):  # 50 failures within one second
            throttled.warning("Redis is down: %s", "ConnectionError")
            clock.now += 0.02
        clock.now = 1011.0
        throttled.warning("Redis is down: %s", "ConnectionError")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Redis is down: ConnectionError",
        "Redis is down: ConnectionError (and 49 more times in the last 11s)",
    ]


# -- the gateway's own log lines --------------------------------------------------


@pytest.fixture
async def upstream_with_ids() -> AsyncIterator[str]:
    """An upstream that names its own request ids, as OpenAI's API does."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        return web.json_response({"ok": True}, headers={"x-request-id": "req_upstream_42"})

    server = web.Server(handle)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _wait_for_output(gateway: GatewayProcess, done: Callable[[str], bool]) -> str:
    await eventually(lambda: done(gateway.output()), timeout=10, what=gateway.output)
    return gateway.output()


async def test_json_access_log_names_everything_on_call_needs(upstream_with_ids: str) -> None:
    env = {
        "GATEWAY_ACCESS_LOG": "true",
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_UNKNOWN_SECRETS": "allow",
    }
    async with (
        GatewayProcess(upstream_with_ids, env=env) as gateway,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation?q=secret-query",
            headers={"Authorization": "Bearer ek_json_log_secret", "x-request-id": "rid-json"},
            data=b"0123456789",
        ) as response:
            assert response.status == 200
            answer = await response.read()
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions",
            headers={"Authorization": "Bearer sk-test", "x-request-id": "rid-session"},
            json={},
        ) as response:
            assert response.status == 200
        output = await _wait_for_output(gateway, lambda out: out.count('"gateway.access"') == 2)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "gateway.access"]
    assert len(access) == 2, output
    entry, session = access
    # The session call hears the upstream in a task of its own: its id still shows.
    assert session["kind"] == "session_create"
    assert session["request_id"] == "rid-session"
    assert session["upstream_request_id"] == "req_upstream_42"
    assert entry["request_id"] == "rid-json"
    assert entry["upstream_request_id"] == "req_upstream_42"
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/chatkit/conversation"
    assert entry["status"] == 200
    assert entry["kind"] == "client"
    assert entry["outcome"] == "admitted"
    assert entry["client"].startswith("127.0.0.1:")
    assert entry["bytes_in"] == 10
    assert entry["bytes_out"] == len(answer)
    assert entry["duration_ms"] >= entry["upstream_ms"] >= 0
    assert "ek_json_log_secret" not in output
    assert "secret-query" not in output


async def test_a_percent_encoded_newline_in_the_path_cannot_forge_a_log_line(
    upstream_with_ids: str,
) -> None:
    env = {"GATEWAY_ACCESS_LOG": "true"}
    async with GatewayProcess(upstream_with_ids, env=env) as gateway:
        forged = "/v1/x%0a2026-01-01%2000:00:00,000%20INFO%20gateway.access:%20GET%20/admin%20200"
        request = f"GET {forged} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = await raw_http(gateway.host, gateway.port, request.encode())
        assert reply.startswith(b"HTTP/1.1 4"), reply
        output = await _wait_for_output(gateway, lambda out: "/v1/x" in out)
    access = [line for line in output.splitlines() if "gateway.access" in line]
    assert len(access) == 1, output
    assert "/v1/x\\n2026-01-01" in access[0]


async def test_every_line_of_a_request_carries_its_id_and_store_failures_are_throttled(
    redis_server: RedisServer,
) -> None:
    redis_server.ensure_running()
    env = {"GATEWAY_STORE_CHECK_INTERVAL_SECONDS": "0.2", "GATEWAY_REDIS_TIMEOUT": "0.5"}
    async with (
        GatewayProcess("http://127.0.0.1:9", redis_url=redis_server.url, env=env) as gateway,
        aiohttp.ClientSession() as http,
    ):
        redis_server.stop()
        try:
            statuses = []
            for index in range(20):
                async with http.get(
                    f"{gateway.url}/v1/chatkit/conversation",
                    headers={"Authorization": "Bearer ek_x", "x-request-id": f"rid-down-{index}"},
                ) as response:
                    statuses.append(response.status)
        finally:
            redis_server.start()
        output = gateway.output()
    assert statuses == [503] * 20
    refused = [line for line in output.splitlines() if "client requests are refused" in line]
    # Twenty failures: the store logs the outage once, with the request id of
    # the request that found it, not a line per refused request.
    assert len(refused) == 1, output
    assert refused[0].endswith("rid=rid-down-0"), refused
