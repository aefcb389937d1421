"""Admission: one EVALSHA of ``lua/admit.lua`` per request, sent in batches.

Decisions that arrive in the same event-loop turn are sent together: still
one command per request on the server (``INFO commandstats`` counts them),
but one socket write and one read for the batch, which is what keeps the
decision cheap next to the proxying itself.

A batch goes out on a connection kept for admissions, packed by hiredis and
read with redis-py's parser (its internals, see ``sender.py``).
On a cluster every primary gets a lane of its own (its own queue, batch,
connection and clock offset; :class:`~gateway.store.redis.cluster.ClusterRouter`
says which), so a node that fails or hangs fails only its own slots'
decisions, and a command answered MOVED, ASK or TRYAGAIN (not run) is sent
again where the slot lives now.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError

from gateway.errors import StoreUnavailable
from gateway.ratelimit import OUTCOMES, ClassWindow, Decision, Identity, Window
from gateway.store.base import AdmitRequest
from gateway.store.redis.client import Availability, Client, is_oom
from gateway.store.redis.cluster import ClusterRouter
from gateway.store.redis.keys import KeyLayout
from gateway.store.redis.sender import Command, ConnectionSender, Sender

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

# A request, its caller's future, and how often it was redirected already.
_Pending = tuple[AdmitRequest, "asyncio.Future[Decision]", int]
#: A command answered MOVED/ASK/TRYAGAIN is sent again at most this often.
MAX_REDIRECTS = 3


#: The identities of recent sessions by session id, with the reply fields they
#: were decoded from: a session's requests come in runs, and one object per
#: session (rather than per request) also makes the identity headers built
#: from it a cache hit (gateway/identity.py). Checked against every reply, so
#: a session whose record changed is decoded afresh. Bounded.
_IDENTITIES: dict[bytes, tuple[tuple[Any, ...], Identity]] = {}
MAX_IDENTITIES = 4096


def decode_decision(reply: list[Any], cls: str = "", member: str = "") -> Decision:
    """The script's reply as a Decision (see admit.lua for the layout);
    ``member`` is the admission's window member, kept when it admits."""
    outcome = OUTCOMES[reply[0]]
    if len(reply) == 1:
        return Decision(outcome)
    session = Window(reply[1], max(reply[2], 0), reply[3], reply[4]) if reply[1] else None
    user = Window(reply[5], max(reply[6], 0), reply[7], reply[8]) if reply[5] else None
    class_window = None
    spec: bytes = reply[9]
    if spec:
        class_window = ClassWindow(
            cls,
            "user" if spec[:1] == b"u" else "session",
            int(spec[1:]),
            Window(reply[10], max(reply[11], 0), reply[12], reply[13]),
        )
    identity = None
    sid: bytes = reply[14]
    if sid:
        fields = tuple(reply[15:22])
        known = _IDENTITIES.get(sid)
        if known is not None and known[0] == fields:
            identity = known[1]
        else:
            identity = Identity(
                sid.decode(),
                reply[15].decode(),
                reply[16].decode(),
                reply[17].decode(),
                reply[18],
                reply[19],
                reply[20].decode(),
                reply[21].decode(),
            )
            if len(_IDENTITIES) >= MAX_IDENTITIES:
                _IDENTITIES.clear()
            _IDENTITIES[sid] = (fields, identity)
    if reply[0]:
        member = ""
    return Decision(outcome, session, user, identity, class_window, member)


class _Lane:
    """Admissions bound for one server: queued, then sent as batches on one connection.

    ``name`` is the cluster node's (empty on standalone Redis). The clock
    offset is the lane's own: each server has its own clock.
    """

    __slots__ = ("drainer", "measured_on", "name", "offset_us", "pending", "sender")

    def __init__(self, name: str, sender: Sender) -> None:
        self.name = name
        self.sender = sender
        self.pending: list[_Pending] = []
        self.drainer: asyncio.Future[None] | None = None
        self.offset_us: int | None = None  # Redis TIME minus monotonic, µs
        self.measured_on = -1  # the sender's connection count when measured


class AdmissionBatcher:
    """Queues admissions and sends them as batches, one batch in flight per lane.

    A request answered 503 must not count in its window, yet Redis may run
    its script after the gateway gave up (a paused server runs what its
    socket holds when it resumes). Two guards:

    - a deadline in Redis time (``admit.lua`` refuses to write after it),
      from an offset between the lane's server's ``TIME`` and this process's
      monotonic clock, measured by a ``TIME`` in the first batch on each
      connection and after a script found the offset wrong. It is measured
      when the reply is read, so it errs early: a script that writes ran
      within ``budget`` of its batch being built, which is shorter than the
      gateway's own timeout. Drift between the clocks costs at most a 503
      for a request that Redis was already too slow for (and a re-measure)
      or a late write that the next guard undoes;
    - each admission's window member is chosen here, and a batch that fails
      is undone (``void.lua``, removing those members) before the next one
      on the lane of the member's slot: that covers a script that ran in
      time but whose reply came too late.
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
        self._timeout = timeout
        self._router: ClusterRouter | None = None
        # Standalone Redis: the one lane. A cluster: a lane per primary.
        self._lane: _Lane | None = None
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        if isinstance(client, RedisCluster):
            self._router = ClusterRouter(client, on_refresh=self._keep_lanes)
        else:
            sender = ConnectionSender(client.connection_pool, timeout, availability)
            self._lane = _Lane("", sender)
        self._closing = False
        self._closed = False
        # Deadlines on every lane (each its own server and clock); off only
        # where a test exercises the undo alone.
        self._deadlines = True
        self._budget_us = int((timeout - min(DEADLINE_MARGIN_SECONDS, timeout / 4)) * 1_000_000)
        # Members: unique across replicas and restarts, short.
        self._member_prefix = secrets.token_hex(6) + ":"
        self._sequence = itertools.count()
        # Lane name -> member -> the command undoing it.
        self._voids: dict[str, dict[str, Command]] = {}

    async def admit(self, request: AdmitRequest) -> Decision:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        lane = self._lane
        if lane is None:
            lane = await self._lane_for(request.secret_hash)
        self._enqueue(lane, (request, future, 0))
        return await future

    def _enqueue(self, lane: _Lane, item: _Pending) -> None:
        lane.pending.append(item)
        self._wake(lane)

    def _wake(self, lane: _Lane) -> None:
        if lane.drainer is None:
            # The drainer starts on the next loop turn, so every handler that
            # runs in this turn joins the first batch.
            lane.drainer = asyncio.ensure_future(self._drain(lane))

    async def _lane_for(self, secret_hash: str) -> _Lane:
        """The lane of the primary that serves the secret's slot (a cluster)."""
        router = self._router
        if router is None:  # pragma: no cover - only clusters have lanes per node
            raise RuntimeError("no cluster router")
        node = await router.node_for(self._keys.secret(secret_hash).session)
        lane = self._lanes.get(node.name)
        if lane is None:
            if self._closed:  # closed while the node was looked up
                raise StoreUnavailable("The Redis store is closed")
            sender = ConnectionSender(node, self._timeout, self._availability)
            lane = self._lanes[node.name] = _Lane(node.name, sender)
        return lane

    def _keep_lanes(self, primaries: frozenset[str]) -> None:
        """After a topology refresh: let go of nodes that are no longer primaries."""
        for name in [name for name in self._lanes if name not in primaries]:
            self._spawn(self._retire(self._lanes.pop(name)))
            for member, command in self._voids.pop(name, {}).items():
                self._spawn(self._rehome_void(member, command))

    async def _retire(self, lane: _Lane) -> None:
        if lane.drainer is not None:
            await asyncio.gather(lane.drainer, return_exceptions=True)
        await lane.sender.close()

    async def _rehome_void(self, member: str, command: Command) -> None:
        """Queue undo work on the lane that serves its slot now."""
        try:
            lane = await self._lane_for_key(command[3])
        except StoreUnavailable:
            return  # no node for it now; the member expires with its window
        self._keep_void(lane.name, member, command)
        self._wake(lane)

    async def _lane_for_key(self, key: str) -> _Lane:
        # Voids carry the session key, which shares the secret's hash tag.
        secret_hash = key.split("{", 1)[1].split("}", 1)[0]
        return await self._lane_for(secret_hash)

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Future[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, lane: _Lane) -> None:
        """Send queued decisions, one batch in flight at a time.

        While a batch is on the wire the next one fills up, so under load
        batches grow instead of multiplying: the per-batch cost (a write, a
        deadline, a task switch) is shared by more requests. Undo work left
        by a failed batch is sent on its own when no admission comes.
        """
        try:
            while lane.pending or (self._voids.get(lane.name) and not self._closing):
                batch, lane.pending = lane.pending, []
                await self._run(lane, batch)
                if not batch and self._voids.get(lane.name):
                    await asyncio.sleep(VOID_RETRY_SECONDS)
        finally:
            lane.drainer = None

    def _command(self, request: AdmitRequest, member: str, deadline: int) -> Command:
        session, window, revoked = self._keys.secret(request.secret_hash)
        command: Command = (
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
            request.cls,
            self._keys.class_user_prefix(request.secret_hash),
            request.need,
            request.declared_size,
            "" if request.model is None else "m:" + request.model,
        )
        if not request.token:
            return command
        # A turn's model token, granted by the same script (admit.lua ARGV[13..15]).
        return (
            *command,
            self._keys.model_token(request.token),
            request.request_id,
            request.secret_hash,
        )

    def void_command(self, request: AdmitRequest, member: str) -> Command:
        session, window, _ = self._keys.secret(request.secret_hash)
        users = 1 if request.user_limit else 0
        return (
            "EVALSHA",
            VOID_SHA,
            2,
            session,
            window,
            member,
            self._keys.user_prefix,
            users,
            request.cls,
            self._keys.class_user_prefix(request.secret_hash),
            request.need,
            self._keys.model_token(request.token) if request.token else "",
        )

    async def _run(self, lane: _Lane, batch: list[_Pending]) -> None:
        deadline = 0
        refresh = False
        if self._deadlines:
            if lane.offset_us is not None:
                deadline = int(time.monotonic() * 1_000_000) + lane.offset_us + self._budget_us
            # Measured on each new connection (a reconnection may well mean
            # a restarted or failed-over Redis, another clock).
            refresh = lane.measured_on != lane.sender.connections
        prefix, sequence = self._member_prefix, self._sequence
        members = [f"{prefix}{next(sequence):x}" for _ in batch]
        voided = list(self._voids.get(lane.name, {}).items())
        commands = [command for _, command in voided]
        commands += [
            self._command(req, member, deadline)
            for (req, _, _), member in zip(batch, members, strict=True)
        ]
        if refresh:
            commands.append(("TIME",))
        try:
            replies = await self._evalsha(lane, commands)
        except Exception as exc:
            self._keep_voids(lane, batch, members)
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
        if refresh:
            self._learn_offset(lane, replies.pop())
        if voided:
            self._settle_voids(lane, voided, replies)
            replies = replies[len(voided) :]
        if self._availability.full and not all(isinstance(r, Exception) for r in replies):
            # Redis ran an admission script, which it refuses when full.
            self._availability.answered(wrote=True)
        router = self._router
        for (request, future, redirects), reply, member in zip(
            batch, replies, members, strict=True
        ):
            if future.done():  # the request was cancelled meanwhile
                continue
            if not isinstance(reply, Exception):
                future.set_result(decode_decision(reply, request.cls, member))
            elif router is not None and redirects < MAX_REDIRECTS and router.retryable(reply):
                # Not run where it was sent, so sending it again counts it once.
                self._spawn(self._redirect(request, future, redirects + 1, reply))
            else:
                if router is not None:
                    router.failed(reply)
                future.set_exception(self._refusal(lane, reply))

    def _settle_voids(
        self, lane: _Lane, voided: list[tuple[str, Command]], replies: list[Any]
    ) -> None:
        bucket = self._voids.get(lane.name, {})
        for (member, command), reply in zip(voided, replies, strict=False):
            if not isinstance(reply, Exception):
                bucket.pop(member, None)
            elif self._router is not None and self._router.retryable(reply):
                # The slot moved: the undo goes where the member is now.
                bucket.pop(member, None)
                self._spawn(self._rehome_void(member, command))
        if not bucket:
            self._voids.pop(lane.name, None)

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
                member = f"{self._member_prefix}{next(self._sequence):x}"
                _, _, *arguments = self._command(request, member, 0)
                answer = await self._availability.call(
                    lambda: router.send_asking("EVAL", ADMIT_SCRIPT, *arguments)
                )
                if not future.done():
                    future.set_result(decode_decision(answer, request.cls, member))
                return
            lane = await self._lane_for(request.secret_hash)
        except (StoreUnavailable, RedisError) as exc:
            if not future.done():
                error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
                future.set_exception(error)
            return
        if not future.done():
            self._enqueue(lane, (request, future, redirects))

    def _refusal(self, lane: _Lane, reply: Exception) -> StoreUnavailable:
        if is_oom(reply):
            return self._availability.failed(reply)
        if str(reply).startswith(LATE):
            # Late by Redis's clock though the reply came in time by ours:
            # the offset is off (the Redis host's clock was stepped).
            lane.measured_on = -1
            return StoreUnavailable("Redis answered after the admission deadline")
        return StoreUnavailable(f"Redis rejected the admission: {reply}")

    def _keep_voids(self, lane: _Lane, batch: list[_Pending], members: list[str]) -> None:
        for (request, _, _), member in zip(batch, members, strict=True):
            self._keep_void(lane.name, member, self.void_command(request, member))

    async def keep_void(self, request: AdmitRequest, member: str) -> None:
        """Undo an admission with the next batch on its lane (retried there)."""
        lane = self._lane
        if lane is None:
            lane = await self._lane_for(request.secret_hash)
        self._keep_void(lane.name, member, self.void_command(request, member))
        self._wake(lane)

    def _keep_void(self, name: str, member: str, command: Command) -> None:
        bucket = self._voids.setdefault(name, {})
        bucket[member] = command
        if len(bucket) > MAX_VOIDS:
            # An outage long enough to queue this many has outlived the
            # window: the oldest members have expired on their own anyway.
            for old in list(bucket)[: len(bucket) - MAX_VOIDS]:
                del bucket[old]

    def _learn_offset(self, lane: _Lane, reply: Any) -> None:
        if isinstance(reply, Exception):
            return
        seconds, micros = reply
        now_us = int(time.monotonic() * 1_000_000)
        lane.offset_us = int(seconds) * 1_000_000 + int(micros) - now_us
        lane.measured_on = lane.sender.connections  # the one that carried it

    async def _evalsha(self, lane: _Lane, commands: list[Command]) -> list[Any]:
        replies = await lane.sender.send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # After a restart, failover or SCRIPT FLUSH the cache is empty. A
            # NOSCRIPT reply means the script did not run, so resending is safe.
            # Loaded on the lane's own connection: on a cluster, on the node
            # that said NOSCRIPT (a replica promoted a moment ago).
            logger.info("Redis script cache was empty; loading the admission scripts")
            await lane.sender.send(
                [("SCRIPT", "LOAD", ADMIT_SCRIPT), ("SCRIPT", "LOAD", VOID_SCRIPT)]
            )
            again = await lane.sender.send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        self._closing = True
        # Waited for until none is left: a task that finishes (a redirect,
        # undo work moved to another node, a refresh) may have opened a lane
        # or retired one meanwhile, and a lane missed here keeps its
        # connection open until the collector finds it.
        await self._settle()
        if self._router is not None:
            await self._router.close()  # no refresh retires a lane after this
            await self._settle()
        self._closed = True  # an admission still finding its node opens no lane now
        lanes = [self._lane] if self._lane is not None else list(self._lanes.values())
        for lane in lanes:
            await lane.sender.close()

    async def _settle(self) -> None:
        while True:
            lanes = [self._lane] if self._lane is not None else list(self._lanes.values())
            running = [lane.drainer for lane in lanes if lane.drainer is not None]
            running += self._tasks
            if not running:
                return
            await asyncio.gather(*running, return_exceptions=True)
