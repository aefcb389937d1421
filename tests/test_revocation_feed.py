"""The revocation feed notices a Redis that stops answering without closing
the connection (a frozen host, a paused process), resubscribes, and tells
the revoker that it may have missed announcements."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from gateway.store.redis import RedisStore, connect
from tests.harness import RedisServer, eventually, subscribed

CHANNEL = "feed:revocations"


async def test_a_frozen_redis_is_detected_by_ping_and_the_gap_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with RedisServer() as server:
        client = connect(server.url, cluster=False, timeout=1.0)
        store = RedisStore(client, prefix="feed", pubsub_url=server.url, ping_seconds=0.5)
        # An async generator underneath; the Store interface only promises iteration.
        feed = cast(AsyncGenerator[str | None, None], store.revocations())
        probe = server.client()
        try:
            first = asyncio.ensure_future(anext(feed))
            await eventually(lambda: subscribed(probe, CHANNEL), what="the feed to subscribe")

            # Frozen: the TCP connection stays open, nothing answers.
            server.pause()
            frozen_at = time.monotonic()
            await eventually(
                lambda: "Revocation channel lost" in caplog.text,
                timeout=10,
                what="the listener to give up on the silent connection",
            )
            server.resume()
            # The listener gave up on the silent connection and resubscribed;
            # the first thing it yields is the gap marker.
            assert await asyncio.wait_for(first, 10) is None
            assert time.monotonic() - frozen_at < 10

            # And it hears announcements again.
            second = asyncio.ensure_future(anext(feed))

            async def heard() -> bool:
                await probe.publish(CHANNEL, "h" * 64)
                return second.done()

            await eventually(heard, what="an announcement heard after resubscribing")
            assert second.result() == "h" * 64
        finally:
            await probe.aclose()
            await feed.aclose()
            await store.close()
