"""The revoker in process: local enforcement, the pending set, and shutdown.

The embedded store stands in for Redis, with an outage as a flag, so the
retry loop's success and give-up paths run in milliseconds. The subprocess
counterparts (two replicas, a real Redis stopped mid-cancel) are in
test_cancel.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.metrics import Metrics
from gateway.ratelimit import Outcome
from gateway.revocation import Revoker
from gateway.store.base import AdmitRequest, SessionRecord
from tests.doubles import FakeClock, OutageStore
from tests.harness import eventually

HASH = "a" * 64
SESSION = "cksess_revoker"


@pytest.fixture
async def store() -> AsyncIterator[OutageStore]:
    clock = FakeClock()
    store = OutageStore(clock=clock)
    await store.register(SessionRecord(HASH, SESSION, "user", int(clock()) + 600, 10))
    yield store
    await store.close()


@pytest.fixture
async def revoker(store: OutageStore) -> AsyncIterator[Revoker]:
    revoker = Revoker(store, replica="replica-a", metrics=Metrics())
    yield revoker
    await revoker.stop(flush_timeout=0)


async def _store_says(store: OutageStore, secret_hash: str) -> Outcome:
    decision = await store.admit(AdmitRequest(secret_hash, False, 10, None))
    return decision.outcome


async def test_a_stored_revocation_is_enforced_by_the_store_and_counted(
    store: OutageStore,
) -> None:
    metrics = Metrics()
    revoker = Revoker(store, replica="replica-a", metrics=metrics)

    result = await revoker.revoke(secret_hash=HASH, session_id=None, reason="admin")

    assert result is not None
    assert result.session_id == SESSION
    assert await _store_says(store, HASH) is Outcome.REVOKED
    # The store holds it now: nothing is left for this replica to remember.
    assert not revoker.is_revoked_locally(HASH)
    assert revoker.pending == 0
    sample = "chatkit_gateway_revocations_total"
    assert metrics.registry.get_sample_value(sample, {"source": "admin", "known": "true"}) == 1


async def test_a_revocation_the_store_refuses_is_enforced_here_and_kept_pending(
    store: OutageStore,
) -> None:
    metrics = Metrics()
    revoker = Revoker(store, replica="replica-a", metrics=metrics)
    store.down = True

    result = await revoker.revoke(secret_hash=HASH, session_id=SESSION, reason="cancel")

    assert result is None
    assert revoker.is_revoked_locally(HASH)
    assert revoker.pending == 1
    assert metrics.registry.get_sample_value("chatkit_gateway_revocations_pending") == 1
    await revoker.stop(flush_timeout=0)


async def test_a_pending_revocation_is_stored_once_the_store_is_back(
    store: OutageStore, revoker: Revoker
) -> None:
    store.down = True
    assert await revoker.revoke(secret_hash=HASH, session_id=SESSION, reason="cancel") is None
    store.down = False

    await eventually(lambda: revoker.pending == 0, what="the retry loop to store it")

    assert await _store_says(store, HASH) is Outcome.REVOKED
    assert not revoker.is_revoked_locally(HASH)


async def test_stop_flushes_what_is_pending_when_the_store_comes_back_in_time(
    store: OutageStore, revoker: Revoker
) -> None:
    store.down = True
    await revoker.revoke(secret_hash=HASH, session_id=SESSION, reason="cancel")
    asyncio.get_running_loop().call_later(0.05, setattr, store, "down", False)

    await revoker.stop(flush_timeout=10)

    assert revoker.pending == 0
    assert await _store_says(store, HASH) is Outcome.REVOKED


async def test_stop_gives_up_on_pending_revocations_after_the_flush_timeout(
    store: OutageStore, revoker: Revoker, caplog: pytest.LogCaptureFixture
) -> None:
    store.down = True
    await revoker.revoke(secret_hash=HASH, session_id=SESSION, reason="cancel")
    await revoker.revoke(secret_hash="b" * 64, session_id=None, reason="admin")

    async with asyncio.timeout(2):  # bounded by the flush timeout, not the backoff
        await revoker.stop(flush_timeout=0.3)

    assert "2 revocations could not be stored before shutdown" in caplog.text
    assert [r.levelname for r in caplog.records if "before shutdown" in r.message] == ["ERROR"]
    # The retry loop is gone: nothing of the revoker still runs after stop().
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert revoker.pending == 2


async def test_revoking_closes_this_replicas_streams_for_the_secret(
    store: OutageStore, revoker: Revoker
) -> None:
    closed: list[str] = []
    revoker.track(HASH, lambda: closed.append("first"))
    revoker.track(HASH, lambda: closed.append("second"))
    revoker.track("c" * 64, lambda: closed.append("other secret"))

    await revoker.revoke(secret_hash=None, session_id=SESSION, reason="cancel")

    # Found through the session id: the store answered with the secret's hash.
    assert sorted(closed) == ["first", "second"]


async def test_a_stream_closes_when_another_replica_revokes_its_secret(
    store: OutageStore, revoker: Revoker
) -> None:
    other = Revoker(store, replica="replica-b", metrics=Metrics())
    closed: list[str] = []
    revoker.track(HASH, lambda: closed.append("stream"))
    revoker.start()

    async def heard() -> bool:
        # The listener subscribes in the background and announcements are not
        # replayed: revoke (idempotently) until it hears one.
        await other.revoke(secret_hash=HASH, session_id=None, reason="admin")
        return closed == ["stream"]

    await eventually(heard, what="replica A to close the stream replica B revoked")


async def test_an_untracked_stream_is_not_closed(store: OutageStore, revoker: Revoker) -> None:
    closed: list[str] = []

    def close() -> None:
        closed.append("stream")

    revoker.track(HASH, close)
    revoker.untrack(HASH, close)
    await revoker.revoke(secret_hash=HASH, session_id=None, reason="admin")

    assert closed == []
