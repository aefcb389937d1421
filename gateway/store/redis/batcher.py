"""Admission: one EVALSHA of ``lua/admit.lua`` per request, sent in batches.

Decisions that arrive in the same event-loop turn are sent together: still
one command per request on the server (``INFO commandstats`` counts them),
but one socket write and one read for the batch, which is what keeps the
decision cheap next to the proxying itself.

On standalone Redis the batch goes out on a connection kept for admissions,
packed by hiredis and read with redis-py's parser (its internals, see
:class:`_ConnectionSender`); on a cluster it is a non-transactional pipeline,
which routes each command to its slot's node.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from importlib import resources
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.errors import StoreUnavailable
from gateway.ratelimit import OUTCOMES, Decision, Identity, Window
from gateway.store.base import AdmitRequest
from gateway.store.redis.client import Availability, Client, is_oom
from gateway.store.redis.keys import KeyLayout

logger = logging.getLogger(__name__)

ADMIT_SCRIPT = resources.files("gateway.store").joinpath("lua/admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

Command = tuple[Any, ...]
_Pending = tuple[AdmitRequest, "asyncio.Future[Decision]"]


def decode_decision(reply: list[Any]) -> Decision:
    """The script's reply as a Decision (see admit.lua for the layout)."""
    size = len(reply)
    outcome = OUTCOMES[reply[0]]
    if size == 1:
        return Decision(outcome)
    session = Window(reply[1], max(reply[2], 0), reply[3], reply[4])
    if size == 5:
        return Decision(outcome, session)
    user = Window(reply[5], max(reply[6], 0), reply[7], reply[8]) if reply[5] else None
    if size == 9:
        return Decision(outcome, session, user)
    identity = Identity(
        reply[9].decode(), reply[10].decode(), reply[11].decode(), reply[12].decode(), reply[13]
    )
    return Decision(outcome, session, user, identity)


class _Sender(Protocol):
    async def send(self, commands: list[Command]) -> list[Any]:
        """Replies in order; a command Redis refused is its ResponseError."""

    async def close(self) -> None: ...


class _ConnectionSender:
    """One write and one read pass for the batch, on the admission connection.

    redis-py's Pipeline packs arguments in Python, takes a pooled connection
    and arms a timeout per reply; here hiredis packs in C, one connection is
    kept for admissions (batches never overlap, see AdmissionBatcher._drain)
    and one deadline covers the batch. Parsing stays redis-py's.
    """

    def __init__(self, client: aioredis.Redis, timeout: float, availability: Availability) -> None:
        self._availability = availability
        self._pool = client.connection_pool
        self._timeout = timeout
        self._connection: Any = None

    async def send(self, commands: list[Command]) -> list[Any]:
        payload = b"".join([hiredis.pack_command(args) for args in commands])

        async def run() -> list[Any]:
            connection = await self._ready_connection()
            try:
                async with asyncio.timeout(self._timeout):
                    await connection.send_packed_command(payload, check_health=False)
                    replies: list[Any] = []
                    for _ in commands:
                        try:
                            replies.append(await connection.read_response(timeout=math.inf))
                        except ResponseError as exc:
                            replies.append(exc)
                    return replies
            except BaseException:
                # A batch cut short leaves unread replies on the socket.
                self._connection = None
                await connection.disconnect(nowait=True)
                raise

        return await self._availability.call(run)

    async def _ready_connection(self) -> Any:
        connection = self._connection
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
        async with asyncio.timeout(self._timeout):
            await connection.connect()  # type: ignore[no-untyped-call]
        self._connection = connection
        return connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.disconnect()


class _PipelineSender:
    def __init__(self, client: RedisCluster, availability: Availability) -> None:
        self._availability = availability
        self._client = client

    async def send(self, commands: list[Command]) -> list[Any]:
        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command(*args)
            return await pipe.execute(raise_on_error=False)

        return await self._availability.call(run)

    async def close(self) -> None:
        return None


class AdmissionBatcher:
    """Queues admissions and sends them as batches, one batch in flight."""

    def __init__(
        self,
        client: Client,
        *,
        keys: KeyLayout,
        window_seconds: int,
        timeout: float,
        availability: Availability,
    ) -> None:
        self._availability = availability
        self._client = client
        self._keys = keys
        self._window_us = window_seconds * 1_000_000
        self._sender: _Sender = (
            _PipelineSender(client, availability)
            if isinstance(client, RedisCluster)
            else _ConnectionSender(client, timeout, availability)
        )
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Future[None] | None = None

    async def admit(self, request: AdmitRequest) -> Decision:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._drainer is None:
            # The drainer starts on the next loop turn, so every handler that
            # runs in this turn joins the first batch.
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        """Send queued decisions, one batch in flight at a time.

        While a batch is on the wire the next one fills up, so under load
        batches grow instead of multiplying: the per-batch cost (a write, a
        deadline, a task switch) is shared by more requests.
        """
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._run(batch)
        finally:
            self._drainer = None

    def _command(self, request: AdmitRequest) -> Command:
        session, window, revoked = self._keys.secret(request.secret_hash)
        return (
            "EVALSHA",
            ADMIT_SHA,
            3,
            session,
            window,
            revoked,
            self._window_us,
            1 if request.allow_unknown else 0,
            request.default_limit,
            request.user_limit or 0,
            self._keys.user_prefix,
        )

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._evalsha([self._command(req) for req, _ in batch])
        except Exception as exc:
            # Every waiting request gets an answer, whatever went wrong.
            error = (
                exc
                if isinstance(exc, StoreUnavailable)
                else StoreUnavailable(f"Admission failed: {type(exc).__name__}")
            )
            if not isinstance(exc, StoreUnavailable):
                logger.exception("Admission batch failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        if self._availability.full and not all(isinstance(r, Exception) for r in replies):
            # Redis ran an admission script, which it refuses when full.
            self._availability.answered(wrote=True)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                error = (
                    self._availability.failed(reply)
                    if is_oom(reply)
                    else StoreUnavailable(f"Redis rejected the admission: {reply}")
                )
                future.set_exception(error)
            else:
                future.set_result(decode_decision(reply))

    async def _evalsha(self, commands: list[Command]) -> list[Any]:
        replies = await self._sender.send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # After a restart, failover or SCRIPT FLUSH the cache is empty. A
            # NOSCRIPT reply means the script did not run, so resending is safe.
            logger.info("Redis script cache was empty; loading the admission script")
            await self._availability.call(self._load_script)
            again = await self._sender.send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _load_script(self) -> Any:
        # On a cluster this loads the script on every primary.
        return await self._client.script_load(ADMIT_SCRIPT)

    async def close(self) -> None:
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        await self._sender.close()
