"""Hostile or broken clients against a real gateway process, over raw sockets.

What is checked here happens in the HTTP/1.1 connection (gateway/protocol.py),
before the application sees a request: the Host and Transfer-Encoding rules,
Upgrade, the limits on the request head while it is read, and closing the
connection rather than reading a body the gateway has refused.

One fake upstream and one gateway are shared by the module; an autouse fixture
clears the fake's records, so a test can prove what was never forwarded.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from gateway.app import GatewayApp
from gateway.protocol import GatewayHttpProtocol
from gateway.settings import load_settings
from tests.doubles import serving_in_process
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, connection, raw_http, raw_upload

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1024 * 1024
BODY_LIMIT = 1_000_000
ENV = {
    "GATEWAY_UNKNOWN_SECRETS": "allow",
    "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "1000000",
    "GATEWAY_MAX_BODY_BYTES": str(BODY_LIMIT),
}
CLIENT = b"/v1/chatkit/conversation"
AUTH = b"Authorization: Bearer ek_hostile_tests\r\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fake: FakeUpstream) -> AsyncIterator[GatewayProcess]:
    async with GatewayProcess(fake.url, env=ENV) as gw:
        yield gw


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def fresh_upstream(fake: FakeUpstream) -> AsyncIterator[None]:
    fake.reset_records()
    yield
    await fake.wait_for(lambda: fake.active == 0, timeout=15)


async def send(gw: GatewayProcess, data: bytes, *, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
    """Write ``data``, read until the gateway closes (each case here closes)."""
    return await raw_http(gw.host, gw.port, data, timeout=timeout)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- Host (RFC 9112 3.2) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # HTTP/1.1 without Host: a MUST-400.
        (b"GET /healthz HTTP/1.1\r\n", 400),
        # Two Host lines, even equal ones.
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n", 400),
        # Not a uri-host[:port]: space, userinfo, path, empty, bad port.
        (b"GET /healthz HTTP/1.1\r\nHost: a b\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: user@a\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a/b\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost:\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a:80x\r\n", 400),
        # An absolute-form target naming another authority than Host.
        (b"GET http://b/healthz HTTP/1.1\r\nHost: a\r\n", 400),
        # Well formed: name, name:port, IPv4, IPv6 literal.
        (b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n", 200),
        (b"GET /healthz HTTP/1.1\r\nHost: gateway.test:8080\r\n", 200),
        (b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1\r\n", 200),
        (b"GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\n", 200),
        # HTTP/1.0 has no Host requirement.
        (b"GET /healthz HTTP/1.0\r\n", 200),
    ],
)
async def test_host_must_be_present_once_and_well_formed(
    gateway: GatewayProcess, head: bytes, status: int
) -> None:
    reply = await send(gateway, head + b"Connection: close\r\n\r\n")
    assert status_of(reply) == status, reply
    if status == 400:
        assert b'"code":"invalid_request"' in reply


async def test_a_request_with_a_bad_host_is_never_forwarded(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    for host in (b"", b"Host: a\r\nHost: b\r\n", b"Host: a b\r\n"):
        reply = await send(gateway, b"GET " + CLIENT + b" HTTP/1.1\r\n" + host + AUTH + b"\r\n")
        assert status_of(reply) == 400, reply
    assert fake.count() == 0


# -- Transfer-Encoding (RFC 9112 6.1) -------------------------------------------------


@pytest.mark.parametrize(
    ("codings", "status"),
    [
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        # The same list split over two lines.
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding: identity, chunked\r\n", 501),
        # Any case and spacing of exactly "chunked" is fine.
        (b"Transfer-Encoding:  Chunked \r\n", 200),
    ],
)
async def test_only_the_chunked_transfer_coding_is_accepted(
    gateway: GatewayProcess, fake: FakeUpstream, codings: bytes, status: int
) -> None:
    head = b"POST " + CLIENT + b" HTTP/1.1\r\nHost: a\r\n" + AUTH + codings
    reply = await send(gateway, head + b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert status_of(reply) == status, reply
    if status == 501:
        assert b'"code":"transfer_coding_not_implemented"' in reply
        assert fake.count() == 0
    else:
        assert fake.requests[0].body_bytes == 3


async def test_transfer_encoding_in_http_1_0_is_refused(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    head = b"POST " + CLIENT + b" HTTP/1.0\r\nHost: a\r\n" + AUTH
    reply = await send(gateway, head + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert status_of(reply) == 400, reply
    assert fake.count() == 0


# -- Upgrade ------------------------------------------------------------------------

H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


async def test_h2c_upgrade_without_a_body_is_served_as_http_1_1(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    # A second request pipelined behind it proves the connection stays HTTP/1.1.
    data = (
        b"GET /v1/chatkit/threads HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-x\r\n"
        + H2C
        + b"\r\nGET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    reply = await send(gateway, data)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert reply.count(b"HTTP/1.1 200 ") == 2, reply
    assert b"101 Switching" not in reply
    seen = fake.requests[0]
    assert seen.header("upgrade") is None
    assert seen.header("http2-settings") is None


async def test_h2c_upgrade_with_a_body_is_answered_at_once(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    # What `curl --http2 -d ...` sends to an http:// URL: it used to hang
    # until the client gave up, with the upstream request open.
    head = b"POST " + CLIENT + b" HTTP/1.1\r\nHost: a\r\n" + AUTH + H2C
    started = time.monotonic()
    reply = await send(gateway, head + b"Content-Length: 5\r\n\r\nhello", timeout=3)
    assert status_of(reply) == 400, reply
    assert time.monotonic() - started < 2
    assert fake.count() == 0


# -- limits on the head, enforced while it is read -----------------------------------


async def test_a_long_target_is_refused_with_414(gateway: GatewayProcess) -> None:
    reply = await send(gateway, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(reply) == 414, reply
    assert b'"code":"request_target_too_long"' in reply


async def test_too_many_header_fields_are_refused_with_431(gateway: GatewayProcess) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(101))
    reply = await send(gateway, b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert status_of(reply) == 431, reply


async def _bomb(gw: GatewayProcess, total: int) -> tuple[bytes, int]:
    """Stream one endless header value; return the reply and the bytes written."""
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Bomb: "
    chunks = itertools.repeat(b"a" * MIB, total // MIB)
    return await raw_upload(gw.host, gw.port, head, chunks)


async def test_header_bomb_is_refused_after_the_limit_not_after_the_value(
    gateway: GatewayProcess,
) -> None:
    rss_before = rss_bytes(gateway.proc.pid)
    bombs = [asyncio.ensure_future(_bomb(gateway, 64 * MIB)) for _ in range(4)]
    # Meanwhile the replica keeps answering its liveness probe promptly.
    for _ in range(5):
        started = time.monotonic()
        probe = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        assert status_of(await send(gateway, probe, timeout=2)) == 200
        assert time.monotonic() - started < 1
    for reply, written in await asyncio.gather(*bombs):
        assert status_of(reply) == 431, reply[:200]
        # Socket buffers on both sides hold a few MiB; the value was 64 MiB.
        assert written < 24 * MIB
    assert rss_bytes(gateway.proc.pid) - rss_before < 32 * MIB


# -- a refused body is not read -------------------------------------------------------


async def _upload(gw: GatewayProcess, head: bytes, total: int) -> tuple[bytes, int]:
    """Send ``head`` then up to ``total`` body bytes; return the reply and bytes written."""
    chunk = b"a" * (256 * 1024)
    return await raw_upload(
        gw.host, gw.port, head, itertools.repeat(chunk, -(-total // len(chunk)))
    )


@pytest.mark.parametrize(
    "framing",
    [
        # Refused on the declared length, before any of it is read.
        b"Content-Length: 2000000000\r\n",
        # Refused once the counted body passes the limit.
        b"Transfer-Encoding: chunked\r\n",
    ],
)
async def test_after_a_413_the_connection_closes_instead_of_reading_on(
    gateway: GatewayProcess, framing: bytes
) -> None:
    head = b"POST " + CLIENT + b" HTTP/1.1\r\nHost: a\r\n" + AUTH + framing + b"\r\n"
    if framing.startswith(b"Transfer"):
        head += b"%x\r\n" % (2000 * MIB)  # one endless chunk
    # The client would go on for 2 GB; reading on used to take it all.
    reply, written = await _upload(gateway, head, 256 * MIB)
    if reply:  # the answer may be lost to the reset that closing an unread socket sends
        assert status_of(reply) == 413, reply[:300]
        assert b"connection: close" in reply.lower()
    assert written < 64 * MIB


async def test_a_body_read_in_pieces_keeps_the_connection_alive(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    # Head and body in separate reads (the 100-continue forces it): a body
    # that is read to the end does not cost the keep-alive connection.
    async with connection(gateway.host, gateway.port) as (reader, writer), asyncio.timeout(10):
        writer.write(
            b"POST "
            + CLIENT
            + b" HTTP/1.1\r\nHost: a\r\n"
            + AUTH
            + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" not in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    assert fake.requests[0].body_bytes == 5


# -- chunked trailers (RFC 9110 6.5.1) ------------------------------------------------

#: A secret that only the trailer carries, and a field only the trailer names.
TRAILER = b"0\r\nAuthorization: Bearer ek_from_the_trailer\r\nX-Trailer-Only: yes\r\n\r\n"


async def byte_by_byte(gw: GatewayProcess, data: bytes) -> bytes:
    """Write ``data`` one byte per write, so the gateway reads it in many pieces."""
    reply, _ = await raw_upload(gw.host, gw.port, b"", [data[i : i + 1] for i in range(len(data))])
    return reply


async def one_write(gw: GatewayProcess, data: bytes) -> bytes:
    return await send(gw, data)


Deliver = Callable[[GatewayProcess, bytes], Awaitable[bytes]]
DELIVERIES = [
    pytest.param(one_write, id="one-write"),
    pytest.param(byte_by_byte, id="byte-by-byte"),
]


@pytest.mark.parametrize("deliver", DELIVERIES)
async def test_a_secret_in_a_trailer_does_not_authenticate(
    gateway: GatewayProcess, fake: FakeUpstream, deliver: Deliver
) -> None:
    # No Authorization in the head: the trailer's must not stand in for it,
    # whether it arrives with the head or long after the app read the head.
    head = b"POST " + CLIENT + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    reply = await deliver(
        gateway, head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n" + TRAILER
    )
    assert status_of(reply) == 401, reply
    assert b'"code":"missing_client_secret"' in reply
    assert fake.count() == 0


@pytest.mark.parametrize("deliver", DELIVERIES)
@pytest.mark.parametrize(
    "head",
    [
        # Client traffic, admitted on the head's secret.
        b"POST " + CLIENT + b" HTTP/1.1\r\nHost: a\r\n" + AUTH,
        # Passed through to the hosted API without admission (a body on a
        # DELETE is unusual, not forbidden).
        b"DELETE /v1/chatkit/threads/thr_1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-x\r\n",
    ],
    ids=["client", "pass-through"],
)
async def test_trailer_fields_never_reach_the_upstream_as_headers(
    gateway: GatewayProcess, fake: FakeUpstream, deliver: Deliver, head: bytes
) -> None:
    data = head + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n" + TRAILER
    reply = await deliver(gateway, data)
    assert fake.count() == 1, reply
    seen = fake.requests[0]
    assert seen.body_bytes == 2
    assert seen.header("x-trailer-only") is None
    assert [value for name, value in seen.headers if name.lower() == "authorization"] == [
        head.split(b"Authorization: ")[1].split(b"\r\n")[0].decode()
    ]


async def test_an_endless_trailer_is_refused_with_431(gateway: GatewayProcess) -> None:
    # Trailer fields are dropped, but still read: their size is bounded like a head's.
    head = b"POST " + CLIENT + b" HTTP/1.1\r\nHost: a\r\n" + AUTH
    head += b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Bomb: "
    reply, written = await raw_upload(
        gateway.host, gateway.port, head, itertools.repeat(b"a" * (64 * 1024), 256)
    )
    if reply:  # the answer may be lost to the reset that closing an unread socket sends
        assert status_of(reply) == 431, reply[:300]
    assert written < 8 * MIB


# -- pipelined requests after a refused one -----------------------------------------

PIPELINED_GET = b"GET /v1/chatkit/threads HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-x\r\n\r\n"


@pytest.mark.parametrize(
    "after",
    [
        # Not HTTP at all.
        b"XXXX\r\n\r\n",
        # HTTP/1.1 without Host (RFC 9112 3.2: 400).
        b"GET /v1/chatkit/threads HTTP/1.1\r\nAuthorization: Bearer sk-x\r\n\r\n",
        # A second good request, then garbage: both answers come first.
        PIPELINED_GET + b"XXXX\r\n\r\n",
    ],
    ids=["garbage", "no-host", "good-then-garbage"],
)
async def test_a_refusal_after_pipelined_requests_comes_after_their_answers(
    gateway: GatewayProcess, fake: FakeUpstream, after: bytes
) -> None:
    logged_before = len(gateway.output())
    reply = await send(gateway, PIPELINED_GET + after)
    forwarded = 1 + after.count(PIPELINED_GET)
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [200] * forwarded + [400], reply
    # The last answer is the refusal, in the OpenAI shape.
    assert b'"code":"invalid_request"' in reply.rsplit(b"\r\n\r\n", 1)[1]
    # Exactly the requests that were answered 200 reached the upstream.
    await fake.wait_for(lambda: fake.count() == forwarded, timeout=5)
    assert [seen.path for seen in fake.requests] == ["/v1/chatkit/threads"] * forwarded
    # The gateway still answers, and logged no traceback on the way.
    probe = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    assert status_of(await send(gateway, probe)) == 200
    logged = gateway.output()[logged_before:]
    assert "Traceback" not in logged, logged
    assert "write_eof" not in logged, logged


async def test_a_refusal_while_the_earlier_answer_is_in_flight_waits_for_it(
    gateway: GatewayProcess, fake: FakeUpstream
) -> None:
    # The garbage arrives while the upstream still holds the first request:
    # the refusal used to cut that answer off (or come first).
    fake.inject("delay", path_prefix="/v1/chatkit/threads", seconds=3)
    reply = bytearray()
    async with connection(gateway.host, gateway.port) as (reader, writer), asyncio.timeout(15):
        writer.write(PIPELINED_GET)
        await fake.wait_for(lambda: fake.count() == 1, timeout=10)
        writer.write(b"XXXX\r\n\r\n")
        while chunk := await reader.read(65536):
            reply += chunk
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [200, 400], bytes(reply)
    assert fake.count() == 1


# -- header values beyond ASCII -------------------------------------------------------


class RawUpstream:
    """An upstream that records each request head exactly as its bytes arrived."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("field", "status"),
    [
        # obs-text (RFC 9110 5.5) that is not UTF-8: aiohttp would write it
        # re-encoded (\x80 as \xc2\x80), so it is refused.
        (b"x-fuzz: \x80", 400),
        (b"x-fuzz: a\xffb", 400),
        (b"authorization: Bearer \xff", 400),
        # UTF-8 goes out as the very bytes that came in.
        (b"x-fuzz: caf\xc3\xa9 \xe2\x82\xac", 200),
    ],
)
async def test_header_bytes_beyond_ascii_are_forwarded_unchanged_or_refused(
    field: bytes, status: int
) -> None:
    upstream = RawUpstream()
    async with upstream as url:
        app = GatewayApp(load_settings({"GATEWAY_UPSTREAM_URL": url}))
        async with serving_in_process(app, http=GatewayHttpProtocol, access_log=False) as port:
            # A pass-through route: the value reaches the upstream unless refused.
            head = b"GET /v1/chatkit/threads HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            if not field.startswith(b"authorization"):
                head += b"Authorization: Bearer sk-x\r\n"
            reply = await raw_http("127.0.0.1", port, head + field + b"\r\n\r\n")
    assert status_of(reply) == status, reply
    if status == 400:
        assert b'"code":"invalid_request"' in reply
        assert upstream.heads == []
    else:
        (seen,) = upstream.heads
        assert b"\r\n" + field + b"\r\n" in seen, seen
