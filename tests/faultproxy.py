"""A TCP relay on loopback that fails the way networks do, for Redis fault tests.

Put it between a client and a server (``FaultProxy(host, port)``, then point
the client at ``proxy.port``). It relays bytes both ways until told otherwise:

- ``blackhole()``: every connection stops relaying, in both directions, and
  nothing is closed: no FIN, no RST, what is sent is dropped. That is a peer
  gone behind a firewall or a dead NAT entry; only a deadline notices it.
  With ``new=True`` (the default) connections opened meanwhile are accepted
  and blackholed too; ``heal()`` lets new connections through again, while
  the blackholed ones stay silent, as a path that died stays dead.
- ``reset()``: every open connection is aborted with a RST on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self


class _Pair:
    """One client connection and its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.blackholed = False

    def abort(self) -> None:
        for writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # Linger on, zero timeout: close() sends a RST, not a FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._blackhole_new = False
        #: Connections accepted so far (a test can wait for a reconnect).
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def blackhole(self, *, new: bool = True) -> None:
        for pair in self._pairs:
            pair.blackholed = True
        self._blackhole_new = new

    def heal(self) -> None:
        self._blackhole_new = False

    def reset(self) -> None:
        for pair in list(self._pairs):
            pair.abort()
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = _Pair(writer, up_writer)
        pair.blackholed = self._blackhole_new
        self._pairs.add(pair)
        pumps = [
            asyncio.create_task(self._pump(pair, reader, up_writer)),
            asyncio.create_task(self._pump(pair, up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._pairs.discard(pair)
            for side in (writer, up_writer):
                side.close()

    @staticmethod
    async def _pump(pair: _Pair, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if pair.blackholed:
                    continue  # dropped on the floor, as a dead path drops it
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pair.abort()
            return
        if not pair.blackholed:
            # An orderly close travels on, unless the path is dead.
            with contextlib.suppress(OSError):
                sink.write_eof()
        else:
            await asyncio.Event().wait()  # hold the other side open, silent

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
