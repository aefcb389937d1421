"""The Redis connection and the one place its errors become StoreUnavailable."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from gateway.errors import StoreUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster

#: Pauses before the second and third attempt of a write that is safe to repeat.
RETRY_DELAYS = (0.05, 0.1)


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


class _SentinelClient(aioredis.Redis):
    """The master's client, which also closes the connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool: Any = self.connection_pool
        await super().aclose(close_connection_pool)
        # A sentinel's client reconnects on its next command, and anything
        # that still asks where the master is after this (the feed's client
        # shares the sentinels) would open a connection nothing closes. With
        # the list emptied, a late question fails as "no master" instead.
        manager = pool.sentinel_manager
        sentinels, manager.sentinels = manager.sentinels, []
        for sentinel in sentinels:
            await sentinel.aclose()


def connect_sentinel(
    sentinels: Sequence[tuple[str, int]],
    master: str,
    *,
    url: str | None,
    timeout: float,
    sentinel_password: str | None = None,
) -> aioredis.Redis:
    """A client of the master the sentinels name, asked again on every new
    connection, so a failover is followed as soon as a connection fails.

    ``url`` (optional) gives the master's credentials and database only.
    """
    credentials: dict[str, Any] = {}
    if url:
        parsed = parse_url(url)
        credentials = {k: v for k, v in parsed.items() if k in ("username", "password", "db")}
        if urlsplit(url).scheme == "rediss":
            credentials["ssl"] = True
    # Any: redis-py types Sentinel() in some releases only, and an ignore
    # comment would be an unused-ignore error under the others.
    sentinel_class: Any = Sentinel
    sentinel = sentinel_class(
        list(sentinels),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": sentinel_password,
            "retry": Retry(NoBackoff(), 0),
        },
        decode_responses=False,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **credentials,
    )
    client: aioredis.Redis = sentinel.master_for(
        master,
        redis_class=_SentinelClient,
        max_connections=256,
        # As for a plain client (see connect): dead pooled connections are
        # found before use, not by a failed batch.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return client


def text(value: Any) -> str | None:
    """Replies are bytes (decode_responses is off); None stays None."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def is_oom(error: BaseException) -> bool:
    """Redis refused a write because it reached maxmemory (with noeviction)."""
    return isinstance(error, OutOfMemoryError)


class Availability:
    """Runs Redis operations, translating their errors, and watches the outcome.

    Whether Redis answers, and whether it is full, is logged when it changes
    and once per ``log_interval`` while it lasts, with a count: an outage is
    a few lines, not one per refused request. Flapping is not news either:
    a Redis at its memory limit lets a write through now and then, so it
    counts as full until ``hold`` seconds pass without a refusal; an outage
    that starts again within ``hold`` of the last one's end is logged only
    by the interval line.
    """

    def __init__(
        self,
        *,
        report: bool = True,
        log_interval: float = 30.0,
        hold: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A one-shot command (the CLI) reports its own failure instead.
        self._log = logger.error if report else logger.debug
        self._recovered = logger.warning if report else logger.debug
        self._log_interval = log_interval
        self._hold = hold
        self._clock = clock
        self._recovered_at = -math.inf
        self._announced = False  # whether this outage's start was logged
        self._last_oom = -math.inf
        self.down_since: float | None = None
        self.full_since: float | None = None
        self._refused = 0
        self._full_refused = 0
        self._logged_at = 0.0

    @property
    def full(self) -> bool:
        return self.full_since is not None

    async def call(self, operation: Callable[[], Awaitable[T]], *, write: bool = False) -> T:
        """Run one Redis operation; driver and socket errors become StoreUnavailable."""
        try:
            result = await operation()
        except (TimeoutError, RedisError, OSError) as exc:
            raise self.failed(exc) from exc
        self.answered(wrote=write)
        return result

    async def idempotent(
        self, operation: Callable[[], Awaitable[T]], *, proves_room: bool = True
    ) -> T:
        """Writes that are safe to repeat get a few quick retries (not when full:
        that lasts until keys expire, far longer than a retry waits).

        ``proves_room`` is False for writes allowed even when Redis is full
        (revocations): their success says nothing about the room left.
        """
        for delay in RETRY_DELAYS:
            try:
                return await self.call(operation, write=proves_room)
            except StoreUnavailable:
                if self.full:
                    raise
                await asyncio.sleep(delay)
        return await self.call(operation, write=proves_room)

    def failed(self, exc: BaseException) -> StoreUnavailable:
        """Record a failed operation; the error to raise for it."""
        now = self._clock()
        if is_oom(exc):
            self._last_oom = now
            self._full_refused += 1
            if self.full_since is None:
                self.full_since = now
                self._log(
                    "Redis is full (maxmemory reached): sessions are not registered and "
                    "requests are refused with 503; revocations are still stored"
                )
                self._logged_at = now
            elif now - self._logged_at >= self._log_interval:
                self._log(
                    "Redis is still full after %.0f s: %d writes refused",
                    now - self.full_since,
                    self._full_refused,
                )
                self._logged_at = now
            return StoreUnavailable("Redis is full (maxmemory reached)")
        self._refused += 1
        if self.down_since is None:
            self.down_since = now
            self._announced = now - self._recovered_at >= self._hold
            if self._announced:
                self._log(
                    "Redis is unavailable (%s): client requests are refused with 503 "
                    "until it answers",
                    type(exc).__name__,
                )
                self._logged_at = now
        elif now - self._logged_at >= self._log_interval:
            self._log(
                "Redis still unavailable after %.0f s: %d operations refused",
                now - self.down_since,
                self._refused,
            )
            self._logged_at = now
        return StoreUnavailable(f"Redis is unavailable: {type(exc).__name__}")

    def answered(self, *, wrote: bool) -> None:
        """Record a successful operation; a write that succeeded means not full."""
        if self.down_since is None and self.full_since is None:
            return  # the common case, on every batch
        now = self._clock()
        if self.down_since is not None:
            if self._announced:
                self._recovered(
                    "Redis answers again after %.1f s (%d operations refused meanwhile)",
                    now - self.down_since,
                    self._refused,
                )
                self._refused = 0
            self.down_since = None
            self._recovered_at = now
        if wrote and self.full_since is not None and now - self._last_oom >= self._hold:
            self._recovered(
                "Redis accepts writes again after %.1f s full (%d writes refused)",
                now - self.full_since,
                self._full_refused,
            )
            self.full_since = None
            self._full_refused = 0


async def read_replies(connection: Any, count: int) -> list[Any]:
    """``count`` pipelined replies in order, a command's error kept in its place.

    No per-read timeout: the caller runs the whole exchange under one deadline.
    """
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response(timeout=math.inf))
        except ResponseError as exc:
            replies.append(exc)
    return replies
