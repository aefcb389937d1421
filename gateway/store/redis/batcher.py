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
import itertools
import logging
import math
import secrets
import time
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

_LUA = resources.files("gateway.store").joinpath("lua")
ADMIT_SCRIPT = _LUA.joinpath("admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
VOID_SCRIPT = _LUA.joinpath("void.lua").read_text()
VOID_SHA = hashlib.sha1(VOID_SCRIPT.encode()).hexdigest()  # noqa: S324

#: admit.lua's error when it ran after its deadline.
LATE = "LATE"
# The deadline leaves the reply this long (at most a quarter of the timeout)
# to reach the gateway before it gives up.
DEADLINE_MARGIN_SECONDS = 0.25
# Undo work left by failed batches: retried this often when nothing else is sent.
VOID_RETRY_SECONDS = 0.05
MAX_VOIDS = 100_000

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
    #: Counts the connections opened, so a new one can be measured afresh.
    connections: int

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
        self.connections = 0

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
        self.connections += 1
        return connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.disconnect()


class _PipelineSender:
    def __init__(self, client: RedisCluster, availability: Availability) -> None:
        self._availability = availability
        self._client = client
        self.connections = 0

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
    """Queues admissions and sends them as batches, one batch in flight.

    A request answered 503 must not count in its window, yet Redis may run
    its script after the gateway gave up (a paused server runs what its
    socket holds when it resumes). Two guards:

    - a deadline in Redis time (``admit.lua`` refuses to write after it),
      from an offset between Redis ``TIME`` and this process's monotonic
      clock, measured by a ``TIME`` in the first batch on each connection
      and after a script found the offset wrong. It is measured when the
      reply is read, so it errs early: a script that writes ran within
      ``budget`` of its batch being built, which is shorter than the
      gateway's own timeout. Drift between the clocks costs at most a 503
      for a request that Redis was already too slow for (and a re-measure)
      or a late write that the next guard undoes. Standalone Redis only
      (cluster nodes each have their own clock);
    - each admission's window member is chosen here, and a batch that fails
      is undone (``void.lua``, removing those members) before the next one,
      on any Redis: that covers a script that ran in time but whose reply
      came too late.
    """

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
        cluster = isinstance(client, RedisCluster)
        self._sender: _Sender = (
            _PipelineSender(client, availability)
            if isinstance(client, RedisCluster)
            else _ConnectionSender(client, timeout, availability)
        )
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Future[None] | None = None
        self._closing = False
        # Deadlines.
        self._deadlines = not cluster
        self._budget_us = int((timeout - min(DEADLINE_MARGIN_SECONDS, timeout / 4)) * 1_000_000)
        self._offset_us: int | None = None  # Redis TIME minus monotonic, µs
        self._measured_on = -1  # the sender's connection count when measured
        # Members: unique across replicas and restarts, short.
        self._member_prefix = secrets.token_hex(6) + ":"
        self._sequence = itertools.count()
        self._voids: dict[str, Command] = {}  # member -> the command undoing it

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
        deadline, a task switch) is shared by more requests. Undo work left
        by a failed batch is sent on its own when no admission comes.
        """
        try:
            while self._pending or (self._voids and not self._closing):
                batch, self._pending = self._pending, []
                await self._run(batch)
                if not batch and self._voids:
                    await asyncio.sleep(VOID_RETRY_SECONDS)
        finally:
            self._drainer = None

    def _command(self, request: AdmitRequest, member: str, deadline: int) -> Command:
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
            deadline,
            member,
        )

    def _void_command(self, request: AdmitRequest, member: str) -> Command:
        session, window, _ = self._keys.secret(request.secret_hash)
        users = 1 if request.user_limit else 0
        return ("EVALSHA", VOID_SHA, 2, session, window, member, self._keys.user_prefix, users)

    async def _run(self, batch: list[_Pending]) -> None:
        deadline = 0
        refresh = False
        if self._deadlines:
            if self._offset_us is not None:
                deadline = int(time.monotonic() * 1_000_000) + self._offset_us + self._budget_us
            # Measured on each new connection (a reconnection may well mean
            # a restarted or failed-over Redis, another clock).
            refresh = self._measured_on != self._sender.connections
        prefix, sequence = self._member_prefix, self._sequence
        members = [f"{prefix}{next(sequence):x}" for _ in batch]
        voided = list(self._voids.items())
        commands = [command for _, command in voided]
        commands += [
            self._command(req, member, deadline)
            for (req, _), member in zip(batch, members, strict=True)
        ]
        if refresh:
            commands.append(("TIME",))
        try:
            replies = await self._evalsha(commands)
        except Exception as exc:
            self._keep_voids(batch, members)
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
        if refresh:
            self._learn_offset(replies.pop())
        if voided:
            for (member, _), reply in zip(voided, replies, strict=False):
                if not isinstance(reply, Exception):
                    self._voids.pop(member, None)
            replies = replies[len(voided) :]
        if self._availability.full and not all(isinstance(r, Exception) for r in replies):
            # Redis ran an admission script, which it refuses when full.
            self._availability.answered(wrote=True)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(self._refusal(reply))
            else:
                future.set_result(decode_decision(reply))

    def _refusal(self, reply: Exception) -> StoreUnavailable:
        if is_oom(reply):
            return self._availability.failed(reply)
        if str(reply).startswith(LATE):
            # Late by Redis's clock though the reply came in time by ours:
            # the offset is off (the Redis host's clock was stepped).
            self._measured_on = -1
            return StoreUnavailable("Redis answered after the admission deadline")
        return StoreUnavailable(f"Redis rejected the admission: {reply}")

    def _keep_voids(self, batch: list[_Pending], members: list[str]) -> None:
        for (request, _), member in zip(batch, members, strict=True):
            self._voids[member] = self._void_command(request, member)
        if len(self._voids) > MAX_VOIDS:
            # An outage long enough to queue this many has outlived the
            # window: the oldest members have expired on their own anyway.
            for member in list(self._voids)[: len(self._voids) - MAX_VOIDS]:
                del self._voids[member]

    def _learn_offset(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            return
        seconds, micros = reply
        now_us = int(time.monotonic() * 1_000_000)
        self._offset_us = int(seconds) * 1_000_000 + int(micros) - now_us
        self._measured_on = self._sender.connections  # the one that carried it

    async def _evalsha(self, commands: list[Command]) -> list[Any]:
        replies = await self._sender.send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # After a restart, failover or SCRIPT FLUSH the cache is empty. A
            # NOSCRIPT reply means the script did not run, so resending is safe.
            logger.info("Redis script cache was empty; loading the admission scripts")
            await self._availability.call(self._load_scripts)
            again = await self._sender.send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _load_scripts(self) -> Any:
        # On a cluster this loads the scripts on every primary.
        await self._client.script_load(ADMIT_SCRIPT)
        return await self._client.script_load(VOID_SCRIPT)

    async def close(self) -> None:
        self._closing = True
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        await self._sender.close()
