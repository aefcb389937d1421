"""No request leaves work for the cyclic garbage collector.

The gateway raises the collector's gen-0 threshold so that a collection is
rare; that only pays while request objects die by reference counting. A
reference cycle per request (an exchange held by its own cancelled task, a
cycle and a transport wrapper pointing at each other) would instead pile up
megabytes of garbage between collections and make each collection a pause
of many milliseconds. So: serve real requests in this process, with the
collector off, then collect with DEBUG_SAVEALL and look at what it found.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import aiohttp
import pytest

from gateway import proxy
from gateway.app import GatewayApp
from gateway.logs import DropStreamAborted
from gateway.protocol import GatewayHttpProtocol
from gateway.settings import load_settings
from tests.doubles import serving_in_process
from tests.fake_upstream import FakeUpstream, FaultName
from tests.harness import cancel_session, create_session, open_stream, until_closed
from tests.processes import raw_http, raw_upload

#: Where the objects of a request come from: the gateway, its server, its client.
OWN_MODULES = ("gateway", "uvicorn", "aiohttp", "httptools")
#: The same without aiohttp: the test's client and the fake upstream (both
#: aiohttp) see their connections cut and leave cycles of their own.
SERVER_MODULES = ("gateway", "uvicorn", "httptools")
BODY_LIMIT = 256 * 1024


@contextlib.contextmanager
def garbage_saved() -> Iterator[list[object]]:
    """Collector off inside; on exit, what a full collection found unreachable."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.extend(gc.garbage)
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
            gc.enable()


def own(objects: list[object], modules: tuple[str, ...] = OWN_MODULES) -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in objects:
        kind = type(obj)
        if kind.__module__.split(".", 1)[0] in modules:
            counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return counts


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture
def app(upstream: FakeUpstream) -> GatewayApp:
    settings = load_settings(
        {
            "GATEWAY_UPSTREAM_URL": upstream.url,
            "GATEWAY_UNKNOWN_SECRETS": "allow",
            "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "100000",
            "GATEWAY_MAX_BODY_BYTES": str(BODY_LIMIT),
        }
    )
    return GatewayApp(settings)


async def test_served_requests_leave_nothing_for_the_cyclic_collector(app: GatewayApp) -> None:
    secret = {"Authorization": "Bearer ek_garbage_test"}
    post = request("POST", "/v1/chatkit/conversation", secret, b'{"type":"threads.list"}')
    get = request("GET", "/v1/chatkit/threads", {"Authorization": "Bearer sk-garbage-test"})
    refused = request("POST", "/v1/chatkit/conversation", {}, b"{}")  # no secret: 401
    too_large = request("POST", "/v1/chatkit/files", secret)  # head only, body streamed
    too_large = too_large.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % (4 * BODY_LIMIT))
    async with serving_in_process(app, http=GatewayHttpProtocol, access_log=False) as port:

        async def one_of_each() -> list[bytes]:
            replies = [
                await raw_http("127.0.0.1", port, post, read_until_close=False),
                await raw_http("127.0.0.1", port, get, read_until_close=False),
                await raw_http("127.0.0.1", port, refused, read_until_close=False),
            ]
            reply, _ = await raw_upload(
                "127.0.0.1", port, too_large, [os.urandom(BODY_LIMIT)] * 4, read_until_close=False
            )
            return [*replies, reply]

        # Warm up (caches, pools and lazily built objects live for good).
        for _ in range(5):
            await one_of_each()
        with garbage_saved() as found:
            for _ in range(40):
                statuses = [reply.split(b" ", 2)[1] for reply in await one_of_each()]
                assert statuses == [b"200", b"200", b"401", b"413"]
    left = own(found)
    assert not left, f"request objects left in reference cycles: {left.most_common(10)}"


@contextlib.contextmanager
def cut_streams_not_logged() -> Iterator[None]:
    """What the gateway's log configuration does, under a test's own logging.

    uvicorn logs the StreamAborted that cuts a stream with its traceback;
    pytest would keep that record, and through its frames every object of
    the cut stream, out of the collector's reach until the test ends.
    """
    server_log = logging.getLogger("uvicorn.error")
    dropped = DropStreamAborted()
    server_log.addFilter(dropped)
    try:
        yield
    finally:
        server_log.removeFilter(dropped)


@dataclass(frozen=True)
class Served:
    url: str


async def test_streams_cut_by_a_revocation_leave_nothing_for_the_cyclic_collector(
    app: GatewayApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream's objects are old when a cancel cuts it (a stream lives for
    # minutes), so a cycle among them waits for a collection of the oldest
    # generation, which the gateway's thresholds make rare: in the scale soak
    # RSS grew by about 5 KiB per stream cut. A cut cancels the exchange's
    # disconnect watcher, which starts after WATCH_AFTER; at 0 it runs from
    # the loop turn after the request was read, so before a stream's first
    # event reaches the client: every cut below cancels one.
    monkeypatch.setattr(proxy, "WATCH_AFTER", 0.0)
    async with (
        serving_in_process(app, http=GatewayHttpProtocol, access_log=False) as port,
        aiohttp.ClientSession() as http,
    ):
        gateway = Served(f"http://127.0.0.1:{port}")

        async def cut_streams(count: int) -> None:
            session = await create_session(http, gateway.url)
            streams = [
                await open_stream(http, gateway, session["client_secret"], events=10_000)
                for _ in range(count)
            ]
            await cancel_session(http, gateway.url, session["id"])
            for stream in streams:
                events, _ = await until_closed(stream)
                assert events < 10_000  # cut by the cancel, not run to its end

        with cut_streams_not_logged():
            await cut_streams(2)  # warm-up
            with garbage_saved() as found:
                for _ in range(5):
                    await cut_streams(4)
    left = own(found, SERVER_MODULES)
    frames = Counter(
        f"{obj.f_code.co_filename.rsplit('/', 1)[-1]}:{obj.f_code.co_name}"
        for obj in found
        if isinstance(obj, FrameType) and "/gateway/" in obj.f_code.co_filename
    )
    assert not left, f"cut streams' objects left in reference cycles: {left.most_common(10)}"
    assert not frames, f"gateway frames left in reference cycles: {frames.most_common(10)}"


@pytest.mark.parametrize(
    "fault",
    [
        # The upstream goes silent mid-stream: the read timeout cuts the stream.
        "stall_mid_stream",
        # The upstream resets the connection mid-stream.
        "reset_mid_stream",
    ],
)
async def test_streams_cut_by_the_upstream_leave_nothing_for_the_cyclic_collector(
    upstream: FakeUpstream, fault: FaultName
) -> None:
    # aiohttp keeps the error on the response's reader, and the error's
    # traceback runs through the reader's frames and the gateway's: unless
    # the gateway drops that traceback where it translates the error, the
    # whole cut stream stays in a cycle.
    app = GatewayApp(
        load_settings(
            {
                "GATEWAY_UPSTREAM_URL": upstream.url,
                "GATEWAY_UNKNOWN_SECRETS": "allow",
                "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "100000",
                "GATEWAY_UPSTREAM_READ_TIMEOUT": "0.2",
            }
        )
    )
    headers = {"Authorization": "Bearer ek_cut_test", "Accept": "text/event-stream"}
    async with (
        serving_in_process(app, http=GatewayHttpProtocol, access_log=False) as port,
        aiohttp.ClientSession() as http,
    ):
        gateway = Served(f"http://127.0.0.1:{port}")

        async def cut_stream() -> None:
            upstream.inject(fault, path_prefix="/v1/chatkit/conversation", after=1)
            response = await http.post(
                f"{gateway.url}/v1/chatkit/conversation?events=100&interval=0.01",
                json={"type": "threads.create", "params": {}},
                headers=headers,
            )
            assert response.status == 200, response.status
            events, _ = await until_closed(response)
            assert events <= 2  # cut after the upstream's first event

        with cut_streams_not_logged():
            await cut_stream()  # warm-up
            with garbage_saved() as found:
                for _ in range(10):
                    await cut_stream()
    left = own(found, SERVER_MODULES)
    assert not left, f"cut streams' objects left in reference cycles: {left.most_common(10)}"
