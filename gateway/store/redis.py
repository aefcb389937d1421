"""The Redis store: every replica shares one registry, revocation set and window.

Admission is one EVALSHA of ``lua/admit.lua`` per request. Decisions that
arrive in the same event-loop turn are sent as one pipeline: still one command
per request on the server (``INFO commandstats`` counts them), but one socket
write and one read for the batch, which is what keeps the decision cheap next
to the proxying itself.

Key layout (``p`` is the configured prefix, ``h`` the secret's HMAC):

    p:{h}:s       hash: sid, user, uh (user hash), exp, lim   TTL exp + retention
    p:{h}:w       zset: the session's sliding window           TTL window
    p:{h}:r       revoked flag                                  TTL exp + retention
    p:{u:U}:w     zset: user U's window (standalone Redis only) TTL window
    p:{sid:S}:h   session id S -> h                             TTL exp + retention
    p:{sid:S}:r   session id S revoked (cancel before/without registration)
    p:audit       stream of revocations, capped
    p:revocations pub/sub channel of revoked hashes

Every key of one secret shares the hash tag ``{h}``, so the script runs
unchanged on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from importlib import resources
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from gateway.errors import StoreUnavailable
from gateway.ratelimit import OUTCOMES, Decision, Window
from gateway.store.base import (
    AdmitRequest,
    AuditEntry,
    RevokeResult,
    SessionInfo,
    SessionRecord,
    Store,
)

logger = logging.getLogger(__name__)

AUDIT_MAXLEN = 10_000
# A silent revocation channel is pinged after this long, and given up on (and
# resubscribed) when the ping goes unanswered for as long again.
PUBSUB_PING_SECONDS = 10.0
ADMIT_SCRIPT = resources.files("gateway.store").joinpath("lua/admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster
_Pending = tuple[AdmitRequest, "asyncio.Future[Decision]"]


def _text(value: Any) -> str | None:
    """Replies are bytes (decode_responses is off); None stays None."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def user_hash(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()[:32]


def decode_decision(reply: list[int]) -> Decision:
    outcome = OUTCOMES[reply[0]]
    if len(reply) == 1:
        return Decision(outcome)
    session = Window(
        limit=reply[1], remaining=max(reply[2], 0), wait_ms=reply[3], reset_ms=reply[4]
    )
    user = None
    if len(reply) >= 9:
        user = Window(
            limit=reply[5], remaining=max(reply[6], 0), wait_ms=reply[7], reset_ms=reply[8]
        )
    return Decision(outcome, session, user)


def connect(url: str, *, cluster: bool, timeout: float) -> Client:
    """A client that never retries on its own: an admission sent twice could
    count twice, so retrying is decided per operation here, not in the driver."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    # With maintenance notifications left at "auto", redis-py 8's pool skips
    # its check for pooled connections the server has closed: after a Redis
    # restart each one then fails a batch with 503 although Redis is back.
    return aioredis.Redis.from_url(
        url,
        max_connections=256,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **options,
    )


class RedisStore(Store):
    name = "redis"

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = "ckg",
        window_seconds: int = 60,
        retention_seconds: int = 3600,
        revocation_ttl_seconds: int = 86400,
        timeout: float = 2.0,
        pubsub_url: str,
        ping_seconds: float = PUBSUB_PING_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._window_us = window_seconds * 1_000_000
        self._user_prefix = f"{prefix}:{{u:"
        self._timeout = timeout
        self._retention = retention_seconds
        self._revocation_ttl = revocation_ttl_seconds
        # Cluster clients have no async pub/sub; PUBLISH reaches every node of
        # a cluster, so one plain connection to any node will do.
        self._pubsub_url = pubsub_url
        self._ping_seconds = ping_seconds
        # The clock only sets TTLs (expiry is checked against Redis TIME).
        self._clock = clock
        self._channel = f"{prefix}:revocations"
        self._audit = f"{prefix}:audit"
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Future[None] | None = None
        self._admit_connection: Any = None

    # -- keys ---------------------------------------------------------------

    def _keys(self, secret_hash: str) -> tuple[str, str, str]:
        base = f"{self._prefix}:{{{secret_hash}}}"
        return f"{base}:s", f"{base}:w", f"{base}:r"

    def _sid_keys(self, session_id: str) -> tuple[str, str]:
        base = f"{self._prefix}:{{sid:{session_id}}}"
        return f"{base}:h", f"{base}:r"

    # -- admission (hot path) -----------------------------------------------

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

    def _admit_args(self, request: AdmitRequest) -> tuple[Any, ...]:
        skey, wkey, rkey = self._keys(request.secret_hash)
        return (
            "EVALSHA",
            ADMIT_SHA,
            3,
            skey,
            wkey,
            rkey,
            self._window_us,
            1 if request.allow_unknown else 0,
            request.default_limit,
            request.user_limit or 0,
            self._user_prefix,
        )

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._evalsha_batch([self._admit_args(req) for req, _ in batch])
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
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(StoreUnavailable(f"Redis rejected the admission: {reply}"))
            else:
                future.set_result(decode_decision(reply))

    async def _evalsha_batch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        send = self._pipeline if self._cluster else self._send_batch
        replies = await send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # After a restart, failover or SCRIPT FLUSH the cache is empty. A
            # NOSCRIPT reply means the script did not run, so resending is safe.
            logger.info("Redis script cache was empty; loading the admission script")
            await self._call(self._load_script)
            again = await send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _load_script(self) -> Any:
        # On a cluster this loads the script on every primary.
        return await self._client.script_load(ADMIT_SCRIPT)

    async def _send_batch(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One write and one read pass for the batch, on the admission connection.

        redis-py's Pipeline packs arguments in Python, takes a pooled
        connection and arms a timeout per reply; here hiredis packs in C, one
        connection is kept for admissions (batches never overlap, see
        _drain) and one deadline covers the batch. Parsing stays redis-py's.
        """
        assert isinstance(self._client, aioredis.Redis)
        payload = b"".join([hiredis.pack_command(args) for args in commands])

        async def run() -> list[Any]:
            connection = await self._admission_connection()
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
                self._admit_connection = None
                await connection.disconnect(nowait=True)
                raise

        return await self._call(run)

    async def _admission_connection(self) -> Any:
        connection = self._admit_connection
        if connection is not None:
            try:
                # Readable while idle means closed by the server (a restart,
                # a timeout): the batch would fail on it though nothing ran.
                if not await connection.can_read():
                    return connection
            except (RedisError, OSError):
                pass
            await connection.disconnect(nowait=True)
        assert isinstance(self._client, aioredis.Redis)
        pool = self._client.connection_pool
        # No socket timeout of its own: the batch runs under one deadline
        # (_send_batch), and with a socket timeout redis-py wraps every send
        # in asyncio.wait_for, a task per batch.
        connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        async with asyncio.timeout(self._timeout):
            await connection.connect()  # type: ignore[no-untyped-call]
        self._admit_connection = connection
        return connection

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command(*args)
            return await pipe.execute(raise_on_error=False)

        return await self._call(run)

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc

    async def _idempotent(self, operation: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
        """Writes that are safe to repeat get a few quick retries."""
        for attempt in range(attempts):
            try:
                return await self._call(operation)
            except StoreUnavailable:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- registry -------------------------------------------------------------

    async def register(self, record: SessionRecord) -> bool:
        skey, _, _ = self._keys(record.secret_hash)
        hkey, rkey = self._sid_keys(record.session_id)
        keep_until_ms = (record.expires_at + self._retention) * 1000

        async def write() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            fields: dict[str, str | int] = {
                "sid": record.session_id,
                "user": record.user,
                "exp": record.expires_at,
                "lim": record.limit,
            }
            if record.user:  # no user, no user window (the API requires one)
                fields["uh"] = user_hash(record.user)
            pipe.hset(skey, mapping=fields)  # type: ignore[arg-type]
            pipe.pexpireat(skey, keep_until_ms)
            pipe.set(hkey, record.secret_hash, pxat=keep_until_ms)
            # Read after writing: a cancel that raced ahead wrote its flag
            # first and then looks for this mapping, so one of us sees the other.
            pipe.exists(rkey)
            return await pipe.execute()

        replies = await self._idempotent(write)
        born_revoked = bool(replies[-1])
        if born_revoked:
            await self._revoke_hash(record.secret_hash, record.expires_at)
        return born_revoked

    async def secret_hash_for(self, session_id: str) -> str | None:
        hkey, _ = self._sid_keys(session_id)
        value = await self._call(lambda: self._client.get(hkey))
        return _text(value)

    # -- revocation -------------------------------------------------------------

    async def _revoke_hash(self, secret_hash: str, expires_at: int | None) -> bool:
        """Set the revoked flag; True if it was newly set."""
        _, _, rkey = self._keys(secret_hash)
        if expires_at is not None:
            ttl_ms = max(int((expires_at + self._retention - self._clock()) * 1000), 60_000)
        else:
            ttl_ms = self._revocation_ttl * 1000
        created = await self._idempotent(lambda: self._client.set(rkey, 1, px=ttl_ms, nx=True))
        return bool(created)

    async def revoke(
        self,
        *,
        secret_hash: str | None,
        session_id: str | None,
        reason: str,
        replica: str,
    ) -> RevokeResult:
        expires_at: int | None = None
        already = True
        registered = False
        if session_id is not None:
            _hkey, rkey = self._sid_keys(session_id)
            flag_set = await self._idempotent(
                lambda: self._client.set(rkey, 1, ex=self._revocation_ttl, nx=True)
            )
            already = not flag_set
            if secret_hash is None:
                secret_hash = await self.secret_hash_for(session_id)
        if secret_hash is not None:
            skey, _, _ = self._keys(secret_hash)
            sid, exp = await self._call(lambda: self._client.hmget(skey, ["sid", "exp"]))
            if session_id is None:
                session_id = _text(sid)
            expires_at = int(exp) if exp is not None else None
            registered = exp is not None
            already = not await self._revoke_hash(secret_hash, expires_at) and already
        await self._announce(secret_hash, session_id, reason, replica)
        return RevokeResult(secret_hash, session_id, already, registered)

    async def _announce(
        self, secret_hash: str | None, session_id: str | None, reason: str, replica: str
    ) -> None:
        fields = {
            "session_id": session_id or "",
            "secret_hash_prefix": (secret_hash or "")[:12],
            "reason": reason,
            "replica": replica,
            "at": f"{self._clock():.3f}",
        }

        async def append() -> Any:
            # Capped by length, and given a TTL like every other key: an idle
            # gateway's audit log ends with the last revocation it records.
            pipe = self._client.pipeline(transaction=False)
            pipe.xadd(self._audit, fields, maxlen=AUDIT_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.expire(self._audit, self._revocation_ttl)
            return await pipe.execute()

        await self._idempotent(append)
        if secret_hash is not None:
            await self._idempotent(lambda: self._client.publish(self._channel, secret_hash))

    async def lookup(self, session_id: str) -> SessionInfo | None:
        _hkey, rkey = self._sid_keys(session_id)
        secret_hash = await self.secret_hash_for(session_id)
        sid_revoked = bool(await self._call(lambda: self._client.exists(rkey)))
        if secret_hash is None:
            if not sid_revoked:
                return None
            return SessionInfo(session_id, "revoked", None, None, None, None, None)
        skey, wkey, revkey = self._keys(secret_hash)

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(skey, ["user", "exp", "lim"])
            pipe.exists(revkey)
            pipe.zcount(wkey, f"({(self._clock() * 1_000_000) - self._window_us:.0f}", "+inf")
            return await pipe.execute()

        (user, exp, lim), revoked, used = await self._call(read)
        expires_at = int(exp) if exp is not None else None
        limit = int(lim) if lim is not None else None
        if revoked or sid_revoked:
            status = "revoked"
        elif expires_at is not None and expires_at <= self._clock():
            status = "expired"
        else:
            status = "active"
        return SessionInfo(
            session_id=session_id,
            status=status,
            user=_text(user),
            limit=limit,
            remaining=max(limit - int(used), 0) if limit is not None else None,
            expires_at=expires_at,
            secret_hash_prefix=secret_hash[:12],
        )

    async def audit_tail(self, count: int) -> list[AuditEntry]:
        if count <= 0:  # XREVRANGE refuses COUNT 0; the embedded store answers []
            return []

        async def read() -> Any:
            return await self._client.xrevrange(self._audit, count=count)

        rows = await self._call(read) or []
        entries = []
        for entry_id, fields in reversed(rows):
            text = {_text(k): _text(v) or "" for k, v in (fields or {}).items()}
            entries.append(
                AuditEntry(
                    id=_text(entry_id) or "",
                    session_id=text.get("session_id") or None,
                    secret_hash_prefix=text.get("secret_hash_prefix") or None,
                    reason=text.get("reason") or "",
                    replica=text.get("replica") or "",
                    at=float(text.get("at") or "0"),
                )
            )
        return entries

    async def revoked_among(self, secret_hashes: Collection[str]) -> set[str]:
        hashes = list(secret_hashes)
        if not hashes:
            return set()

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for secret_hash in hashes:
                pipe.exists(self._keys(secret_hash)[2])
            return await pipe.execute()

        flags = await self._call(read)
        return {h for h, flag in zip(hashes, flags, strict=True) if flag}

    async def revocations(self) -> AsyncIterator[str | None]:
        """Revoked hashes from every replica; resubscribes after a Redis outage.

        Pub/sub does not replay what was published while we were away, so a
        resubscription yields None for the caller to re-check what it holds.
        The retry delay stays short: streams must close within seconds.
        """
        delay = 0.1
        resumed = False
        while True:
            # A dedicated connection; the channel is silent most of the time,
            # so liveness comes from _listen's pings, not a read timeout.
            client = aioredis.Redis.from_url(
                self._pubsub_url,
                socket_connect_timeout=5,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                delay = 0.1
                if resumed:
                    yield None
                resumed = True
                async for secret_hash in self._listen(pubsub):
                    yield secret_hash
            except (TimeoutError, RedisError, OSError) as exc:
                logger.warning("Revocation channel lost (%s); resubscribing", type(exc).__name__)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _listen(self, pubsub: Any) -> AsyncIterator[str]:
        """Messages from a subscribed connection, pinging it when it goes quiet.

        A Redis host that vanishes without closing the connection would
        otherwise leave the listener waiting forever; no reply to a ping
        within ``ping_seconds`` raises, and the caller resubscribes.
        """
        quiet_since = time.monotonic()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=self._ping_seconds / 2)
            if message is not None:
                quiet_since, pinged = time.monotonic(), False
                if message.get("type") == "message":
                    yield _text(message["data"]) or ""
                continue
            if time.monotonic() - quiet_since < self._ping_seconds:
                continue
            if pinged:
                raise TimeoutError("no answer to a ping on the revocation channel")
            await pubsub.ping()
            pinged = True
            quiet_since = time.monotonic()

    async def ping(self) -> None:
        await self._call(lambda: self._client.ping())

    async def close(self) -> None:
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        if self._admit_connection is not None:
            await self._admit_connection.disconnect()
        await self._client.aclose()
