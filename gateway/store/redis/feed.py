"""The revocation feed: Redis pub/sub announcements of revoked secret hashes.

Every replica subscribes to one channel and closes the streams of the hashes
it hears. Pub/sub does not replay what was published while a subscriber was
away, so after every resubscription the feed yields ``None``: the caller must
re-check what it holds (``Store.revoked_among``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.store.redis.client import text

logger = logging.getLogger(__name__)

# A silent revocation channel is pinged after this long, and given up on (and
# resubscribed) when the ping goes unanswered for as long again.
PUBSUB_PING_SECONDS = 10.0


class RevocationFeed:
    """Subscribes to the revocation channel on a connection of its own.

    Cluster clients have no async pub/sub; PUBLISH reaches every node of a
    cluster, so one plain connection to any node will do: ``url`` names it.
    """

    def __init__(self, url: str, channel: str, *, ping_seconds: float) -> None:
        self._url = url
        self._channel = channel
        self._ping_seconds = ping_seconds

    async def messages(self) -> AsyncIterator[str | None]:
        """Revoked hashes from every replica; resubscribes after a Redis outage.

        Yields None after each resubscription (not after the first). The
        retry delay stays short: streams must close within seconds.
        """
        delay = 0.1
        resumed = False
        quiet = False  # the loss is logged once, not at every failed resubscription
        while True:
            # A dedicated connection; the channel is silent most of the time,
            # so liveness comes from _listen's pings, not a read timeout.
            client = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=5,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                delay = 0.1
                if quiet:
                    logger.warning("Revocation channel subscribed again")
                quiet = False
                if resumed:
                    yield None
                resumed = True
                async for secret_hash in self._listen(pubsub):
                    yield secret_hash
            except (TimeoutError, RedisError, OSError) as exc:
                if not quiet:
                    logger.warning(
                        "Revocation channel lost (%s); resubscribing", type(exc).__name__
                    )
                quiet = True
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
                    yield text(message["data"]) or ""
                continue
            if time.monotonic() - quiet_since < self._ping_seconds:
                continue
            if pinged:
                raise TimeoutError("no answer to a ping on the revocation channel")
            await pubsub.ping()
            pinged = True
            quiet_since = time.monotonic()
