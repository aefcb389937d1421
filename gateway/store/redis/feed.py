"""The revocation feed: Redis pub/sub announcements of revoked secret hashes.

Every replica subscribes to one channel and closes the streams of the hashes
it hears. Pub/sub does not replay what was published while a subscriber was
away, so after every resubscription the feed yields ``None``: the caller must
re-check what it holds (``Store.revoked_among``).

A subscription can die without a word: a peer behind a dead NAT entry or a
firewall sends no FIN, and a silent channel looks like a quiet one. So the
connection is pinged whenever it has been quiet for ``ping_seconds`` and given
up on when the answer takes as long again; TCP keepalive is on as well, for
the cases the kernel can see.

Where to subscribe depends on the deployment (:func:`source_for`): the one
URL of a standalone Redis; any reachable node of a Redis Cluster (PUBLISH is
broadcast to every node, so any one will do, and none is pinned); the current
master of a Sentinel-managed Redis, re-asked of the sentinels while listening
(a demoted master stays reachable but no longer hears what is published).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.store.redis.client import Client, text

logger = logging.getLogger(__name__)

# A channel quiet this long is pinged, and given up on (and resubscribed)
# when the ping goes unanswered as long again: a dead subscription is noticed
# within two intervals. A ping a second per replica costs Redis nothing.
PUBSUB_PING_SECONDS = 1.0
# Opening a connection and subscribing must finish within this, or it is
# tried again: a blackholed peer accepts a connection and never answers.
SUBSCRIBE_TIMEOUT = 3.0


def _keepalive() -> dict[str, Any]:
    """TCP keepalive that gives up on a vanished peer in seconds, not hours."""
    options: dict[int, int] = {}
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux names; other platforms keep their defaults
            options[getattr(socket, name)] = value
    return {"socket_keepalive": True, "socket_keepalive_options": options}


def _feed_options() -> dict[str, Any]:
    # No socket timeout: the channel is silent most of the time, so liveness
    # comes from pings with a deadline (RevocationFeed._listen).
    return {
        "socket_connect_timeout": SUBSCRIBE_TIMEOUT,
        "socket_timeout": None,
        "retry": Retry(NoBackoff(), 0),
        **_keepalive(),
    }


class _Source(Protocol):
    """Where the feed subscribes: a fresh client on each call."""

    async def open(self) -> aioredis.Redis: ...

    async def still_current(self, pubsub: Any) -> bool:
        """False once the subscription is on a server that no longer hears announcements."""
        ...


class _UrlSource:
    def __init__(self, url: str) -> None:
        self._url = url

    async def open(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self._url, **_feed_options())

    async def still_current(self, pubsub: Any) -> bool:
        return True


class _ClusterSource:
    """A reachable node of the cluster's current topology.

    The node the URL names first while it answers (the operator chose it),
    otherwise any other, the one that just failed last.
    """

    def __init__(self, cluster: RedisCluster, url: str) -> None:
        self._cluster = cluster
        parts = urlsplit(url)
        self._preferred = f"{parts.hostname}:{parts.port or 6379}"
        self._last: str | None = None

    async def open(self) -> aioredis.Redis:
        cluster = self._cluster
        if self._last is not None:
            # The node subscribed to went away: learn the topology afresh
            # (a failover may have replaced it) before choosing another.
            try:
                await cluster.nodes_manager.initialize()
            except (RedisError, OSError, TimeoutError) as exc:
                logger.debug("Cluster topology refresh failed: %s", type(exc).__name__)
        await cluster.initialize()
        nodes = cluster.get_nodes()
        random.shuffle(nodes)
        nodes.sort(key=lambda node: (node.name == self._last, node.name != self._preferred))
        error: Exception = RedisConnectionError("the cluster has no nodes")
        for node in nodes:
            kwargs = {**node.connection_kwargs, **_feed_options()}
            client = aioredis.Redis(
                connection_pool=aioredis.ConnectionPool(
                    connection_class=node.connection_class, **kwargs
                )
            )
            try:
                await client.ping()
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                await client.aclose()
                continue
            self._last = node.name
            return client
        raise error

    async def still_current(self, pubsub: Any) -> bool:
        return True


class _SentinelSource:
    """The master the sentinels name now; re-asked while subscribed."""

    def __init__(self, pool: SentinelConnectionPool) -> None:
        self._pool = pool
        self._kwargs = {
            k: v
            for k, v in pool.connection_kwargs.items()
            if k in ("username", "password", "db", "credential_provider")
        }

    async def open(self) -> aioredis.Redis:
        client: aioredis.Redis = self._pool.sentinel_manager.master_for(
            self._pool.service_name, **self._kwargs, **_feed_options()
        )
        return client

    async def still_current(self, pubsub: Any) -> bool:
        connection = pubsub.connection
        if connection is None:
            return False
        try:
            # Asked through the store's own pool, which then also drops its
            # idle connections to a former master: the re-check that follows
            # a resubscription must not read from the master that was left.
            master = await self._pool.get_master_address()  # type: ignore[no-untyped-call]
        except (RedisError, OSError, TimeoutError):
            # No sentinel answers: nothing says the master changed, and the
            # pings still watch the connection itself.
            return True
        return bool(master == (connection.host, connection.port))


def source_for(client: Client, url: str) -> _Source:
    """Where a store whose main client is ``client`` subscribes."""
    if isinstance(client, RedisCluster):
        return _ClusterSource(client, url)
    if isinstance(client.connection_pool, SentinelConnectionPool):
        return _SentinelSource(client.connection_pool)
    return _UrlSource(url)


class _Stale(RedisError):
    """The subscription is on a server that no longer hears announcements."""


class RevocationFeed:
    """Subscribes to the revocation channel on a connection of its own."""

    def __init__(
        self, url: str, channel: str, *, ping_seconds: float, client: Client | None = None
    ) -> None:
        self._source: _Source = _UrlSource(url) if client is None else source_for(client, url)
        self._channel = channel
        self._ping_seconds = ping_seconds
        self._closed = False

    def close(self) -> None:
        """Subscribe no more: the store's client is closing, and on a cluster
        subscribing would reconnect it (redis-py's initialize() does), with
        nothing left to close those connections."""
        self._closed = True

    async def messages(self) -> AsyncIterator[str | None]:
        """Revoked hashes from every replica; resubscribes after an outage.

        Yields None after each resubscription (not after the first). The
        retry delay stays short: streams must close within seconds.
        """
        delay = 0.1
        resumed = False
        lost = False  # the loss is logged once, not at every failed attempt
        while True:
            if self._closed:
                # Quiet until cancelled, as a subscription with nothing to hear.
                await asyncio.get_running_loop().create_future()
            client: aioredis.Redis | None = None
            pubsub: Any = None
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                    client = await self._source.open()
                    pubsub = client.pubsub()
                    await self._subscribe(pubsub)
                delay = 0.1
                if lost:
                    logger.warning("Revocation channel subscribed again")
                lost = False
                if resumed:
                    yield None
                resumed = True
                async for secret_hash in self._listen(pubsub):
                    yield secret_hash
            except (TimeoutError, RedisError, OSError) as exc:
                if not lost:
                    logger.warning(
                        "Revocation channel lost (%s); resubscribing", type(exc).__name__
                    )
                lost = True
            finally:
                if pubsub is not None:
                    await pubsub.aclose()
                if client is not None:
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _subscribe(self, pubsub: Any) -> None:
        """Subscribe and wait for Redis to confirm it: until then nothing is heard."""
        await pubsub.subscribe(self._channel)
        while True:
            message = await pubsub.get_message(timeout=self._ping_seconds)
            if message is not None and message.get("type") == "subscribe":
                return

    async def _listen(self, pubsub: Any) -> AsyncIterator[str]:
        """Messages from a subscribed connection, pinging it when it goes quiet.

        A Redis host that vanishes without closing the connection would
        otherwise leave the listener waiting forever; no reply to a ping
        within ``ping_seconds`` raises, and the caller resubscribes.
        """
        interval = self._ping_seconds
        heard = checked = time.monotonic()
        pinged: float | None = None
        while True:
            message = await pubsub.get_message(timeout=interval / 2)
            now = time.monotonic()
            if message is not None:
                heard = now
                pinged = None
                if message.get("type") == "message":
                    yield text(message["data"]) or ""
            if pinged is not None:
                if now - pinged >= interval:
                    raise TimeoutError("no answer to a ping on the revocation channel")
            elif now - heard >= interval:
                await pubsub.ping()
                pinged = now
            if now - checked >= interval:
                checked = now
                if not await self._source.still_current(pubsub):
                    raise _Stale("the subscribed server is no longer the master")
