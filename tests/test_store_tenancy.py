"""The create-time checks and the user's session index, on every store.

Each test runs unchanged against the embedded store, a real ``redis-server``
and a real three-node Redis Cluster: an app's create window, a user's cap on
active sessions (revoke the oldest, or refuse), a ban that empties the
user's index, and the counts an operator reads.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.auth import SecretHasher
from gateway.store.base import SessionRecord, SessionSlot, SlotOutcome, Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore, connect
from tests.harness import RedisCluster

HASHER = SecretHasher(b"tenancy-pepper")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3) as started:
        yield started


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        made = RedisStore(connect(url, cluster=False, timeout=5.0), pubsub_url=url)
    else:
        cluster: RedisCluster = request.getfixturevalue("cluster")
        # A prefix per test: the module's cluster outlives each test.
        made = RedisStore(
            connect(cluster.url, cluster=True, timeout=5.0),
            prefix=f"t{secrets.token_hex(4)}",
            pubsub_url=cluster.url,
        )
    # As the gateway does at start-up (its store monitor): redis-py's cluster
    # client fails commands that race its own first discovery of the nodes.
    await made.ping()
    try:
        yield made
    finally:
        await made.close()


def _user() -> str:
    return f"user-{secrets.token_hex(6)}"


def _slot(
    user: str,
    *,
    app: str = "support",
    workflow: str = "wf_a",
    ttl: int = 600,
    app_rate: int | None = None,
    max_active: int | None = None,
    refuse: bool = False,
) -> SessionSlot:
    return SessionSlot(
        session_id=f"cksess_{secrets.token_hex(12)}",
        secret_hash=HASHER(secrets.token_bytes(16)),
        user=user,
        app=app,
        workflow_id=workflow,
        expires_at=int(time.time()) + ttl,
        app_rate=app_rate,
        max_active=max_active,
        refuse=refuse,
    )


def _record(slot: SessionSlot) -> SessionRecord:
    return SessionRecord(
        secret_hash=slot.secret_hash,
        session_id=slot.session_id,
        user=slot.user,
        expires_at=slot.expires_at,
        limit=10,
        workflow_id=slot.workflow_id,
        issued=bool(slot.app),
        app=slot.app,
    )


async def _hand_out(store: Store, slot: SessionSlot) -> SlotOutcome:
    decision = await store.open_session(slot)
    if decision.outcome is SlotOutcome.OPENED:
        await store.register(_record(slot))
    return decision.outcome


async def test_an_apps_create_window_admits_exactly_its_limit_even_concurrently(
    store: Store,
) -> None:
    app = f"app{secrets.token_hex(3)}"
    slots = [_slot(_user(), app=app, app_rate=7) for _ in range(20)]
    decisions = await asyncio.gather(*(store.open_session(s) for s in slots))
    outcomes = [d.outcome for d in decisions]
    assert outcomes.count(SlotOutcome.OPENED) == 7
    assert outcomes.count(SlotOutcome.APP_RATE_LIMITED) == 13
    refused = [d for d in decisions if d.outcome is SlotOutcome.APP_RATE_LIMITED]
    # The wait is until the oldest create leaves the 60 s window.
    assert all(0 < d.retry_after_ms <= 60_000 for d in refused)
    stats = await store.app_stats(app)
    assert (stats.creates, stats.active, stats.window_seconds) == (7, 7, 60)


async def test_beyond_the_cap_the_users_oldest_session_of_that_app_and_workflow_goes(
    store: Store,
) -> None:
    user = _user()
    first, second, third = (_slot(user, max_active=2) for _ in range(3))
    for slot in (first, second):
        assert await _hand_out(store, slot) is SlotOutcome.OPENED
    # Other workflows and other apps are counted apart.
    assert await _hand_out(store, _slot(user, workflow="wf_b", max_active=2)) is SlotOutcome.OPENED
    assert await _hand_out(store, _slot(user, app="other", max_active=2)) is SlotOutcome.OPENED
    decision = await store.open_session(third)
    assert decision.outcome is SlotOutcome.OPENED
    assert [(s.session_id, s.secret_hash) for s in decision.evicted] == [
        (first.session_id, first.secret_hash)
    ]
    sessions, ban = await store.user_sessions(user)
    assert ban is None
    assert first.session_id not in {s.session_id for s in sessions}
    assert len(sessions) == 4


async def test_refuse_answers_too_many_and_counts_nothing(store: Store) -> None:
    user, app = _user(), f"app{secrets.token_hex(3)}"
    slots = [_slot(user, app=app, max_active=2, refuse=True, ttl=300 + i) for i in range(3)]
    for slot in slots[:2]:
        assert await _hand_out(store, slot) is SlotOutcome.OPENED
    decision = await store.open_session(slots[2])
    assert decision.outcome is SlotOutcome.TOO_MANY_SESSIONS
    # Until the first of the two expires (300 s from its creation).
    assert 290_000 < decision.retry_after_ms <= 300_000
    assert decision.evicted == ()
    assert (await store.app_stats(app)).creates == 2


async def test_a_revoked_session_leaves_its_users_count_and_its_apps(store: Store) -> None:
    user, app = _user(), f"app{secrets.token_hex(3)}"
    first, second = (_slot(user, app=app, max_active=1, refuse=True) for _ in range(2))
    assert await _hand_out(store, first) is SlotOutcome.OPENED
    await store.revoke(
        secret_hash=first.secret_hash, session_id=first.session_id, reason="cancel", replica="t"
    )
    assert (await store.app_stats(app)).active == 0
    assert await _hand_out(store, second) is SlotOutcome.OPENED
    audit = await store.audit_tail(1)
    assert (audit[-1].session_id, audit[-1].app) == (first.session_id, app)


async def test_a_ban_empties_the_users_index_and_refuses_new_sessions(store: Store) -> None:
    user = _user()
    mine = [_slot(user), _slot(user, app=""), _slot(user, app="other")]
    for slot in mine:
        assert await _hand_out(store, slot) is SlotOutcome.OPENED
    bystander = _slot(_user())
    assert await _hand_out(store, bystander) is SlotOutcome.OPENED

    banned = await store.ban_user(user, for_seconds=120)
    assert {s.session_id for s in banned} == {s.session_id for s in mine}
    assert {s.secret_hash for s in banned} == {s.secret_hash for s in mine}
    left = await store.banned_for(user)
    assert left is not None
    assert 110 < left <= 120
    decision = await store.open_session(_slot(user))
    assert decision.outcome is SlotOutcome.BANNED
    assert 110_000 < decision.retry_after_ms <= 120_000
    sessions, ban = await store.user_sessions(user)
    assert sessions == []
    assert ban is not None
    # Nobody else is touched.
    assert await store.banned_for(bystander.user) is None
    assert [s.session_id for s in (await store.user_sessions(bystander.user))[0]] == [
        bystander.session_id
    ]


async def test_a_lifted_ban_lets_the_user_back_in(store: Store) -> None:
    user = _user()
    await store.ban_user(user, for_seconds=600)
    assert (await store.open_session(_slot(user))).outcome is SlotOutcome.BANNED
    assert await store.lift_ban(user) is True
    assert await store.lift_ban(user) is False  # nothing left to lift
    assert await store.banned_for(user) is None
    assert await _hand_out(store, _slot(user)) is SlotOutcome.OPENED


async def test_a_ban_without_a_duration_revokes_what_is_active_and_no_more(store: Store) -> None:
    user = _user()
    assert await _hand_out(store, _slot(user)) is SlotOutcome.OPENED
    assert len(await store.ban_user(user, for_seconds=0)) == 1
    assert await store.banned_for(user) is None
    assert await _hand_out(store, _slot(user)) is SlotOutcome.OPENED


async def test_closing_an_unregistered_session_gives_its_create_back(store: Store) -> None:
    user, app = _user(), f"app{secrets.token_hex(3)}"
    slot = _slot(user, app=app, app_rate=1, max_active=1, refuse=True)
    assert (await store.open_session(slot)).outcome is SlotOutcome.OPENED
    await store.close_session(slot)
    stats = await store.app_stats(app)
    assert (stats.creates, stats.active) == (0, 0)
    assert await store.user_sessions(user) == ([], None)
    assert await _hand_out(store, _slot(user, app=app, app_rate=1, max_active=1, refuse=True)) is (
        SlotOutcome.OPENED
    )
