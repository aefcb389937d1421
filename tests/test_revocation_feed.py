"""The revocation feed notices a Redis that stops answering without closing
the connection (a frozen host, a paused process), resubscribes, and tells
the revoker that it may have missed announcements."""

from __future__ import annotations

import asyncio
import time

from gateway.store.redis import RedisStore, connect
from tests.harness import RedisServer


async def test_a_frozen_redis_is_detected_by_ping_and_the_gap_is_reported() -> None:
    with RedisServer() as server:
        client = connect(server.url, cluster=False, timeout=1.0)
        store = RedisStore(client, prefix="feed", pubsub_url=server.url, ping_seconds=0.5)
        feed = store.revocations()
        try:
            first = asyncio.ensure_future(anext(feed))
            probe = server.client()
            deadline = time.monotonic() + 5
            while (await probe.pubsub_numsub("feed:revocations"))[0][1] < 1:
                assert time.monotonic() < deadline, "never subscribed"
                await asyncio.sleep(0.02)
            await probe.aclose()

            # Frozen: the TCP connection stays open, nothing answers.
            server.pause()
            frozen_at = time.monotonic()
            await asyncio.sleep(1.5)  # three ping intervals pass while frozen
            server.resume()
            # The listener gave up on the silent connection and resubscribed;
            # the first thing it yields is the gap marker.
            assert await asyncio.wait_for(first, 10) is None
            assert time.monotonic() - frozen_at < 10

            # And it hears announcements again.
            second = asyncio.ensure_future(anext(feed))
            deadline = time.monotonic() + 5
            while not second.done():
                assert time.monotonic() < deadline, "no announcement after resubscribing"
                await store._client.publish("feed:revocations", "h" * 64)
                await asyncio.sleep(0.05)
            assert second.result() == "h" * 64
        finally:
            await feed.aclose()
            await store.close()
