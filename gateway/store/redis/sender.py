"""How a batch of admissions reaches one Redis server: one write, one read.

:class:`ConnectionSender` keeps one connection for admissions (batches never
overlap on it), packs the batch with hiredis in C and reads the replies with
redis-py's parser under one deadline. Behind Sentinel it follows the master
the sentinels name. The batcher (``batcher.py``) decides what goes in a batch
and what its replies mean.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Protocol

import hiredis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from gateway.errors import StoreUnavailable
from gateway.store.redis.client import Availability, read_replies

logger = logging.getLogger(__name__)

Command = tuple[Any, ...]
#: Behind Sentinel, the master's address is asked again at most this often.
MASTER_CHECK_SECONDS = 1.0


class Sender(Protocol):
    #: Counts the connections opened, so a new one can be measured afresh.
    connections: int

    async def send(self, commands: list[Command]) -> list[Any]:
        """Replies in order; a command Redis refused is its ResponseError."""

    async def close(self) -> None: ...


class ConnectionSender:
    """One write and one read pass for the batch, on the admission connection.

    redis-py's Pipeline packs arguments in Python, takes a pooled connection
    and arms a timeout per reply; here hiredis packs in C, one connection is
    kept for admissions (batches never overlap, see AdmissionBatcher._drain)
    and one deadline covers the batch. Parsing stays redis-py's.
    """

    def __init__(self, pool: Any, timeout: float, availability: Availability) -> None:
        # A ConnectionPool, or a cluster node: both carry the class and
        # arguments of the connections they make.
        self._availability = availability
        self._pool = pool
        self._timeout = timeout
        self._connection: Any = None
        self.connections = 0
        self._sentinel = isinstance(pool, SentinelConnectionPool)
        self._master_checked = -math.inf
        self._asking: asyncio.Future[None] | None = None
        self._closed = False

    async def send(self, commands: list[Command]) -> list[Any]:
        payload = b"".join([hiredis.pack_command(args) for args in commands])

        async def run() -> list[Any]:
            if self._closed:
                # A batch that comes after close() must not open a connection
                # that nothing would close.
                raise StoreUnavailable("The Redis store is closed")
            connection = await self._ready_connection()
            try:
                async with asyncio.timeout(self._timeout):
                    await connection.send_packed_command(payload, check_health=False)
                    return await read_replies(connection, len(commands))
            except BaseException:
                # A batch cut short leaves unread replies on the socket.
                self._connection = None
                await connection.disconnect(nowait=True)
                raise

        return await self._availability.call(run)

    async def _ready_connection(self) -> Any:
        connection = self._connection
        if connection is not None and self._sentinel and not self._on_master(connection):
            logger.warning("Sentinel names a new master; admissions follow it")
            await connection.disconnect(nowait=True)
            connection = self._connection = None
        if connection is not None:
            try:
                # Readable while idle means closed by the server (a restart,
                # a timeout): the batch would fail on it though nothing ran.
                if not await connection.can_read():
                    return connection
            except (RedisError, OSError):
                pass
            await connection.disconnect(nowait=True)
        pool = self._pool
        # No socket timeout of its own: the batch runs under one deadline
        # (send), and with a socket timeout redis-py wraps every send in
        # asyncio.wait_for, a task per batch.
        connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        try:
            async with asyncio.timeout(self._timeout):
                await connection.connect()
        except BaseException:
            # The deadline can fall anywhere in connect(); redis-py closes the
            # socket when a read is cut short, not at every step, and a socket
            # left open is a descriptor held until the collector finds it.
            await connection.disconnect(nowait=True)
            raise
        if self._closed:  # closed while this connected: nothing else would close it
            await connection.disconnect()
            raise StoreUnavailable("The Redis store is closed")
        self._connection = connection
        self.connections += 1
        return connection

    def _on_master(self, connection: Any) -> bool:
        """Whether the kept connection still reaches the master the sentinels name.

        A master handed over by ``SENTINEL FAILOVER`` keeps running and
        accepting writes until the sentinels reconfigure it, seconds later;
        what it counts meanwhile is lost when it becomes a replica. So the
        sentinels are asked again at most every MASTER_CHECK_SECONDS (which
        also drops the pool's idle connections to a former master), in the
        background: a slow sentinel must not hold up admissions.
        """
        now = asyncio.get_running_loop().time()
        if now >= self._master_checked + MASTER_CHECK_SECONDS and (
            self._asking is None or self._asking.done()
        ):
            self._master_checked = now
            self._asking = asyncio.ensure_future(self._ask_sentinels())
        master = self._pool.master_address
        return master is None or bool((connection.host, connection.port) == master)

    async def _ask_sentinels(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._pool.get_master_address()
        except (RedisError, OSError, TimeoutError):
            pass  # no sentinel answers: nothing says the master moved

    async def close(self) -> None:
        self._closed = True
        if self._asking is not None:
            self._asking.cancel()
            await asyncio.gather(self._asking, return_exceptions=True)
        if self._connection is not None:
            await self._connection.disconnect()
