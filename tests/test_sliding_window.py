"""The window slides, exactly: no early admission, no late one, no burst.

A session with limit N is admitted at most N times in any window-length
interval, and is refused only when N admissions already sit in the trailing
window. The embedded store runs on a clock the test moves microsecond by
microsecond; Redis runs on its own ``TIME`` with a 2-second window, so there
the test measures real time around each request and checks the store's
answer against bounds that hold whatever the scheduling delays were.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gateway.ratelimit import Decision, Outcome
from gateway.store.base import AdmitRequest, SessionRecord
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore, connect
from tests.doubles import FakeClock
from tests.harness import wall_clock_reach

SECOND = 1_000_000  # µs
EPOCH = 1_750_000_000 * SECOND


def _record(name: str, *, limit: int, user: str = "user_alice") -> SessionRecord:
    return SessionRecord(
        secret_hash=f"hash-{name}",
        session_id=f"cksess_{name}",
        user=user,
        expires_at=EPOCH // SECOND + 100_000,
        limit=limit,
    )


def _ask(record: SessionRecord, user_limit: int | None = None) -> AdmitRequest:
    return AdmitRequest(record.secret_hash, False, 10, user_limit)


# -- the boundary, microsecond by microsecond ----------------------------------------


@pytest.mark.parametrize(
    ("window_seconds", "limit", "offsets"),
    [
        (60, 3, [0, 10, 20]),  # admissions spread over the window
        (60, 3, [0, 0, 0]),  # a burst at one instant
        (60, 1, [0]),  # the smallest limit
        (1, 25, [i * 40_000 for i in range(25)]),  # a short window, sub-second spacing (µs)
    ],
)
async def test_admission_resumes_exactly_when_the_oldest_entry_leaves(
    window_seconds: int, limit: int, offsets: list[int]
) -> None:
    clock = FakeClock(EPOCH / SECOND)
    store = MemoryStore(window_seconds=window_seconds, clock=clock)
    record = _record("boundary", limit=limit)
    await store.register(record)
    window = window_seconds * SECOND
    # Offsets are seconds for the 60 s window, µs for the 1 s one.
    unit = SECOND if window_seconds == 60 else 1
    times = [EPOCH + offset * unit for offset in offsets]
    for when in times:
        clock.at(when)
        assert (await store.admit(_ask(record))).admitted

    for oldest in sorted(set(times)):
        clock.at(oldest + window - 1)  # 1 µs before the oldest admissions leave
        early = await store.admit(_ask(record))
        assert early.outcome is Outcome.RATE_LIMITED
        assert early.session is not None
        assert early.session.wait_ms == 1  # 1 µs, rounded up to the next millisecond
        clock.at(oldest + window)  # they have just left: exactly their places are free
        leaving = times.count(oldest)
        again = [await store.admit(_ask(record)) for _ in range(leaving + 1)]
        assert [d.outcome for d in again] == [Outcome.ADMITTED] * leaving + [
            Outcome.RATE_LIMITED
        ], f"at the boundary of the admissions at {oldest - EPOCH} µs"


async def test_refusal_reports_the_wait_until_the_oldest_leaves() -> None:
    clock = FakeClock(EPOCH / SECOND)
    store = MemoryStore(window_seconds=60, clock=clock)
    record = _record("wait", limit=2)
    await store.register(record)
    clock.at(EPOCH)
    await store.admit(_ask(record))
    clock.at(EPOCH + 45 * SECOND)
    await store.admit(_ask(record))
    clock.at(EPOCH + 50 * SECOND + 250_000)
    refused = await store.admit(_ask(record))
    assert refused.session is not None
    # The oldest (t=0) leaves at t=60: 9.75 s from now. Not 60, not the newest.
    assert refused.session.wait_ms == 9_750
    assert refused.session.reset_ms == 54_750  # the newest (t=45) leaves at t=105


# -- no burst at any boundary: a property over adversarial schedules -------------------


@dataclass
class ExactLimiter:
    """The specification, written as plainly as possible."""

    window: int
    limit: int
    admitted: list[int] = field(default_factory=list)

    def in_window(self, now: int) -> list[int]:
        return [t for t in self.admitted if now - self.window < t <= now]

    def would_admit(self, now: int) -> bool:
        return len(self.in_window(now)) < self.limit

    def wait_ms(self, now: int) -> int:
        return math.ceil((min(self.in_window(now)) + self.window - now) / 1000)


def _next_time(rng: random.Random, now: int, admitted: list[int], window: int) -> int:
    """Mostly probe the edges: just before, at and just after an admission leaves."""
    choice = rng.random()
    if admitted and choice < 0.6:
        edge = rng.choice(admitted[-8:]) + window + rng.choice([-1, 0, 0, 1])
        if edge >= now:
            return edge
    if choice < 0.75:
        return now  # several requests in the same microsecond
    if choice < 0.9:
        return now + rng.randint(1, window // 20)
    return now + rng.randint(window // 4, window)


@pytest.mark.parametrize("seed", range(8))
async def test_no_schedule_gets_more_than_the_limit_into_any_window(seed: int) -> None:
    rng = random.Random(seed)
    window_seconds = rng.choice([1, 2, 60])
    session_limit = rng.randint(1, 12)
    user_limit = rng.choice([None, rng.randint(1, 15)])
    window = window_seconds * SECOND

    clock = FakeClock(EPOCH / SECOND)
    store = MemoryStore(window_seconds=window_seconds, clock=clock)
    sessions = [_record(f"s{seed}-{i}", limit=session_limit) for i in range(2)]
    for record in sessions:
        await store.register(record)
    spec = {r.secret_hash: ExactLimiter(window, session_limit) for r in sessions}
    user_spec = ExactLimiter(window, user_limit or 10**9)
    admitted: dict[str, list[int]] = {r.secret_hash: [] for r in sessions}

    now = EPOCH
    for _ in range(600):
        record = rng.choice(sessions)
        now = _next_time(rng, now, spec[record.secret_hash].admitted, window)
        clock.at(now)
        decision: Decision = await store.admit(_ask(record, user_limit))

        session_ok = spec[record.secret_hash].would_admit(now)
        user_ok = user_spec.would_admit(now)
        # Exact both ways: refused only when the trailing window is full.
        assert decision.admitted is (session_ok and user_ok), (now - EPOCH, decision)
        if decision.admitted:
            spec[record.secret_hash].admitted.append(now)
            user_spec.admitted.append(now)
            admitted[record.secret_hash].append(now)
        elif not session_ok:
            assert decision.outcome is Outcome.RATE_LIMITED
            assert decision.session is not None
            assert decision.session.wait_ms == spec[record.secret_hash].wait_ms(now)
        else:
            assert decision.outcome is Outcome.USER_RATE_LIMITED
            assert decision.user is not None
            assert decision.user.wait_ms == user_spec.wait_ms(now)

    # The property itself, on what the store admitted: any half-open interval
    # of one window length holds at most the limit. The fullest interval ends
    # at an admission, so checking those intervals checks them all.
    every = sorted(t for ts in admitted.values() for t in ts)
    checks = [*((ts, session_limit) for ts in admitted.values()), (every, user_limit or 10**9)]
    for times, limit in checks:
        for index, end in enumerate(times):
            start = bisect.bisect_right(times, end - window)
            assert index + 1 - start <= limit
    assert sum(map(len, admitted.values())) > session_limit  # the windows did slide


# -- Redis, in real time ---------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(
        connect(redis_url, cluster=False, timeout=5.0), window_seconds=2, pubsub_url=redis_url
    )
    try:
        yield store
    finally:
        await store.close()


@dataclass
class Timed:
    """A decision and the wall-clock interval in which Redis made it."""

    decision: Decision
    sent: float
    received: float


async def _timed(store: RedisStore, request: AdmitRequest) -> Timed:
    sent = time.time()
    decision = await store.admit(request)
    return Timed(decision, sent, time.time())


class _TooSlow(Exception):
    """A step landed after the moment it was meant to probe; stage the run again."""


def _in_time(step: Timed, deadline: float, what: str) -> None:
    if step.received >= deadline:
        raise _TooSlow(f"{what} was decided {step.received - deadline:.3f}s too late")


async def test_redis_window_slides_in_real_time(redis_store: RedisStore) -> None:
    # Redis decides with its own TIME, which no test can move: on a machine that
    # stalls for most of a window, a step can land after the moment it probes.
    # Such a run is staged again with a fresh session, never passed unchecked,
    # so every assertion below holds on the run that counts.
    stalls = []
    for attempt in range(3):
        try:
            await _window_slides(redis_store, f"real-time-{attempt}")
        except _TooSlow as exc:
            stalls.append(str(exc))
        else:
            return
    pytest.fail(f"the machine stalled for most of a window three times: {stalls}")


async def _window_slides(redis_store: RedisStore, name: str) -> None:
    window = 2.0
    record = SessionRecord(f"hash-{name}", f"cksess_{name}", "u", int(time.time()) + 600, 3)
    await redis_store.register(record)
    ask = _ask(record)

    first = await _timed(redis_store, ask)
    await wall_clock_reach(first.received + 0.5)
    later = [await _timed(redis_store, ask) for _ in range(2)]
    assert all(t.decision.admitted for t in [first, *later])

    def refused_until_it_leaves(oldest: Timed, probe: Timed) -> int:
        """``probe`` was refused, told to wait until ``oldest`` leaves the window."""
        assert probe.decision.outcome is Outcome.RATE_LIMITED
        assert probe.decision.session is not None
        # Redis stamped ``oldest`` within [sent, received] and decided ``probe``
        # within its own interval: the wait it reports must lie between these.
        low = (oldest.sent + window - probe.received) * 1000 - 2
        high = (oldest.received + window - probe.sent) * 1000 + 2
        assert low <= probe.decision.session.wait_ms <= high
        return probe.decision.session.wait_ms

    # The 4th request is refused, told to wait until the first one leaves.
    refused = await _timed(redis_store, ask)
    _in_time(refused, first.sent + window, "the 4th request")
    wait_ms = refused_until_it_leaves(first, refused)

    # Half-way through that wait it is still refused, with a shorter wait.
    await wall_clock_reach(refused.received + wait_ms / 2000)
    midway = await _timed(redis_store, ask)
    _in_time(midway, first.sent + window, "the request half-way through the wait")
    assert refused_until_it_leaves(first, midway) < wait_ms

    # Once the first admission has certainly left, exactly one more is admitted:
    # the two later admissions are still in the window (a slide, not a reset).
    await wall_clock_reach(first.received + window + 0.02)
    resumed = await _timed(redis_store, ask)
    full = await _timed(redis_store, ask)
    _in_time(full, later[0].sent + window, "the request after the slide")
    assert resumed.decision.admitted
    assert resumed.decision.session is not None
    assert resumed.decision.session.remaining == 0
    refused_until_it_leaves(later[0], full)
