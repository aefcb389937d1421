"""The Redis connection and the one place its errors become StoreUnavailable."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from gateway.errors import StoreUnavailable

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
        for sentinel in pool.sentinel_manager.sentinels:
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
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
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


async def call(operation: Callable[[], Awaitable[T]]) -> T:
    """Run one Redis operation, translating driver and socket errors."""
    try:
        return await operation()
    except (TimeoutError, RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc


async def idempotent(operation: Callable[[], Awaitable[T]]) -> T:
    """Writes that are safe to repeat get a few quick retries."""
    for delay in RETRY_DELAYS:
        try:
            return await call(operation)
        except StoreUnavailable:
            await asyncio.sleep(delay)
    return await call(operation)
