"""Admission: one EVALSHA of ``lua/admit.lua`` per request, sent in batches.

Decisions that arrive in the same event-loop turn are sent together: still
one command per request on the server (``INFO commandstats`` counts them),
but one socket write and one read for the batch, which is what keeps the
decision cheap next to the proxying itself.

A batch goes out on a connection kept for admissions, packed by hiredis and
read with redis-py's parser (its internals, see :class:`_ConnectionSender`).
On a cluster every primary gets a lane of its own (its own queue, batch and
connection; :class:`~gateway.store.redis.cluster.ClusterRouter` says which),
so a node that fails or hangs fails only its own slots' decisions, and a
command answered MOVED, ASK or TRYAGAIN (not run) is sent again where the
slot lives now.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from importlib import resources
from typing import Any, Protocol

import hiredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError, ResponseError

from gateway.errors import StoreUnavailable
from gateway.ratelimit import OUTCOMES, Decision, Identity, Window
from gateway.store.base import AdmitRequest
from gateway.store.redis.client import Client, call
from gateway.store.redis.cluster import ClusterRouter
from gateway.store.redis.keys import KeyLayout

logger = logging.getLogger(__name__)

ADMIT_SCRIPT = resources.files("gateway.store").joinpath("lua/admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

Command = tuple[Any, ...]
# A request, its caller's future, and how often it was redirected already.
_Pending = tuple[AdmitRequest, "asyncio.Future[Decision]", int]
#: A command answered MOVED/ASK/TRYAGAIN is sent again at most this often.
MAX_REDIRECTS = 3
#: Behind Sentinel, the master's address is asked again at most this often.
MASTER_CHECK_SECONDS = 1.0


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

    def __init__(self, pool: Any, timeout: float) -> None:
        # A ConnectionPool, or a cluster node: both carry the class and
        # arguments of the connections they make.
        self._pool = pool
        self._timeout = timeout
        self._connection: Any = None
        self._sentinel = isinstance(pool, SentinelConnectionPool)
        self._master_checked = -math.inf
        self._asking: asyncio.Future[None] | None = None

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

        return await call(run)

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
        async with asyncio.timeout(self._timeout):
            await connection.connect()
        self._connection = connection
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
        if self._asking is not None:
            self._asking.cancel()
            await asyncio.gather(self._asking, return_exceptions=True)
        if self._connection is not None:
            await self._connection.disconnect()


class _Lane:
    """Admissions bound for one server: queued, then sent as batches on one connection."""

    __slots__ = ("drainer", "pending", "sender")

    def __init__(self, sender: _Sender) -> None:
        self.sender = sender
        self.pending: list[_Pending] = []
        self.drainer: asyncio.Future[None] | None = None


class AdmissionBatcher:
    """Queues admissions and sends them as batches, one batch in flight per lane."""

    def __init__(
        self, client: Client, *, keys: KeyLayout, window_seconds: int, timeout: float
    ) -> None:
        self._client = client
        self._keys = keys
        self._window_us = window_seconds * 1_000_000
        self._timeout = timeout
        self._router: ClusterRouter | None = None
        # Standalone Redis: the one lane. A cluster: a lane per primary.
        self._lane: _Lane | None = None
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        if isinstance(client, RedisCluster):
            self._router = ClusterRouter(client, on_refresh=self._keep_lanes)
        else:
            self._lane = _Lane(_ConnectionSender(client.connection_pool, timeout))

    async def admit(self, request: AdmitRequest) -> Decision:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        lane = self._lane
        if lane is None:
            lane = await self._lane_for(request)
        self._enqueue(lane, (request, future, 0))
        return await future

    def _enqueue(self, lane: _Lane, item: _Pending) -> None:
        lane.pending.append(item)
        if lane.drainer is None:
            # The drainer starts on the next loop turn, so every handler that
            # runs in this turn joins the first batch.
            lane.drainer = asyncio.ensure_future(self._drain(lane))

    async def _lane_for(self, request: AdmitRequest) -> _Lane:
        """The lane of the primary that serves the request's slot (a cluster)."""
        router = self._router
        if router is None:  # pragma: no cover - only clusters have lanes per node
            raise RuntimeError("no cluster router")
        node = await router.node_for(self._keys.secret(request.secret_hash).session)
        lane = self._lanes.get(node.name)
        if lane is None:
            lane = self._lanes[node.name] = _Lane(_ConnectionSender(node, self._timeout))
        return lane

    def _keep_lanes(self, primaries: frozenset[str]) -> None:
        """After a topology refresh: let go of nodes that are no longer primaries."""
        for name in [name for name in self._lanes if name not in primaries]:
            self._spawn(self._retire(self._lanes.pop(name)))

    async def _retire(self, lane: _Lane) -> None:
        if lane.drainer is not None:
            await asyncio.gather(lane.drainer, return_exceptions=True)
        await lane.sender.close()

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Future[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, lane: _Lane) -> None:
        """Send queued decisions, one batch in flight at a time.

        While a batch is on the wire the next one fills up, so under load
        batches grow instead of multiplying: the per-batch cost (a write, a
        deadline, a task switch) is shared by more requests.
        """
        try:
            while lane.pending:
                batch, lane.pending = lane.pending, []
                await self._run(lane, batch)
        finally:
            lane.drainer = None

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

    async def _run(self, lane: _Lane, batch: list[_Pending]) -> None:
        try:
            replies = await self._evalsha(lane, [self._command(req) for req, _, _ in batch])
        except Exception as exc:
            # Every waiting request gets an answer, whatever went wrong.
            error = (
                exc
                if isinstance(exc, StoreUnavailable)
                else StoreUnavailable(f"Admission failed: {type(exc).__name__}")
            )
            if not isinstance(exc, StoreUnavailable):
                logger.exception("Admission batch failed")
            if self._router is not None:
                self._router.stale()  # a node that fails may have been replaced
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        router = self._router
        for (request, future, redirects), reply in zip(batch, replies, strict=True):
            if future.done():  # the request was cancelled meanwhile
                continue
            if not isinstance(reply, Exception):
                future.set_result(decode_decision(reply))
            elif router is not None and redirects < MAX_REDIRECTS and router.retryable(reply):
                # Not run where it was sent, so sending it again counts it once.
                self._spawn(self._redirect(request, future, redirects + 1, reply))
            else:
                if router is not None:
                    router.failed(reply)
                future.set_exception(StoreUnavailable(f"Redis rejected the admission: {reply}"))

    async def _redirect(
        self,
        request: AdmitRequest,
        future: asyncio.Future[Decision],
        redirects: int,
        reply: Exception,
    ) -> None:
        """Send a redirected admission again, where its slot lives now."""
        router = self._router
        if router is None:  # pragma: no cover - only cluster replies redirect
            return
        try:
            await router.redirected(reply)
            if isinstance(reply, AskError) and not isinstance(reply, MovedError):
                # A slot mid-migration: ASKING must precede the command on the
                # target's connection, which the cluster client does itself.
                # EVAL, not EVALSHA: the target may not have the script yet.
                _, _, *arguments = self._command(request)
                answer = await call(lambda: router.send_asking("EVAL", ADMIT_SCRIPT, *arguments))
                if not future.done():
                    future.set_result(decode_decision(answer))
                return
            lane = await self._lane_for(request)
        except (StoreUnavailable, RedisError) as exc:
            if not future.done():
                error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
                future.set_exception(error)
            return
        if not future.done():
            self._enqueue(lane, (request, future, redirects))

    async def _evalsha(self, lane: _Lane, commands: list[Command]) -> list[Any]:
        replies = await lane.sender.send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # After a restart, failover or SCRIPT FLUSH the cache is empty. A
            # NOSCRIPT reply means the script did not run, so resending is safe.
            # Loaded on the lane's own connection: on a cluster, on the node
            # that said NOSCRIPT (a replica promoted a moment ago).
            logger.info("Redis script cache was empty; loading the admission script")
            await lane.sender.send([("SCRIPT", "LOAD", ADMIT_SCRIPT)])
            again = await lane.sender.send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        lanes = [self._lane] if self._lane is not None else list(self._lanes.values())
        drainers = [lane.drainer for lane in lanes if lane.drainer is not None]
        await asyncio.gather(*drainers, *self._tasks, return_exceptions=True)
        if self._router is not None:
            await self._router.close()
        for lane in lanes:
            await lane.sender.close()
