"""Long-lived SSE streams: a paced upstream and a client that holds many streams.

``python -m bench.sse serve --port P`` answers any request with a
``text/event-stream`` that sends one event at once and then one every
``interval`` seconds (query ``interval``, default 1; ``events``, default
unlimited). Every event carries the upstream's ``CLOCK_MONOTONIC`` at the
moment it was written, so a client on the same machine can tell how long the
event took to arrive, whatever sits in between.

``python -m bench.sse drive ...`` opens ``--streams`` streams (raw asyncio
protocols: a 10,000-stream client must cost less than what it measures),
waits until every stream has its first event, prints ``OPEN`` and then either
holds them until a line arrives on stdin (``--hold``) or records every
event's delay for ``--seconds``; it prints one ``SSE_JSON`` line of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import cast

import uvloop
from aiohttp import web

_STAMP = re.compile(rb"t=(\d+);")


# -- the upstream ------------------------------------------------------------------


async def _stream(request: web.BaseRequest) -> web.StreamResponse:
    await request.read()
    interval = float(request.query.get("interval", "1"))
    events = int(request.query.get("events", "0")) or None
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    index = 0
    # Streams opened together would otherwise tick together: a random phase
    # makes their events independent, as real conversations' are.
    next_at = time.monotonic() + random.uniform(0, interval)
    await response.write(b'data: {"t":"t=%d;","i":0}\n\n' % time.monotonic_ns())
    while events is None or index < events:
        # Paced against the clock, not slept between writes, so a slow write
        # does not drift every later event.
        await asyncio.sleep(max(next_at - time.monotonic(), 0))
        index += 1
        stamp = time.monotonic_ns()
        await response.write(b'data: {"t":"t=%d;","i":%d}\n\n' % (stamp, index))
        next_at += interval
    await response.write_eof()
    return response


async def _serve(port: int) -> None:
    server = web.Server(_stream, handler_cancellation=True)
    runner = web.ServerRunner(server, access_log=None)
    await runner.setup()
    # A backlog the size of the stream count: thousands connect at once.
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=16384)
    await site.start()
    await asyncio.Event().wait()


# -- the client --------------------------------------------------------------------


@dataclass
class Figures:
    streams: int
    opened: int = 0
    failed: int = 0
    open_seconds: float = 0.0
    events: int = 0
    delays_us: list[int] = field(default_factory=list)
    #: Events are recorded only from the steady state on (see _drive).
    recording: bool = False

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        delays = sorted(self.delays_us)
        out.pop("delays_us")
        out.pop("recording")
        for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0)):
            out[name] = (
                delays[min(int(q * len(delays)), len(delays) - 1)] / 1000 if delays else None
            )
        return out


class _Stream(asyncio.Protocol):
    def __init__(self, request: bytes, figures: Figures) -> None:
        self._request = request
        self._figures = figures
        self._tail = b""
        self._seen_event = False
        self.first_event: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self._tail + data
        last = 0
        for match in _STAMP.finditer(buf):
            last = match.end()
            if not self._seen_event:
                # The first event also carries the request's admission: not an
                # event's delay.
                self._seen_event = True
                if not self.first_event.done():
                    self.first_event.set_result(None)
                continue
            if self._figures.recording:
                self._figures.events += 1
                self._figures.delays_us.append((now - int(match.group(1))) // 1000)
        refused = b" 200 " not in buf[:16] and b"\r\n\r\n" in buf
        if not self._seen_event and refused and not self.first_event.done():
            self.first_event.set_exception(RuntimeError(buf[:200].decode(errors="replace")))
        self._tail = buf[max(last, len(buf) - 64) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first_event.done():
            self.first_event.set_exception(ConnectionError(f"stream closed early: {exc}"))


async def _drive(args: argparse.Namespace) -> Figures:
    loop = asyncio.get_running_loop()
    body = b'{"type":"threads.create","params":{}}'
    head = (
        f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        "Accept: text/event-stream\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if args.secret:
        head += f"Authorization: Bearer {args.secret}\r\n"
    request = head.encode() + b"\r\n" + body
    figures = Figures(args.streams)
    streams: list[_Stream] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def open_one() -> None:
        async with gate:
            stream = _Stream(request, figures)
            try:
                await loop.create_connection(lambda: stream, "127.0.0.1", args.port)
                await asyncio.wait_for(stream.first_event, 30)
            except (OSError, RuntimeError, TimeoutError) as exc:
                figures.failed += 1
                if figures.failed <= 3:
                    print(f"stream failed: {exc!r}", file=sys.stderr)
                if stream.transport is not None:
                    stream.transport.close()
                return
            streams.append(stream)

    started = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.streams)))
    figures.open_seconds = time.monotonic() - started
    figures.opened = len(streams)
    print("OPEN", figures.opened, flush=True)
    if args.hold:
        await loop.run_in_executor(None, sys.stdin.readline)
    else:
        # Opening thousands of streams is a burst of work (and of garbage
        # collections) in whatever they pass through: events are measured
        # from one interval after the last stream opened, in the steady state.
        await asyncio.sleep(args.settle)
        figures.recording = True
        await asyncio.sleep(args.seconds)
        figures.recording = False
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    await asyncio.sleep(0)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="the paced SSE upstream")
    serve.add_argument("--port", type=int, required=True)
    drive = sub.add_parser("drive", help="hold many streams")
    drive.add_argument("--port", type=int, required=True)
    drive.add_argument("--path", required=True, help="request target, query included")
    drive.add_argument("--secret", default=None)
    drive.add_argument("--streams", type=int, required=True)
    drive.add_argument("--concurrency", type=int, default=256, help="connections opening at once")
    drive.add_argument("--hold", action="store_true", help="hold until a line on stdin")
    drive.add_argument("--seconds", type=float, default=10.0, help="how long events are recorded")
    drive.add_argument("--settle", type=float, default=1.0, help="wait before recording")
    args = parser.parse_args(argv)
    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_serve(args.port))
        return 0
    figures = uvloop.run(_drive(args))
    print("SSE_JSON " + json.dumps(figures.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
