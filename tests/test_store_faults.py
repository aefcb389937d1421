"""The Redis store under real faults: a replica with a wrong clock, a full
Redis, a paused Redis. Each test runs a private redis-server."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.ratelimit import Outcome
from gateway.revocation import Revoker
from gateway.store.base import AdmitRequest, SessionRecord
from gateway.store.redis import RedisStore, connect
from gateway.store.redis.client import Availability
from tests.harness import RedisServer, eventually, fill_redis

TWO_HOURS = 7200.0


def _record(*, ttl: int = 600, limit: int = 10) -> SessionRecord:
    return SessionRecord(
        secret_hash=secrets.token_hex(32),
        session_id=f"cksess_{secrets.token_hex(8)}",
        user="user_alice",
        expires_at=int(time.time()) + ttl,
        limit=limit,
    )


def _ask(record: SessionRecord) -> AdmitRequest:
    return AdmitRequest(record.secret_hash, False, 10, None)


# -- a replica whose clock runs two hours fast ------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        "register_then_cancel",  # the usual cancel
        "cancel_then_register",  # a cancel that raced ahead: born revoked
    ],
)
async def test_a_fast_replica_clock_does_not_shorten_a_revocation(
    redis_url: str, order: str
) -> None:
    store = RedisStore(
        connect(redis_url, cluster=False, timeout=5.0),
        pubsub_url=redis_url,
        retention_seconds=3600,
        clock=lambda: time.time() + TWO_HOURS,
    )
    probe = redis.asyncio.Redis.from_url(redis_url)
    record = _record(ttl=600)
    try:
        if order == "register_then_cancel":
            await store.register(record)
            await store.revoke(
                secret_hash=None, session_id=record.session_id, reason="t", replica="fast"
            )
        else:
            await store.revoke(
                secret_hash=None, session_id=record.session_id, reason="t", replica="fast"
            )
            assert await store.register(record) is True  # born revoked
        ttl_ms = await probe.pttl(store.keys.secret(record.secret_hash).revoked)
        # Until expiry plus retention by Redis's clock (about 4200 s), not the
        # one-minute floor a clock two hours ahead would compute.
        assert ttl_ms > (600 + 3600 - 60) * 1000
        assert (await store.admit(_ask(record))).outcome is Outcome.REVOKED
        # The audit record's time is Redis's too.
        (entry,) = await store.audit_tail(1)
        assert abs(entry.at - time.time()) < 60
    finally:
        await probe.aclose()
        await store.close()


# -- a full Redis (maxmemory with noeviction) ---------------------------------------


@pytest.fixture
async def full_redis() -> AsyncIterator[tuple[RedisServer, RedisStore]]:
    with RedisServer(
        extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    ) as server:
        store = RedisStore(connect(server.url, cluster=False, timeout=5.0), pubsub_url=server.url)
        try:
            yield server, store
        finally:
            await store.close()


async def test_a_full_redis_refuses_admissions_and_registrations_but_takes_revocations(
    full_redis: tuple[RedisServer, RedisStore],
) -> None:
    server, store = full_redis
    known = _record()
    other = _record()
    await store.register(known)
    await store.register(other)
    assert (await store.admit(_ask(known))).admitted
    probe = server.client()
    try:
        fillers = await fill_redis(probe)

        # Admissions fail closed, and write nothing (no window grows).
        for _ in range(50):
            fillers = await fill_redis(probe, fillers)
            with pytest.raises(StoreUnavailable, match="full"):
                await store.admit(_ask(other))
        assert not await probe.exists(store.keys.secret(other.secret_hash).window)
        assert store.full

        # A session that cannot be registered is not registered at all.
        newcomer = _record()
        fillers = await fill_redis(probe, fillers)
        with pytest.raises(StoreUnavailable, match="full"):
            await store.register(newcomer)
        assert await store.secret_hash_for(newcomer.session_id) is None

        # A revocation protects a user: it gets in, announced and audited.
        used_when_full = int((await probe.info("memory"))["used_memory"])
        result = await store.revoke(
            secret_hash=None, session_id=known.session_id, reason="cancel", replica="r"
        )
        assert result.secret_hash == known.secret_hash
        assert await store.revoked_among([known.secret_hash]) == {known.secret_hash}
        assert [e.session_id for e in await store.audit_tail(5)] == [known.session_id]
        assert store.full  # what a revocation may write says nothing about room
        used_after = int((await probe.info("memory"))["used_memory"])
        assert used_after - used_when_full < 256 * 1024  # nothing but the flags grew

        # Room again: admissions resume (the full state ends after a quiet
        # spell, see test_a_full_redis_is_cleared_only_by_a_write_that_needed_room).
        await probe.delete(*[f"filler:{n}" for n in range(fillers)])
        assert (await store.admit(_ask(other))).admitted
        assert (await store.admit(_ask(known))).outcome is Outcome.REVOKED
    finally:
        await probe.aclose()


# -- a revocation made while Redis was down ----------------------------------------


async def test_a_pending_revocation_is_stored_as_soon_as_redis_is_back() -> None:
    with RedisServer() as server:
        store = RedisStore(connect(server.url, cluster=False, timeout=1.0), pubsub_url=server.url)
        revoker = Revoker(store, replica="a", metrics=Metrics())
        record = _record()
        await store.register(record)
        flag = store.keys.secret(record.secret_hash).revoked
        try:
            server.stop()
            assert (
                await revoker.revoke(
                    secret_hash=record.secret_hash, session_id=record.session_id, reason="t"
                )
                is None
            )
            assert revoker.pending == 1
            # The length of the outage, not a synchronisation: long enough
            # that a retry on an exponential backoff would sleep for seconds.
            await asyncio.sleep(5)
            await asyncio.to_thread(server.start)
            back = time.monotonic()
            probe = server.client()

            async def stored() -> bool:
                return bool(await probe.exists(flag))

            try:
                await eventually(stored, interval=0.005, what="the revocation to reach Redis")
            finally:
                await probe.aclose()
            window = time.monotonic() - back
            # Meanwhile another replica could admit the secret: keep it short.
            assert window < 0.5, f"stored {window:.3f} s after Redis came back"
            await eventually(lambda: revoker.pending == 0, what="nothing left pending")
        finally:
            await revoker.stop(flush_timeout=1)
            await store.close()


# -- a stalled Redis: what the caller saw refused must not count --------------------


@pytest.mark.parametrize(
    "deadlines",
    [
        True,  # standalone Redis: the late scripts refuse to write
        False,  # as on a cluster (a clock per node): the failed batch is undone
    ],
)
async def test_requests_refused_with_503_during_a_stall_consume_no_slot(deadlines: bool) -> None:
    with RedisServer() as server:
        store = RedisStore(
            connect(server.url, cluster=False, timeout=0.5), pubsub_url=server.url, timeout=0.5
        )
        probe = server.client()
        record = _record(limit=5)
        try:
            await store.register(record)
            store._batcher._deadlines = deadlines
            # One batch (of a secret never registered) opens the admission
            # connection and learns Redis's clock.
            assert (await store.admit(_ask(_record()))).outcome is Outcome.UNKNOWN
            server.pause()
            try:
                stalled = await asyncio.gather(
                    *(store.admit(_ask(record)) for _ in range(3)), return_exceptions=True
                )
            finally:
                server.resume()
            assert all(isinstance(r, StoreUnavailable) for r in stalled), stalled
            if deadlines:
                # Redis ran what its socket held when it resumed, and refused.
                stats: dict[str, Any] = {}

                async def refused_late() -> bool:
                    nonlocal stats
                    stats = await probe.info("errorstats")
                    return "errorstat_LATE" in stats

                await eventually(refused_late, what=lambda: f"errorstat_LATE in {stats}")
                assert stats["errorstat_LATE"]["count"] == 3

            decisions = [await store.admit(_ask(record)) for _ in range(6)]
            assert [d.outcome for d in decisions] == [Outcome.ADMITTED] * 5 + [Outcome.RATE_LIMITED]
            assert await probe.zcard(store.keys.secret(record.secret_hash).window) == 5
        finally:
            await probe.aclose()
            await store.close()


# -- saying so once: an outage is a few log lines, not one per request ------------


def test_an_outage_is_logged_when_it_starts_once_per_interval_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    availability = Availability(log_interval=30, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="gateway.store.redis.client")
    for _ in range(500):  # a busy replica: every request fails
        availability.failed(ConnectionError("refused"))
    now[0] += 31
    for _ in range(500):
        availability.failed(ConnectionError("refused"))
    now[0] += 1
    availability.answered(wrote=False)
    # Flapping: it fails again at once, answers again; no new start or end lines.
    for _ in range(3):
        availability.failed(ConnectionError("refused"))
        now[0] += 1
        availability.answered(wrote=False)
    assert [r.getMessage() for r in caplog.records] == [
        "Redis is unavailable (ConnectionError): client requests are refused with 503 "
        "until it answers",
        "Redis still unavailable after 31 s: 501 operations refused",
        "Redis answers again after 32.0 s (1000 operations refused meanwhile)",
    ]


def test_a_full_redis_is_cleared_only_by_a_write_that_needed_room() -> None:
    now = [1000.0]
    availability = Availability(report=False, hold=10, clock=lambda: now[0])
    error = availability.failed(redis.exceptions.OutOfMemoryError("command not allowed"))
    assert "full" in str(error)
    assert availability.full
    availability.answered(wrote=True)  # a write that fit the last bytes: still at the limit
    assert availability.full
    now[0] += 10
    availability.answered(wrote=False)  # a read, or a revocation (allowed when full)
    assert availability.full
    availability.answered(wrote=True)
    assert not availability.full


async def test_a_handshake_that_never_answers_leaves_no_socket_open() -> None:
    """A server that accepts and then says nothing (a paused or wedged Redis):
    the admission answers 503 once its deadline passes, and the connection's
    socket is closed then, not whenever the garbage collector finds it."""
    closed = asyncio.Event()
    accepted = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while await reader.read(65536):
            pass  # the handshake arrives and is never answered
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}", cluster=False, timeout=0.3)
    store = RedisStore(client, prefix="silent", pubsub_url="")
    try:
        with pytest.raises(StoreUnavailable):
            await store.admit(AdmitRequest("a" * 64, True, 10, None))
        assert accepted == 1
        # The gateway closed its end: the server reads EOF at once.
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        await store.close()
        server.close()
        await server.wait_closed()
