"""The revocation listener is supervised: whatever it raises, it restarts.

Without it no stream on this replica is closed by a revocation made on
another, and nothing would say so. These tests break the feed on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.metrics import Metrics
from gateway.revocation import Revoker
from gateway.store.memory import MemoryStore
from tests.harness import eventually


class BrokenFeedStore(MemoryStore):
    """The embedded store, whose first ``failures`` feeds raise at once."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.subscriptions = 0

    def revocations(self) -> AsyncIterator[str | None]:
        self.subscriptions += 1
        if self.failures > 0:
            self.failures -= 1
            return self._broken()
        return super().revocations()

    async def _broken(self) -> AsyncIterator[str | None]:
        raise RuntimeError("a bug in the listener, not a Redis error")
        yield None  # makes this an async generator


def _sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_a_failing_listener_is_restarted_counted_and_reported() -> None:
    store = BrokenFeedStore(failures=2)
    metrics = Metrics()
    revoker = Revoker(store, replica="a", metrics=metrics)
    revoker.start()
    try:
        await eventually(lambda: store.subscriptions == 3, what="the third subscription")
        restarts = "chatkit_gateway_revocation_listener_restarts_total"
        assert _sample(metrics, restarts) == 2
        await eventually(lambda: revoker.listener_state == "up", what="the listener to be up")
        assert _sample(metrics, "chatkit_gateway_revocation_listener_up") == 1

        # And it works: a revocation made on another replica closes our stream.
        closed = asyncio.Event()
        revoker.track("h" * 64, closed.set)
        await store.revoke(secret_hash="h" * 64, session_id=None, reason="t", replica="b")
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        await revoker.stop()
    assert revoker.listener_state == "stopped"
    assert _sample(metrics, "chatkit_gateway_revocation_listener_up") == 0


async def test_streams_revoked_while_the_listener_was_down_are_closed_on_restart() -> None:
    store = BrokenFeedStore(failures=1)
    metrics = Metrics()
    revoker = Revoker(store, replica="a", metrics=metrics)
    closed = asyncio.Event()
    revoker.track("h" * 64, closed.set)
    # Revoked on another replica before this one listens: no announcement reaches it.
    await store.revoke(secret_hash="h" * 64, session_id=None, reason="t", replica="b")
    revoker.start()
    try:
        await asyncio.wait_for(closed.wait(), 5)
        assert _sample(metrics, "chatkit_gateway_revocation_listener_restarts_total") == 1
    finally:
        await revoker.stop()


async def test_while_waiting_to_restart_the_state_says_so() -> None:
    store = BrokenFeedStore(failures=100)
    metrics = Metrics()
    revoker = Revoker(store, replica="a", metrics=metrics)
    revoker.start()
    try:
        await eventually(lambda: store.subscriptions >= 2, what="a restart")
        assert revoker.listener_state == "restarting"
        assert _sample(metrics, "chatkit_gateway_revocation_listener_up") == 0
    finally:
        await revoker.stop()
