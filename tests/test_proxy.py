"""The streaming reverse proxy end to end: real gateway processes, real sockets.

Every gateway here runs ``python -m gateway serve`` in front of the fake
ChatKit API (tests/fake_upstream.py), which records what reached it, so a test
can prove both what the gateway forwarded and what it did not.

Client routes need a client secret. These tests are about proxying, not
admission, so the gateways run with ``GATEWAY_UNKNOWN_SECRETS=allow`` and a
limit no test reaches; authentication has its own tests.

One fake upstream and a few gateways are shared by the whole module (one event
loop for the module, so the fake keeps answering while a test waits); an
autouse fixture clears the fake's records and faults around every test and
waits for it to go idle, so tests do not see each other's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.fake_upstream import FakeUpstream, Seen
from tests.harness import (
    GatewayProcess,
    connection,
    eventually,
    free_port,
    metric_value,
    openai_sdk,
    raw_http,
    raw_upload,
    scrape,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1024 * 1024
CLIENT_SECRET = "ek_proxy_tests_secret"
AUTH = {"Authorization": f"Bearer {CLIENT_SECRET}"}
API_KEY = {"Authorization": "Bearer sk-test"}
# Admit any well-formed client secret, far more often than any test asks.
CLIENT_ENV = {
    "GATEWAY_UNKNOWN_SECRETS": "allow",
    "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "1000000",
    # Long enough that only the behaviour under test can end a stalled request.
    "GATEWAY_UPSTREAM_READ_TIMEOUT": "60",
}
STRICT_BODY_LIMIT = 1_000_000
STRICT_READ_TIMEOUT = 1.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# -- fixtures ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fake: FakeUpstream) -> AsyncIterator[GatewayProcess]:
    """The gateway with default limits and timeouts (512 MB bodies)."""
    async with GatewayProcess(fake.url, env=CLIENT_ENV) as gw:
        yield gw


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strict_gateway(fake: FakeUpstream) -> AsyncIterator[GatewayProcess]:
    """A gateway with a short upstream read timeout and a 1 MB body limit."""
    env = {
        **CLIENT_ENV,
        "GATEWAY_UPSTREAM_READ_TIMEOUT": str(STRICT_READ_TIMEOUT),
        "GATEWAY_MAX_BODY_BYTES": str(STRICT_BODY_LIMIT),
    }
    async with GatewayProcess(fake.url, env=env) as gw:
        yield gw


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def fresh_upstream(fake: FakeUpstream) -> AsyncIterator[None]:
    fake.clear_faults()
    fake.reset_records()
    yield
    fake.clear_faults()
    # A test that leaves a request hanging at the upstream has leaked it.
    await fake.wait_for(lambda: fake.active == 0, timeout=15)


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


# -- raw HTTP helpers ----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order, duplicates kept
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> Reply:
    """One HTTP/1.1 response as raw bytes -> status, headers, de-chunked body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    reply = Reply(status, headers, rest)
    if "chunked" in (reply.header("transfer-encoding") or ""):
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        reply.body = bytes(body)
    return reply


def request_bytes(
    method: str,
    target: bytes,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    close: bool = True,
) -> bytes:
    lines = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: gateway.test"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}".encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send_raw(gw: GatewayProcess, data: bytes) -> Reply:
    """Send bytes verbatim (hostile targets included) and parse the one reply."""
    raw = await raw_http(gw.host, gw.port, data, read_until_close=False, timeout=30)
    assert raw, "the gateway closed the connection without answering"
    return parse_reply(raw)


async def exchange(gw: GatewayProcess, head: bytes, chunks: Iterable[bytes]) -> Reply:
    """Stream ``chunks`` after ``head`` while reading the reply concurrently, so
    an answer that comes before the whole body was sent is still read."""
    raw, _ = await raw_upload(gw.host, gw.port, head, chunks, read_until_close=False, timeout=60)
    assert raw, "the gateway closed the connection without answering"
    return parse_reply(raw)


def assert_openai_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    """The gateway's own answer: status and ``{"error": {message, type, param, code}}``."""
    assert reply.status == status, reply
    assert reply.header("content-type") == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code
    return dict(error)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def only(records: Sequence[Seen]) -> Seen:
    assert len(records) == 1, [(s.method, s.path) for s in records]
    return records[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- streaming -----------------------------------------------------------------------


async def test_sse_events_arrive_one_by_one(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    events, interval = 5, 0.3
    started = time.monotonic()
    url = f"{gateway.url}/v1/chatkit/conversation?events={events}&interval={interval}"
    headers = {**AUTH, "Accept": "text/event-stream"}
    arrivals: list[float] = []
    received = []
    async with http.post(url, json={"type": "threads.create"}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "Content-Length" not in resp.headers
        for _ in range(events):
            frame = await resp.content.readuntil(b"\n\n")
            arrivals.append(time.monotonic() - started)
            assert frame.startswith(b"data: ")
            received.append(json.loads(frame.removeprefix(b"data: ")))
        assert await resp.content.read() == b""  # and then a clean end
    assert [event["index"] for event in received] == list(range(events))
    # The upstream spaces the events 0.3 s apart: a buffering proxy would
    # deliver them together at the end. The first must come long before the last.
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals
    assert arrivals[-1] - arrivals[0] > (events - 1) * interval * 0.75, arrivals


async def test_large_upload_streams_with_flat_memory(
    gateway: GatewayProcess, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    size = 256 * MIB
    url = f"{gateway.url}/v1/chatkit/files"
    # Warm up, so buffers the first large request allocates count in the baseline.
    async with http.post(url, data=os.urandom(MIB), headers=AUTH) as resp:
        assert resp.status == 200
    pid = gateway.proc.pid
    baseline = rss_bytes(pid)

    block = os.urandom(MIB)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        # Generated as it is sent; each MiB differs, so reordering would show.
        for index in range(size // MIB):
            chunk = index.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            yield chunk

    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(rss_bytes(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.02)

    sampler = asyncio.create_task(sample())
    headers = {**AUTH, "Content-Length": str(size), "Content-Type": "application/octet-stream"}
    try:
        async with http.post(url, data=body(), headers=headers) as resp:
            assert resp.status == 200
            echo = await resp.json()
    finally:
        done.set()
        await sampler
    assert echo["body_bytes"] == size
    assert echo["body_sha256"] == digest.hexdigest()
    assert echo["headers"]["content-length"] == str(size)  # forwarded as declared
    growth = max(samples) - baseline
    print(f"gateway RSS: baseline {baseline / MIB:.1f} MiB, peak growth {growth / MIB:.1f} MiB")
    assert len(samples) >= 5, "the upload ended before RSS could be sampled"
    assert growth < 64 * MIB


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upload_body_arrives_intact(
    gateway: GatewayProcess, fake: FakeUpstream, framing: str
) -> None:
    chunks = [os.urandom(256 * 1024) for _ in range(16)]
    headers = [*AUTH.items(), ("Content-Type", "application/octet-stream")]
    if framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        wire = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks] + [b"0\r\n\r\n"]
    else:
        headers.append(("Content-Length", str(sum(map(len, chunks)))))
        wire = chunks
    reply = await exchange(gateway, request_bytes("PUT", b"/v1/chatkit/uploads/u1", headers), wire)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == sha256(b"".join(chunks))
    seen = only(fake.requests)
    assert seen.completed
    assert seen.body_bytes == 4 * MIB


# -- headers ---------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_are_not_forwarded(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    headers = [
        *AUTH.items(),
        ("Connection", "keep-alive, X-Nominated-One"),
        ("Connection", "x-nominated-TWO"),  # a second Connection line counts too
        ("X-Nominated-One", "hop"),
        ("X-Nominated-Two", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "example/1"),
        ("X-End-To-End", "kept"),
        ("OpenAI-Beta", "chatkit_beta=v1"),
    ]
    reply = await send_raw(
        gateway, request_bytes("GET", b"/v1/chatkit/conversation", headers, close=False)
    )
    assert reply.status == 200
    forwarded = reply.json()["headers"]
    for name in (
        "connection",
        "x-nominated-one",
        "x-nominated-two",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ):
        assert name not in forwarded, name
    assert forwarded["x-end-to-end"] == "kept"
    assert forwarded["openai-beta"] == "chatkit_beta=v1"
    assert forwarded["authorization"] == f"Bearer {CLIENT_SECRET}"
    # Host is the upstream's, not what the client sent.
    assert forwarded["host"] == fake.url.removeprefix("http://")


async def test_hop_by_hop_response_headers_are_not_forwarded(gateway: GatewayProcess) -> None:
    # hop=1: the fake answers with Connection: X-Hop-Secret, keep-alive, plus
    # X-Hop-Secret, Keep-Alive, Proxy-Connection and an end-to-end X-End-To-End.
    reply = await send_raw(
        gateway, request_bytes("GET", b"/v1/chatkit/conversation?hop=1", AUTH.items())
    )
    assert reply.status == 200
    names = {name for name, _ in reply.headers}
    assert "x-hop-secret" not in names
    assert "keep-alive" not in names
    assert "proxy-connection" not in names
    assert "x-hop-secret" not in (reply.header("connection") or "").lower()
    assert reply.header("x-end-to-end") == "yes"


async def test_repeated_set_cookie_headers_arrive_intact(gateway: GatewayProcess) -> None:
    reply = await send_raw(
        gateway, request_bytes("GET", b"/v1/chatkit/conversation?set_cookies=3", AUTH.items())
    )
    assert reply.status == 200
    assert reply.all("set-cookie") == [f"fake{i}=v{i}; Path=/; HttpOnly" for i in range(3)]


@pytest.mark.parametrize(
    ("sent", "propagated"),
    [
        ("trace-abc_123.4:5", True),  # well-formed: kept end to end
        ("not a valid id", False),  # spaces: replaced by a fresh one
        ("x" * 200, False),  # too long
        (None, False),  # none sent: generated
    ],
)
async def test_request_id_is_propagated_or_generated(
    gateway: GatewayProcess, fake: FakeUpstream, sent: str | None, propagated: bool
) -> None:
    headers = [*AUTH.items()] + ([("X-Request-Id", sent)] if sent is not None else [])
    reply = await send_raw(gateway, request_bytes("GET", b"/v1/chatkit/conversation", headers))
    assert reply.status == 200
    upstream_saw = reply.json()["headers"]["x-request-id"]
    if propagated:
        assert upstream_saw == sent
    else:
        assert upstream_saw != sent
        assert len(upstream_saw) == 32
    # The client learns the id the upstream was given, once.
    assert reply.all("x-request-id") == [upstream_saw]


async def test_gateway_errors_carry_the_request_id(gateway: GatewayProcess) -> None:
    headers = [("X-Request-Id", "trace-404")]
    reply = await send_raw(gateway, request_bytes("GET", b"/v1/models", headers))
    assert_openai_error(reply, 404, "unknown_route")
    assert reply.header("x-request-id") == "trace-404"


async def test_via_is_added_both_ways(gateway: GatewayProcess) -> None:
    headers = [*AUTH.items(), ("Via", "1.1 edge-proxy")]
    reply = await send_raw(gateway, request_bytes("GET", b"/v1/chatkit/conversation", headers))
    assert reply.json()["headers"]["via"] == "1.1 edge-proxy, 1.1 chatkit-gateway"
    assert reply.all("via") == ["1.1 chatkit-gateway"]


async def test_client_forwarding_headers_are_not_trusted(gateway: GatewayProcess) -> None:
    headers = [
        *AUTH.items(),
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Host", "admin.internal"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=198.51.100.1;proto=https"),
        ("X-Real-IP", "198.51.100.1"),
    ]
    reply = await send_raw(gateway, request_bytes("GET", b"/v1/chatkit/conversation", headers))
    forwarded = reply.json()["headers"]
    assert forwarded["x-forwarded-for"] == "127.0.0.1"  # the real peer only
    assert forwarded["x-forwarded-proto"] == "http"
    for name in ("x-forwarded-host", "forwarded", "x-real-ip"):
        assert name not in forwarded


@pytest.mark.parametrize(
    "query",
    [
        b"a=1&b=2",
        b"b=2&a=1&a=3",  # order and repeats kept
        b"x=%2F%2e%2E%5c&y=a+b%20c",  # encoded delimiters are not decoded
        b"path=/../../etc/passwd&dots=./.",  # dot segments in a query are data
        b"empty=&flag&=v&&",
        b"utf8=%C3%A9&odd=%zz&pct=100%",
        b"q=?x?&r=:@!$'()*,;/",
    ],
)
async def test_query_strings_pass_unchanged(
    gateway: GatewayProcess, fake: FakeUpstream, query: bytes
) -> None:
    reply = await send_raw(
        gateway, request_bytes("GET", b"/v1/chatkit/conversation?" + query, AUTH.items())
    )
    assert reply.status == 200
    assert reply.json()["query"] == query.decode()
    assert only(fake.requests).query == query.decode()


async def test_server_route_query_reaches_the_upstream(
    gateway: GatewayProcess, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    url = f"{gateway.url}/v1/chatkit/threads?limit=2&order=asc&user=user_alice"
    async with http.get(url, headers=API_KEY) as resp:
        assert resp.status == 200
        page = await resp.json()
    assert [thread["id"] for thread in page["data"]] == ["cthr_seed0", "cthr_seed1"]
    assert only(fake.requests).query == "limit=2&order=asc&user=user_alice"


# -- the route table over the wire ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("POST", b"/v1/chatkit/sessions", API_KEY),
        ("GET", b"/v1/chatkit/threads", API_KEY),
        ("GET", b"/v1/chatkit/threads/cthr_seed1", API_KEY),
        ("GET", b"/v1/chatkit/threads/cthr_seed1/items", API_KEY),
        ("POST", b"/v1/chatkit/conversation", AUTH),
        ("POST", b"/v1/chatkit/domain_keys/verify_hosted", AUTH),
    ],
)
async def test_allowed_routes_are_forwarded_as_sent(
    gateway: GatewayProcess,
    fake: FakeUpstream,
    method: str,
    target: bytes,
    headers: dict[str, str],
) -> None:
    body = json.dumps({"user": "user_1", "workflow": {"id": "wf_1"}}).encode()
    reply = await send_raw(
        gateway,
        request_bytes(
            method, target, [*headers.items(), ("Content-Type", "application/json")], body
        ),
    )
    assert reply.status == 200, reply.body
    seen = only(fake.requests)
    assert (seen.method, seen.path) == (method, target.decode())


HOSTILE_TARGETS = [
    # Dot segments, literal and encoded.
    b"/v1/chatkit/../admin",
    b"/v1/chatkit/./conversation",
    b"/v1/chatkit/%2e%2e/sessions",
    b"/v1/chatkit/%2E%2E/sessions",
    b"/v1/chatkit/conversation/..%2f..%2fadmin",
    # Encoded slashes and backslashes.
    b"/v1/chatkit/threads%2fcthr_seed1",
    b"/v1/chatkit/threads%2Fcthr_seed1",
    b"/v1/chatkit/x%5c..%5cadmin",
    b"/v1/chatkit/x%5C..%5Cadmin",
    # Raw backslashes and double slashes.
    b"/v1/chatkit\\..\\admin",
    b"/v1//chatkit/conversation",
    b"//evil.example/v1/chatkit/conversation",
    # Malformed and forbidden percent-encodings.
    b"/v1/chatkit/%zz",
    b"/v1/chatkit/conversation%",
    b"/v1/chatkit/x%00",
    b"/v1/chatkit/x%0d%0aX-Injected:%201",
    b"/v1/chatkit/caf%c3%a9",
    # Raw control and non-ASCII bytes (refused by the HTTP parser itself).
    b"/v1/chatkit/x\x01y",
    b"/v1/chatkit/x\x7fy",
    b"/v1/chatkit/caf\xc3\xa9",
    # Absolute-form and asterisk-form targets: this is not a forward proxy.
    b"http://evil/v1/chatkit/x",
    b"http://evil/v1/chatkit/conversation",
    b"https://api.openai.com/v1/chatkit/sessions",
    b"*",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
async def test_hostile_targets_are_400_and_never_forwarded(
    gateway: GatewayProcess, fake: FakeUpstream, target: bytes
) -> None:
    reply = await send_raw(gateway, request_bytes("POST", target, AUTH.items(), b"{}"))
    assert_openai_error(reply, 400)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", b"/", 404),
        ("GET", b"/v1/models", 404),
        ("POST", b"/v1/chat/completions", 404),
        ("POST", b"/v1/responses", 404),
        ("GET", b"/v1/chatkit", 404),
        ("POST", b"/v1/chatkit/", 404),
        ("POST", b"/v2/chatkit/sessions", 404),
        ("GET", b"/admin", 404),
        ("TRACE", b"/v1/chatkit/conversation", 405),
        ("CONNECT", b"/v1/chatkit/sessions", 405),
    ],
)
async def test_unknown_routes_are_refused_and_never_forwarded(
    gateway: GatewayProcess, fake: FakeUpstream, method: str, target: bytes, status: int
) -> None:
    reply = await send_raw(gateway, request_bytes(method, target, AUTH.items()))
    assert_openai_error(reply, status)
    assert fake.requests == []


async def test_gateway_endpoints_are_answered_locally(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    for target in (b"/healthz", b"/readyz"):
        reply = await send_raw(gateway, request_bytes("GET", target))
        assert reply.status == 200, reply.body
    assert fake.requests == []


async def test_too_many_headers_are_431_and_never_forwarded(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    headers = [*AUTH.items()] + [(f"X-Filler-{i}", "x") for i in range(120)]
    reply = await send_raw(gateway, request_bytes("GET", b"/v1/chatkit/conversation", headers))
    assert_openai_error(reply, 431)
    assert fake.requests == []


# -- errors -----------------------------------------------------------------------------


async def test_unreachable_upstream_is_502(fake: FakeUpstream) -> None:
    closed = free_port()  # nothing listens there
    async with GatewayProcess(f"http://127.0.0.1:{closed}", env=CLIENT_ENV) as gw:
        for method, target, headers in [
            ("POST", b"/v1/chatkit/conversation", AUTH),
            ("GET", b"/v1/chatkit/threads", API_KEY),
        ]:
            reply = await send_raw(gw, request_bytes(method, target, headers.items()))
            error = assert_openai_error(reply, 502, "upstream_unavailable")
            assert error["type"] == "api_error"


async def test_upstream_stall_is_504(strict_gateway: GatewayProcess, fake: FakeUpstream) -> None:
    headers = [*AUTH.items(), ("X-Fake-Fault", "stall")]
    started = time.monotonic()
    reply = await send_raw(
        strict_gateway, request_bytes("POST", b"/v1/chatkit/conversation", headers, b"{}")
    )
    elapsed = time.monotonic() - started
    error = assert_openai_error(reply, 504, "upstream_timeout")
    assert error["type"] == "api_error"
    assert STRICT_READ_TIMEOUT * 0.9 <= elapsed < 20
    # The gateway gave up on the upstream request too.
    await fake.wait_for(lambda: fake.active == 0)
    assert only(fake.requests).disconnected


async def test_upstream_stall_mid_stream_cuts_the_response(
    strict_gateway: GatewayProcess, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    # Headers are already sent, so no 504 can follow: the stream must end in a
    # way the client can tell from a complete response.
    headers = {**AUTH, "Accept": "text/event-stream", "X-Fake-Fault": "stall_mid_stream"}
    url = f"{strict_gateway.url}/v1/chatkit/conversation?events=5"
    async with http.post(url, json={}, headers=headers) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()
    await fake.wait_for(lambda: fake.active == 0)


async def test_declared_body_over_the_limit_is_413_unread(
    strict_gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    headers = [*AUTH.items(), ("Content-Length", str(STRICT_BODY_LIMIT + 1))]
    head = request_bytes("POST", b"/v1/chatkit/files", headers)
    # Only the head is sent: the gateway must answer without waiting for the body.
    reply = await exchange(strict_gateway, head, [])
    assert_openai_error(reply, 413, "request_too_large")
    assert fake.requests == []


async def test_body_exactly_at_the_limit_passes(
    strict_gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    body = os.urandom(STRICT_BODY_LIMIT)
    headers = [*AUTH.items(), ("Content-Length", str(len(body)))]
    reply = await exchange(
        strict_gateway, request_bytes("POST", b"/v1/chatkit/files", headers), [body]
    )
    assert reply.status == 200
    assert reply.json()["body_sha256"] == sha256(body)


async def test_chunked_body_over_the_limit_is_413(
    strict_gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    chunk = os.urandom(64 * 1024)
    count = STRICT_BODY_LIMIT // len(chunk) + 8  # about half a megabyte too much
    wire = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * count + [b"0\r\n\r\n"]
    headers = [*AUTH.items(), ("Transfer-Encoding", "chunked")]
    reply = await exchange(
        strict_gateway, request_bytes("POST", b"/v1/chatkit/files", headers), wire
    )
    assert_openai_error(reply, 413, "request_too_large")
    # Whatever had started upstream was abandoned, never completed.
    await fake.wait_for(lambda: fake.active == 0)
    assert not any(seen.completed for seen in fake.requests)


async def test_answers_given_before_the_body_is_read_reach_the_client(
    strict_gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    """An answer that comes while the upload is still arriving (a missing
    secret, a body over the limit) must not be destroyed by the reset that
    closing a socket with unread input sends: the gateway lingers instead."""
    chunk = os.urandom(256 * 1024)
    over = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8 + [b"0\r\n\r\n"]
    for _ in range(40):
        chunked = [*AUTH.items(), ("Transfer-Encoding", "chunked")]
        reply = await exchange(
            strict_gateway, request_bytes("POST", b"/v1/chatkit/files", chunked), over
        )
        assert_openai_error(reply, 413, "request_too_large")
        sized = [("Content-Length", str(3 * len(chunk)))]  # and no secret at all
        reply = await exchange(
            strict_gateway, request_bytes("POST", b"/v1/chatkit/files", sized), [chunk] * 3
        )
        assert_openai_error(reply, 401)


@pytest.mark.parametrize("status", [400, 404, 409, 429, 500, 503])
async def test_injected_upstream_errors_pass_through_untouched(
    gateway: GatewayProcess, fake: FakeUpstream, http: aiohttp.ClientSession, status: int
) -> None:
    headers = {**AUTH, "X-Fake-Fault": "status", "X-Fake-Fault-Status": str(status)}
    path = "/v1/chatkit/conversation"
    async with http.post(f"{fake.url}{path}", data=b"{}", headers=headers) as direct:
        expected = (direct.status, direct.headers["Content-Type"], await direct.read())
    async with http.post(f"{gateway.url}{path}", data=b"{}", headers=headers) as proxied:
        got = (proxied.status, proxied.headers["Content-Type"], await proxied.read())
    assert got == expected
    assert expected[0] == status


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/v1/chatkit/threads/cthr_missing", API_KEY, 404),  # the upstream's own 404
        ("GET", "/v1/chatkit/threads", {}, 401),  # no API key: the upstream says so
        ("POST", "/v1/chatkit/sessions", API_KEY, 400),  # invalid body, upstream's words
    ],
)
async def test_upstream_error_answers_pass_through_untouched(
    gateway: GatewayProcess,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    body = b'{"user": ""}' if method == "POST" else None
    async with http.request(method, f"{fake.url}{path}", data=body, headers=headers) as direct:
        expected = (direct.status, await direct.read())
    async with http.request(method, f"{gateway.url}{path}", data=body, headers=headers) as proxied:
        got = (proxied.status, await proxied.read())
    assert got == expected
    assert expected[0] == status


# -- client disconnects --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("POST", b"{}"),  # disconnect after the body was sent
        ("GET", b""),  # no body at all
    ],
)
async def test_disconnect_before_the_answer_cancels_the_upstream_request(
    gateway: GatewayProcess, fake: FakeUpstream, method: str, body: bytes
) -> None:
    async with connection(gateway.host, gateway.port) as (_, writer):
        headers = [*AUTH.items(), ("X-Fake-Fault", "stall")]
        writer.write(request_bytes(method, b"/v1/chatkit/conversation", headers, body, close=False))
        await writer.drain()
        await fake.wait_for(lambda: fake.active == 1)
    # The read timeout is a minute away: only the disconnect can end it now.
    await fake.wait_for(lambda: fake.active == 0, timeout=10)
    seen = only(fake.requests)
    assert seen.disconnected
    assert seen.status is None  # the upstream never answered


async def test_disconnect_mid_stream_cancels_the_upstream_request(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    headers = [
        *AUTH.items(),
        ("Accept", "text/event-stream"),
        ("X-Fake-Fault", "stall_mid_stream"),
        ("X-Fake-Fault-After", "2"),
    ]
    async with connection(gateway.host, gateway.port) as (reader, writer):
        writer.write(request_bytes("GET", b"/v1/chatkit/conversation", headers, close=False))
        await writer.drain()
        async with asyncio.timeout(10):
            received = b""
            while received.count(b"data: ") < 2:
                received += await reader.read(65536)
    # The upstream would stay silent forever: only the gateway hanging up ends it.
    await fake.wait_for(lambda: fake.active == 0, timeout=10)
    seen = only(fake.requests)
    assert seen.disconnected
    assert seen.status == 200


async def test_many_disconnects_give_every_pool_slot_back(fake: FakeUpstream) -> None:
    slots, clients = 8, 50
    env = {
        **CLIENT_ENV,
        "GATEWAY_UPSTREAM_MAX_CONNECTIONS": str(slots),
        "GATEWAY_UPSTREAM_POOL_TIMEOUT": "20",
    }
    async with GatewayProcess(fake.url, env=env) as gw:
        connections = []
        for index in range(clients):
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            headers = [*AUTH.items(), ("X-Client", str(index))]
            if index % 2:
                # Half are streams that go quiet after one event...
                headers += [
                    ("Accept", "text/event-stream"),
                    ("X-Fake-Fault", "stall_mid_stream"),
                    ("X-Fake-Fault-After", "1"),
                ]
                data = request_bytes("GET", b"/v1/chatkit/conversation", headers, close=False)
            else:
                # ...and half are requests the upstream never answers.
                headers.append(("X-Fake-Fault", "stall"))
                data = request_bytes(
                    "POST", b"/v1/chatkit/conversation", headers, b"{}", close=False
                )
            writer.write(data)
            await writer.drain()
            connections.append((reader, writer))
        # Every slot is taken; the other 42 clients wait for one.
        await fake.wait_for(lambda: fake.active == slots, timeout=20)
        # The streams that got through have started: read their first event.
        for seen in list(fake.requests):
            index = int(seen.header("X-Client") or "-1")
            if index % 2:
                reader = connections[index][0]
                async with asyncio.timeout(10):
                    assert b"data: " in await reader.readuntil(b"\n\n")
        for index, (_, writer) in enumerate(connections):
            if index % 3 == 0:
                writer.transport.abort()  # some leave with a reset, the rest with a FIN
            else:
                writer.close()
        for _, writer in connections:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await fake.wait_for(lambda: fake.active == 0, timeout=30)
        assert all(seen.disconnected for seen in fake.requests)
        assert slots <= len(fake.requests) <= clients

        # Requests still queued for a slot when their clients left may take a
        # freed slot for an instant before their own cancellation lands: wait
        # until the gateway holds no exchange at all. A leaked slot (an
        # exchange that never ends) keeps this above zero and fails here.
        async def none_in_flight() -> bool:
            async with aiohttp.ClientSession() as probe:
                samples = await scrape(probe, gw.url)
            # The scrape itself is answered by the gateway's own endpoint, not
            # counted as a proxied exchange.
            return metric_value(samples, "chatkit_gateway_requests_in_flight") == 0

        await eventually(none_in_flight, timeout=20, what="every exchange to end")

        # Every slot can be used again at once: 8 slow requests in flight together.
        fake.reset_records()
        slow = [("X-Fake-Fault", "delay"), ("X-Fake-Fault-Seconds", "3")]
        replies = [
            asyncio.create_task(
                send_raw(gw, request_bytes("GET", b"/v1/chatkit/slow", [*AUTH.items(), *slow]))
            )
            for _ in range(slots)
        ]
        await fake.wait_for(lambda: fake.active == slots, timeout=10)
        assert [reply.status for reply in await asyncio.gather(*replies)] == [200] * slots
        # And the pool keeps serving.
        quick = await asyncio.gather(
            *(
                send_raw(gw, request_bytes("GET", b"/v1/chatkit/after", AUTH.items()))
                for _ in range(3 * slots)
            )
        )
        assert [reply.status for reply in quick] == [200] * (3 * slots)


async def test_disconnect_mid_upload_does_not_corrupt_the_next_requests(
    fake: FakeUpstream,
) -> None:
    # One upstream connection: whatever the aborted upload left behind, the
    # following requests would have to use the same pool slot.
    env = {**CLIENT_ENV, "GATEWAY_UPSTREAM_MAX_CONNECTIONS": "1"}
    declared = 4 * MIB
    async with GatewayProcess(fake.url, env=env) as gw:
        for round_, leave in enumerate(["close", "abort", "close"]):
            fake.reset_records()
            _, writer = await asyncio.open_connection(gw.host, gw.port)
            headers = [*AUTH.items(), ("Content-Length", str(declared))]
            writer.write(request_bytes("POST", b"/v1/chatkit/upload", headers, close=False))
            writer.write(os.urandom(declared // 2))
            await writer.drain()
            await fake.wait_for(lambda: fake.count("/v1/chatkit/upload") == 1)
            upload = fake.requests[0]

            def upload_under_way(seen: Seen = upload) -> bool:
                return seen.body_bytes > 0

            await eventually(upload_under_way, timeout=10, what="the upload to reach the upstream")
            if leave == "abort":
                writer.transport.abort()
            else:
                writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await fake.wait_for(lambda: fake.active == 0, timeout=10)
            assert not upload.completed
            assert upload.body_bytes < declared

            # The next requests reach the upstream as themselves, bodies intact.
            bodies = [os.urandom(10_000 + i) for i in range(3)]
            for index, body in enumerate(bodies):
                target = f"/v1/chatkit/after/{round_}/{index}".encode()
                reply = await send_raw(gw, request_bytes("POST", target, AUTH.items(), body))
                assert reply.status == 200, reply.body
                echo = reply.json()
                assert echo["path"] == target.decode()
                assert echo["body_sha256"] == sha256(body)
            after = fake.requests[1:]
            assert [seen.path for seen in after] == [
                f"/v1/chatkit/after/{round_}/{i}" for i in range(3)
            ]
            assert [seen.body_sha256 for seen in after] == [sha256(body) for body in bodies]
            assert not upload.completed  # nothing was appended to the aborted upload


# -- the official SDK and the process lifecycle ------------------------------------------


async def test_official_openai_sdk_works_through_the_gateway(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    async with openai_sdk(gateway, "sk-test") as client:
        session = await client.beta.chatkit.sessions.create(
            user="user_sdk",
            workflow={"id": "wf_sdk"},
            rate_limits={"max_requests_per_1_minute": 7},
        )
        assert session.id.startswith("cksess_")
        assert session.client_secret
        assert session.max_requests_per_1_minute == 7
        page = await client.beta.chatkit.threads.list(limit=2, order="asc")
        assert [thread.id for thread in page.data] == ["cthr_seed0", "cthr_seed1"]
        every = [thread.id async for thread in client.beta.chatkit.threads.list(limit=1)]
        assert every == ["cthr_seed2", "cthr_seed1", "cthr_seed0"]
        thread = await client.beta.chatkit.threads.retrieve("cthr_seed1")
        assert thread.id == "cthr_seed1"
    created = only(fake.requests[:1])
    assert created.path == "/v1/chatkit/sessions"
    assert created.header("OpenAI-Beta") == "chatkit_beta=v1"
    assert fake.sessions[session.id]["client_secret"] == session.client_secret


async def test_sigterm_lets_a_stream_finish_and_exits_zero(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    gw = GatewayProcess(fake.url, env=CLIENT_ENV)
    await gw.astart()
    try:
        url = f"{gw.url}/v1/chatkit/conversation?events=4&interval=0.3"
        async with http.post(url, json={}, headers={**AUTH, "Accept": "text/event-stream"}) as resp:
            assert resp.status == 200
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
            gw.proc.send_signal(signal.SIGTERM)
            rest = await resp.content.read()  # the stream in flight is drained
        assert rest.count(b"data: ") == 3
        code = await asyncio.to_thread(gw.proc.wait, 30)
    finally:
        await gw.astop()
    assert code == 0
    output = gw.output()
    assert "Traceback" not in output
    assert "Application shutdown complete" in output
