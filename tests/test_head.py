"""The request head, read once (gateway/head.py): what it holds, and that it is read once.

The gateway's protocol fills the head in while llhttp parses; without that
protocol (plain uvicorn) it is built from the scope's header list in one walk.
Either way, the request path walks the header list at most twice: once in
(the fallback) and once out, to build the upstream's headers. Counted here
through the real app, in-process and behind the real protocol on a socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio
import uvicorn

from gateway.app import GatewayApp
from gateway.head import EXTENSION, RequestHead, head_from_headers, request_head
from gateway.protocol import GatewayHttpProtocol
from gateway.settings import load_settings
from gateway.types import Message
from tests.doubles import serving_in_process, started
from tests.fake_upstream import FakeUpstream
from tests.harness import eventually, free_port
from tests.processes import raw_http

Headers = list[tuple[bytes, bytes]]
API_KEY = "ckgk_head-test-key-0123456789"
ORIGIN = b"http://page.example"


# -- the head's fields ------------------------------------------------------------


def test_the_head_keeps_what_the_gateway_acts_on() -> None:
    head = head_from_headers(
        "POST",
        b"/v1/chatkit/conversation?x=1",
        [
            (b"host", b"gw.example"),
            (b"authorization", b"Bearer ek_1"),
            (b"origin", ORIGIN),
            (b"connection", b"keep-alive"),
            (b"x-request-id", b"first"),
            (b"x-request-id", b"second"),
            (b"connection", b"x-a"),
            (b"content-length", b"2"),
            (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            (b"x-other", b"v"),
        ],
    )
    assert head.method == "POST"
    assert head.target == b"/v1/chatkit/conversation?x=1"
    assert head.host == b"gw.example"
    assert head.authorization == b"Bearer ek_1"
    assert head.authorizations == 1
    assert head.origin == ORIGIN
    # Every Connection line nominates; the first of anything else counts.
    assert head.connection == b"keep-alive,x-a"
    assert head.request_id == b"first"
    assert head.content_length == 2
    assert head.chunked is False
    assert head.traceparent is not None
    assert head.fields == 10
    assert head.problem is None
    assert head.checked is False


def test_repeated_authorization_is_counted() -> None:
    head = head_from_headers("GET", b"/", [(b"authorization", b"Bearer a")] * 2)
    assert (head.authorization, head.authorizations) == (b"Bearer a", 2)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),  # no body length declared
        ([(b"content-length", b"0")], 0),
        ([(b"content-length", b"1234")], 1234),
        ([(b"content-length", b"007")], 7),  # leading zeros are still digits
        ([(b"content-length", b"5"), (b"content-length", b"5")], 5),  # identical repeats
        ([(b"content-length", b"5"), (b"content-length", b"05")], 5),  # the same number
        ([(b"content-length", b"9" * 19)], int("9" * 19)),
    ],
)
def test_content_length_is_parsed(headers: Headers, expected: int | None) -> None:
    head = head_from_headers("POST", b"/", headers)
    assert (head.content_length, head.problem) == (expected, None)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"5"), (b"content-length", b"6")],  # conflicting
        [(b"content-length", b"")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"+5")],
        [(b"content-length", b"5 ")],
        [(b"content-length", b"0x10")],
        [(b"content-length", b"1e3")],
        [(b"content-length", b"5, 5")],  # a list is refused, not guessed at
        [(b"content-length", b"\xd9\xa3")],  # ARABIC-INDIC DIGIT THREE
        [(b"content-length", b"1" * 20)],  # beyond any real body
    ],
)
def test_a_bad_content_length_is_a_problem_not_a_length(headers: Headers) -> None:
    # The gateway's protocol refuses these before the app; the fallback says why.
    head = head_from_headers("POST", b"/", headers)
    assert head.content_length is None
    assert head.problem is not None


def test_the_protocols_head_is_taken_as_it_is() -> None:
    made = RequestHead("GET", b"/x", authorization=b"Bearer a", authorizations=1, checked=True)
    scope = {"method": "GET", "path": "/x", "headers": [], "extensions": {EXTENSION: made}}
    assert request_head(scope) is made


# -- walks of the header list through the real app -------------------------------


class CountedHeaders(list[tuple[bytes, bytes]]):
    """A header list that counts how often it is iterated over."""

    walks = 0

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self.walks += 1
        return super().__iter__()


def _settings(upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_UNKNOWN_SECRETS": "allow",
        "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "100000",
        "GATEWAY_WORKFLOWS": json.dumps({"wf_a": {"upstream": f"{upstream.url}/v1/chatkit/a"}}),
        "GATEWAY_ISSUER_API_KEYS": "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest(),
        **extra,
    }


async def _call(
    app: GatewayApp, method: str, path: str, headers: CountedHeaders, body: bytes = b""
) -> tuple[int, bytes]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
        "headers": headers,
    }
    sent: list[Message] = []
    answered = asyncio.Event()
    requested = False

    async def receive() -> Message:
        # The body, then (as a server does once the answer is out) a disconnect.
        nonlocal requested
        if requested:
            await answered.wait()
            return {"type": "http.disconnect"}
        requested = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    await app(scope, receive, send)
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], answer


def _head(*fields: tuple[bytes, bytes], body: bytes = b"") -> CountedHeaders:
    headers = CountedHeaders([(b"host", b"gw.example"), *fields])
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
    return headers


@pytest_asyncio.fixture
async def issued_secret(upstream: FakeUpstream) -> AsyncIterator[tuple[GatewayApp, str]]:
    app = GatewayApp(load_settings(_settings(upstream)))
    async with started(app):
        create = json.dumps({"user": "u1", "workflow": {"id": "wf_a"}}).encode()
        headers = _head((b"authorization", b"Bearer " + API_KEY.encode()), body=create)
        status, answer = await _call(app, "POST", "/v1/chatkit/sessions", headers, create)
        assert status == 200, answer
        # An issuer's create: the key checked from the list, nothing forwarded.
        assert headers.walks <= 2
        yield app, json.loads(answer)["client_secret"]


POST = b'{"type":"threads.list","params":{}}'


async def test_the_request_path_walks_the_header_list_at_most_twice(
    issued_secret: tuple[GatewayApp, str], upstream: FakeUpstream
) -> None:
    app, secret = issued_secret
    cases = [
        # (what, method, path, headers, body, status)
        (
            "client POST",
            "POST",
            "/v1/chatkit/conversation",
            _head((b"authorization", b"Bearer ek_walks"), (b"x-a", b"1"), body=POST),
            POST,
            200,
        ),
        (
            "issued turn",
            "POST",
            "/chatkit",
            _head((b"authorization", b"Bearer " + secret.encode()), body=POST),
            POST,
            200,
        ),
        (
            "pass-through GET",
            "GET",
            "/v1/chatkit/threads",
            _head((b"authorization", b"Bearer sk-walks"), (b"connection", b"x-a"), (b"x-a", b"1")),
            b"",
            200,
        ),
        (
            "preflight, forwarded",
            "OPTIONS",
            "/v1/chatkit/conversation",
            _head((b"origin", ORIGIN), (b"access-control-request-method", b"POST")),
            b"",
            200,
        ),
        (
            "hosted session create",
            "POST",
            "/v1/chatkit/sessions",
            _head(
                (b"authorization", b"Bearer sk-walks"),
                body=b'{"user":"u","workflow":{"id":"wf_h"}}',
            ),
            b'{"user":"u","workflow":{"id":"wf_h"}}',
            200,
        ),
        (
            "refused: no secret",
            "POST",
            "/v1/chatkit/conversation",
            _head(body=POST),
            POST,
            401,
        ),
    ]
    for what, method, path, headers, body, status in cases:
        got, answer = await _call(app, method, path, headers, body)
        assert got == status, (what, answer)
        assert headers.walks <= 2, f"{what}: the header list was walked {headers.walks} times"
    # What was forwarded still went with its headers (the walk out happened).
    turn = next(seen for seen in upstream.requests if seen.path == "/v1/chatkit/a")
    assert turn.header("x-chatkit-user") == "u1"
    assert turn.header("authorization") is None
    passed = next(seen for seen in upstream.requests if seen.method == "GET")
    assert passed.header("x-a") is None  # nominated by Connection: hop-by-hop


async def test_a_cors_preflight_answered_here_walks_the_list_once(upstream: FakeUpstream) -> None:
    app = GatewayApp(load_settings(_settings(upstream, GATEWAY_CORS_ORIGINS=ORIGIN.decode())))
    async with started(app):
        headers = _head((b"origin", ORIGIN), (b"access-control-request-method", b"POST"))
        status, _ = await _call(app, "OPTIONS", "/v1/chatkit/conversation", headers)
    assert status == 204
    assert headers.walks == 1
    assert upstream.count() == 0


class CountingProtocol(GatewayHttpProtocol):
    """The gateway's protocol, its requests' header lists counted (the parse adds to them)."""

    lists: ClassVar[list[CountedHeaders]] = []

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.headers = CountedHeaders()
        self.scope["headers"] = self.headers
        self.lists.append(self.headers)


async def test_behind_the_gateways_protocol_the_list_is_walked_once_out(
    upstream: FakeUpstream,
) -> None:
    app = GatewayApp(load_settings(_settings(upstream)))
    CountingProtocol.lists = []
    # As gateway/server.py serves it: uvicorn's proxy-headers middleware off.
    serving = serving_in_process(app, http=CountingProtocol, access_log=False, proxy_headers=False)
    async with serving as port:
        request = (
            b"POST /v1/chatkit/conversation HTTP/1.1\r\nHost: gw.example\r\n"
            b"Authorization: Bearer ek_walks\r\nOrigin: http://page.example\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(POST)
        ) + POST
        reply = await raw_http("127.0.0.1", port, request)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    (headers,) = CountingProtocol.lists
    # The head came from the parse; the only walk is the one building the
    # upstream's headers.
    assert headers.walks == 1
    assert upstream.requests[0].authorization == "Bearer ek_walks"


async def test_the_protocol_hands_the_app_the_head_it_read() -> None:
    seen: list[RequestHead] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(request_head(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=GatewayHttpProtocol, lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: bool(server.started), timeout=10, what="uvicorn to start")
        reply = await raw_http(
            "127.0.0.1",
            port,
            b"OPTIONS /v1/chatkit/x?q=1 HTTP/1.1\r\nHost: gw.example\r\nOrigin: http://a\r\n"
            b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: x-b\r\n"
            b"Authorization: Bearer one\r\nAuthorization: Bearer two\r\n"
            b"Connection: close\r\nConnection: x-a\r\nX-Request-Id: rid-1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
    finally:
        server.should_exit = True
        await task
    assert reply.startswith(b"HTTP/1.1 204 "), reply
    (head,) = seen
    assert head == RequestHead(
        "OPTIONS",
        b"/v1/chatkit/x?q=1",
        host=b"gw.example",
        content_length=None,
        chunked=True,
        authorization=b"Bearer one",
        authorizations=2,
        origin=b"http://a",
        preflight_method=b"POST",
        preflight_headers=b"x-b",
        connection=b"close,x-a",
        request_id=b"rid-1",
        fields=10,
        size=head.size,
        # Plain uvicorn's config: the protocol's own limits, not the app's settings.
        checked=False,
    )
