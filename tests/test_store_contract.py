"""One contract for every store: the embedded one and Redis behave the same.

Each test below runs unchanged against :class:`MemoryStore` (with a clock the
test moves) and :class:`RedisStore` (against a real ``redis-server``). Redis
decides with its own ``TIME``, which no test can move, so where time must pass
the Redis variant uses a short window and real time: ``backend.reach(t)``
advances the embedded clock to ``t``, and for Redis waits until the wall clock
(the same clock Redis reads on this machine) has passed ``t``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio

from gateway.auth import SecretHasher, split_tag
from gateway.errors import StoreUnavailable
from gateway.model.budgets import BudgetDecision, BudgetKey, BudgetLimit, Charge, Reservation
from gateway.ratelimit import Decision, Identity, Outcome
from gateway.registry import session_from_response
from gateway.store.base import AdmitRequest, IssuedSession, ModelGrant, SessionRecord, Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore, connect
from tests.doubles import FakeClock
from tests.harness import (
    RedisServer,
    collecting,
    eventually,
    redis_key_contents,
    wall_clock_reach,
)

HASHER = SecretHasher(b"contract-pepper")


@dataclass
class Backend:
    """A store factory plus the means to let time pass for it."""

    name: str
    make_store: Callable[[int], Store]
    now: Callable[[], float]
    reach: Callable[[float], Awaitable[None]]
    stores: list[Store] = field(default_factory=list)

    def store(self, *, window_seconds: int = 60) -> Store:
        store = self.make_store(window_seconds)
        self.stores.append(store)
        return store


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()

        async def reach(when: float) -> None:
            clock.set(when)

        kit = Backend(
            "memory", lambda window: MemoryStore(window_seconds=window, clock=clock), clock, reach
        )
    else:
        url: str = request.getfixturevalue("redis_url")
        kit = Backend(
            "redis",
            lambda window: RedisStore(
                connect(url, cluster=False, timeout=5.0), window_seconds=window, pubsub_url=url
            ),
            time.time,
            wall_clock_reach,
        )
    try:
        yield kit
    finally:
        for store in kit.stores:
            await store.close()


def _record(
    backend: Backend,
    *,
    limit: int = 10,
    user: str = "user_alice",
    ttl: float = 600,
    session_id: str | None = None,
) -> SessionRecord:
    return SessionRecord(
        secret_hash=HASHER(secrets.token_urlsafe(24).encode()),
        session_id=session_id or f"cksess_{secrets.token_hex(8)}",
        user=user,
        expires_at=int(backend.now() + ttl),
        limit=limit,
    )


def _ask(
    secret_hash: str,
    *,
    allow_unknown: bool = False,
    default_limit: int = 10,
    user_limit: int | None = None,
) -> AdmitRequest:
    return AdmitRequest(secret_hash, allow_unknown, default_limit, user_limit)


def _windows_left(decision: Decision) -> tuple[int, int, int]:
    """What the session's limit, the per-user cap and the class window each
    have left after ``decision``; a turn must have been counted in all three."""
    assert decision.session is not None
    assert decision.user is not None
    assert decision.class_window is not None
    return (
        decision.session.remaining,
        decision.user.remaining,
        decision.class_window.window.remaining,
    )


async def _admit_many(store: Store, request: AdmitRequest, count: int) -> list[Decision]:
    return [await store.admit(request) for _ in range(count)]


# -- admission -------------------------------------------------------------------


async def test_registered_session_is_admitted_exactly_its_limit(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend, limit=5)
    assert await store.register(record) is False

    decisions = await _admit_many(store, _ask(record.secret_hash), 5)
    assert [d.outcome for d in decisions] == [Outcome.ADMITTED] * 5
    assert [d.session.remaining for d in decisions if d.session] == [4, 3, 2, 1, 0]
    assert all(d.session and d.session.limit == 5 for d in decisions)
    assert all(d.user is None for d in decisions)  # no user limit configured

    refused = await store.admit(_ask(record.secret_hash))
    assert refused.outcome is Outcome.RATE_LIMITED
    assert refused.session is not None
    assert refused.session.limit == 5
    assert refused.session.remaining == 0
    # All five were admitted just now: the oldest leaves in (almost) a full window.
    assert 50_000 <= refused.session.wait_ms <= 60_000


async def test_concurrent_admissions_never_exceed_the_limit(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend, limit=10)
    await store.register(record)
    decisions = await asyncio.gather(*(store.admit(_ask(record.secret_hash)) for _ in range(60)))
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 10
    # Each admission saw a different count: the check and the update are atomic.
    assert sorted(d.session.remaining for d in admitted if d.session) == list(range(10))
    assert {d.outcome for d in decisions if not d.admitted} == {Outcome.RATE_LIMITED}


async def test_rejected_requests_consume_no_quota(backend: Backend) -> None:
    window = 2
    store = backend.store(window_seconds=window)
    record = _record(backend, limit=3)
    await store.register(record)
    ask = _ask(record.secret_hash)
    assert all(d.admitted for d in await _admit_many(store, ask, 3))

    # Half a window later, hammer the full window: every request is refused.
    await backend.reach(backend.now() + window / 2)
    refused = await _admit_many(store, ask, 10)
    assert {d.outcome for d in refused} == {Outcome.RATE_LIMITED}
    last = refused[-1].session
    assert last is not None

    # When the three admissions leave, the window is empty again: had the
    # refusals counted, they would fill it for another half window.
    await backend.reach(
        backend.now() + last.wait_ms / 1000 + (0.15 if backend.name == "redis" else 0)
    )
    again = await _admit_many(store, ask, 4)
    assert [d.outcome for d in again] == [Outcome.ADMITTED] * 3 + [Outcome.RATE_LIMITED]


@pytest.mark.parametrize(
    ("ttl", "outcome"),
    [
        (600, Outcome.ADMITTED),  # in its lifetime
        (-1, Outcome.EXPIRED),  # expires_at has passed
        (-3000, Outcome.EXPIRED),  # long gone, but still remembered as expired
    ],
)
async def test_expiry_is_checked_on_admission(
    backend: Backend, ttl: float, outcome: Outcome
) -> None:
    store = backend.store()
    record = _record(backend, ttl=ttl)
    await store.register(record)
    assert (await store.admit(_ask(record.secret_hash))).outcome is outcome


async def test_session_expires_while_in_use(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend, ttl=1.5)  # expires_at is whole seconds: 0.5 to 1.5 s away
    await store.register(record)
    assert (await store.admit(_ask(record.secret_hash))).admitted
    await backend.reach(record.expires_at + 0.01)
    decision = await store.admit(_ask(record.secret_hash))
    assert decision.outcome is Outcome.EXPIRED
    assert decision.session is None


async def test_revoked_secret_is_refused(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    assert (await store.admit(_ask(record.secret_hash))).admitted
    await store.revoke(secret_hash=record.secret_hash, session_id=None, reason="test", replica="r1")
    decision = await store.admit(_ask(record.secret_hash, allow_unknown=True))
    assert decision.outcome is Outcome.REVOKED
    assert decision.session is None


async def test_revocation_wins_over_expiry(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend, ttl=-5)
    await store.register(record)
    await store.revoke(secret_hash=None, session_id=record.session_id, reason="test", replica="r1")
    assert (await store.admit(_ask(record.secret_hash))).outcome is Outcome.REVOKED


@pytest.mark.parametrize(
    "allow_unknown",
    [
        False,  # GATEWAY_UNKNOWN_SECRETS=reject
        True,  # allow: but a revoked unknown secret is still revoked (next test)
    ],
)
async def test_unknown_secret(backend: Backend, allow_unknown: bool) -> None:
    store = backend.store()
    decision = await store.admit(_ask(HASHER(b"never-registered"), allow_unknown=allow_unknown))
    assert decision.outcome is (Outcome.ADMITTED if allow_unknown else Outcome.UNKNOWN)


async def test_allowed_unknown_secrets_get_the_default_limit_per_hash(backend: Backend) -> None:
    store = backend.store()
    first, second = HASHER(b"unknown-one"), HASHER(b"unknown-two")
    decisions = await _admit_many(store, _ask(first, allow_unknown=True, default_limit=3), 4)
    assert [d.outcome for d in decisions] == [Outcome.ADMITTED] * 3 + [Outcome.RATE_LIMITED]
    assert all(d.session and d.session.limit == 3 for d in decisions)
    # Another unknown secret has a window of its own.
    other = await store.admit(_ask(second, allow_unknown=True, default_limit=3))
    assert other.admitted
    assert other.session is not None
    assert other.session.remaining == 2
    # A revoked unknown secret stays refused even when unknown ones are allowed.
    await store.revoke(secret_hash=second, session_id=None, reason="test", replica="r1")
    assert (await store.admit(_ask(second, allow_unknown=True))).outcome is Outcome.REVOKED


async def test_user_limit_spans_the_users_sessions(backend: Backend) -> None:
    store = backend.store()
    one, two = _record(backend, limit=10), _record(backend, limit=10)
    stranger = _record(backend, limit=10, user="user_bob")
    for record in (one, two, stranger):
        await store.register(record)

    outcomes = []
    for index in range(8):
        record = (one, two)[index % 2]
        outcomes.append(await store.admit(_ask(record.secret_hash, user_limit=3)))
    assert [d.outcome for d in outcomes] == [Outcome.ADMITTED] * 3 + [Outcome.USER_RATE_LIMITED] * 5
    assert [d.user.remaining for d in outcomes[:3] if d.user] == [2, 1, 0]
    refused = outcomes[-1]
    assert refused.user is not None
    assert refused.user.limit == 3
    assert refused.user.remaining == 0
    assert 0 < refused.user.wait_ms <= 60_000
    # The session windows hold only what was admitted: one got 2, two got 1.
    assert refused.session is not None
    assert refused.session.remaining == 10 - 1  # the last request was session two's

    # Another user is not affected.
    assert (await store.admit(_ask(stranger.secret_hash, user_limit=3))).admitted
    # Without a user limit, the sessions' own limits apply again.
    assert (await store.admit(_ask(two.secret_hash))).admitted


async def test_user_limited_requests_consume_no_session_quota(backend: Backend) -> None:
    store = backend.store()
    one, two = _record(backend, limit=4), _record(backend, limit=4)
    await store.register(one)
    await store.register(two)
    await _admit_many(store, _ask(one.secret_hash, user_limit=2), 2)
    refused = await _admit_many(store, _ask(two.secret_hash, user_limit=2), 6)
    assert {d.outcome for d in refused} == {Outcome.USER_RATE_LIMITED}
    info = await store.lookup(two.session_id)
    assert info is not None
    assert info.remaining == 4


# -- revocation -------------------------------------------------------------------


async def test_revoke_by_session_id_resolves_the_secret(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    assert await store.secret_hash_for(record.session_id) == record.secret_hash
    result = await store.revoke(
        secret_hash=None, session_id=record.session_id, reason="cancel", replica="r1"
    )
    assert result.secret_hash == record.secret_hash
    assert result.session_id == record.session_id
    assert result.already_revoked is False
    assert (await store.admit(_ask(record.secret_hash))).outcome is Outcome.REVOKED


async def test_revoke_by_secret_names_the_session(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    result = await store.revoke(
        secret_hash=record.secret_hash, session_id=None, reason="admin", replica="r1"
    )
    assert result.session_id == record.session_id
    assert result.already_revoked is False


@pytest.mark.parametrize(
    "by",
    [
        "session_id",  # a cancel repeated by the SDK's retry
        "secret_hash",  # an operator revoking the same secret twice
        "both",
    ],
)
async def test_revoke_is_idempotent(backend: Backend, by: str) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    kwargs = {
        "secret_hash": record.secret_hash if by != "session_id" else None,
        "session_id": record.session_id if by != "secret_hash" else None,
    }
    first = await store.revoke(**kwargs, reason="cancel", replica="r1")
    second = await store.revoke(**kwargs, reason="cancel", replica="r2")
    assert (first.already_revoked, second.already_revoked) == (False, True)
    assert first.secret_hash == second.secret_hash == record.secret_hash
    assert (await store.admit(_ask(record.secret_hash))).outcome is Outcome.REVOKED


async def test_session_cancelled_before_registration_is_born_revoked(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend)
    # The cancel's success arrived before the create response was learned.
    early = await store.revoke(
        secret_hash=None, session_id=record.session_id, reason="cancel", replica="r1"
    )
    assert early.secret_hash is None
    assert early.session_id == record.session_id
    assert early.already_revoked is False
    assert await store.register(record) is True
    assert (await store.admit(_ask(record.secret_hash))).outcome is Outcome.REVOKED
    info = await store.lookup(record.session_id)
    assert info is not None
    assert info.status == "revoked"


async def test_revoking_an_unseen_session_is_recorded(backend: Backend) -> None:
    store = backend.store()
    result = await store.revoke(
        secret_hash=None, session_id="cksess_never_seen", reason="cancel", replica="r1"
    )
    assert result.secret_hash is None
    info = await store.lookup("cksess_never_seen")
    assert info is not None
    assert info.status == "revoked"
    assert info.limit is None


# -- lookup and audit ---------------------------------------------------------------


async def test_lookup_reports_status_and_remaining_quota(backend: Backend) -> None:
    store = backend.store()
    active = _record(backend, limit=5, user="user_carol")
    expired = _record(backend, ttl=-10)
    revoked = _record(backend)
    for record in (active, expired, revoked):
        await store.register(record)
    await _admit_many(store, _ask(active.secret_hash), 2)
    await store.revoke(secret_hash=revoked.secret_hash, session_id=None, reason="t", replica="r")

    info = await store.lookup(active.session_id)
    assert info is not None
    assert (info.status, info.user, info.limit, info.remaining, info.expires_at) == (
        "active",
        "user_carol",
        5,
        3,
        active.expires_at,
    )
    assert info.secret_hash_prefix == active.secret_hash[:12]
    assert len(info.secret_hash_prefix) < len(active.secret_hash)  # a prefix, not the hash

    for record, status in ((expired, "expired"), (revoked, "revoked")):
        found = await store.lookup(record.session_id)
        assert found is not None
        assert found.status == status
        assert found.limit == record.limit
    assert await store.lookup("cksess_unknown") is None


async def test_audit_tail_is_newest_entries_oldest_first(backend: Backend) -> None:
    store = backend.store()
    records = [_record(backend) for _ in range(3)]
    for record in records:
        await store.register(record)
    for index, record in enumerate(records):
        await store.revoke(
            secret_hash=None,
            session_id=record.session_id,
            reason=f"r{index}",
            replica=f"rep{index}",
        )
    tail = await store.audit_tail(2)
    assert [e.reason for e in tail] == ["r1", "r2"]
    everything = await store.audit_tail(10)
    assert [e.session_id for e in everything] == [r.session_id for r in records]
    assert [e.replica for e in everything] == ["rep0", "rep1", "rep2"]
    assert [e.secret_hash_prefix for e in everything] == [r.secret_hash[:12] for r in records]
    assert len({e.id for e in everything}) == 3
    assert all(abs(e.at - backend.now()) < 60 for e in everything)
    assert await store.audit_tail(0) == []


async def test_revocations_stream_delivers_revoked_hashes(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    async with collecting(store.revocations()) as heard:

        async def revoked_and_heard() -> bool:
            await store.revoke(
                secret_hash=None, session_id=record.session_id, reason="t", replica="r"
            )
            return any(item is not None for item in heard)  # None: (re)subscribed

        # The subscription is established in the background, and pub/sub does
        # not replay: revoke (idempotently) until the listener hears one.
        await eventually(revoked_and_heard, timeout=10, interval=0.2, what="an announcement")
        assert next(item for item in heard if item is not None) == record.secret_hash


# -- issuer mode: sessions the gateway issued itself ----------------------------------


def _issued(backend: Backend, *, workflow_version: str = "3") -> SessionRecord:
    session_id = f"cksess_{secrets.token_hex(8)}"
    expires_at = int(backend.now() + 600)
    document = json.dumps(
        {"id": session_id, "object": "chatkit.session", "expires_at": expires_at}
    ).encode()
    return SessionRecord(
        secret_hash=HASHER(secrets.token_urlsafe(24).encode()),
        session_id=session_id,
        user="user_émile",  # not ASCII: the identity carries it as text
        expires_at=expires_at,
        limit=10,
        workflow_id="wf_support",
        workflow_version=workflow_version,
        document=document,
        issued=True,
    )


async def test_issued_session_is_found_by_its_id_with_its_document(backend: Backend) -> None:
    store = backend.store()
    record = _issued(backend)
    await store.register(record)
    assert await store.issued_session(record.session_id) == IssuedSession(
        document=record.document,
        secret_hash=record.secret_hash,
        expires_at=record.expires_at,
        revoked=False,
    )


async def test_only_issued_sessions_are_found_as_issued(backend: Backend) -> None:
    store = backend.store()
    learned = _record(backend)
    await store.register(learned)
    assert await store.issued_session(learned.session_id) is None  # learned, not issued
    assert await store.issued_session("cksess_never_seen") is None


@pytest.mark.parametrize("by", ["session_id", "secret_hash"])
async def test_issued_session_reports_its_revocation(backend: Backend, by: str) -> None:
    store = backend.store()
    record = _issued(backend)
    await store.register(record)
    await store.revoke(
        secret_hash=record.secret_hash if by == "secret_hash" else None,
        session_id=record.session_id if by == "session_id" else None,
        reason="cancel",
        replica="r1",
    )
    found = await store.issued_session(record.session_id)
    assert found is not None
    assert found.revoked is True
    assert found.document == record.document  # still answerable after a cancel


@pytest.mark.parametrize(
    "user_limit",
    [
        None,  # the short reply: no user window
        5,  # the full reply: both windows
    ],
)
async def test_admission_names_the_issued_sessions_identity(
    backend: Backend, user_limit: int | None
) -> None:
    store = backend.store()
    record = _issued(backend)
    await store.register(record)
    decision = await store.admit(_ask(record.secret_hash, user_limit=user_limit))
    assert decision.admitted
    assert decision.identity == Identity(
        session_id=record.session_id,
        user="user_émile",
        workflow_id="wf_support",
        workflow_version="3",
        expires_at=record.expires_at,
    )
    assert (decision.user is None) is (user_limit is None)


@pytest.mark.parametrize(
    "app",
    [
        "support-app",  # a GATEWAY_ISSUER_KEYS app
        "default",  # GATEWAY_ISSUER_API_KEYS
    ],
)
async def test_admission_names_the_app_that_issued_the_session(backend: Backend, app: str) -> None:
    # Metrics and the access log name the app of each client request, read
    # in the admission's own round trip.
    store = backend.store()
    record = dataclasses.replace(_issued(backend), app=app, limit=1)
    await store.register(record)
    admitted = await store.admit(_ask(record.secret_hash))
    assert admitted.admitted
    assert admitted.identity is not None
    assert admitted.identity.app == app
    refused = await store.admit(_ask(record.secret_hash))
    assert refused.outcome is Outcome.RATE_LIMITED
    assert refused.identity == admitted.identity  # a refusal names it too


async def test_learned_sessions_have_an_identity_without_a_workflow(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend, user="user_bob")
    await store.register(record)
    decision = await store.admit(_ask(record.secret_hash))
    assert decision.identity == Identity(record.session_id, "user_bob", "", "", record.expires_at)
    assert decision.identity.app == ""  # no app created it


async def test_registered_sessions_carry_an_identity_admitted_or_limited(
    backend: Backend,
) -> None:
    # A refusal by a window names the session too: its workflow decides how
    # the refusal is answered (limit_answer) and labels the metrics.
    store = backend.store()
    unknown = await store.admit(_ask(HASHER(b"nobody"), allow_unknown=True))
    assert unknown.admitted
    assert unknown.identity is None  # admitted under the default limit, nobody to name
    record = dataclasses.replace(_issued(backend, workflow_version=""), limit=1)
    await store.register(record)
    admitted = await store.admit(_ask(record.secret_hash))
    assert admitted.identity is not None
    assert admitted.identity.workflow_version == ""  # a workflow without versions
    refused = await store.admit(_ask(record.secret_hash))
    assert refused.outcome is Outcome.RATE_LIMITED
    assert refused.identity == admitted.identity
    await store.revoke(secret_hash=record.secret_hash, session_id=None, reason="t", replica="r")
    assert (await store.admit(_ask(record.secret_hash))).identity is None  # revoked: not read


async def test_redis_ping_reports_an_unreachable_redis_as_store_unavailable() -> None:
    # /readyz and start-up both ask ping() whether the store can decide.
    with RedisServer() as server:
        store = RedisStore(connect(server.url, cluster=False, timeout=1.0), pubsub_url=server.url)
        try:
            await store.ping()
            server.stop()
            with pytest.raises(StoreUnavailable):
                await store.ping()
        finally:
            await store.close()


# -- Redis only: what is at rest ------------------------------------------------------


async def _dump_everything(client: redis.asyncio.Redis) -> dict[bytes, tuple[bytes, int, bytes]]:
    """Every key: (type, TTL in ms, all names and values in it, concatenated)."""
    out = {}
    async for key in client.scan_iter(count=1000):
        kind, contents = await redis_key_contents(client, key)
        out[key] = (kind, await client.pttl(key), contents)
    return out


async def test_redis_holds_no_secret_and_every_key_expires(redis_url: str) -> None:
    secret = f"ek_{secrets.token_urlsafe(32)}"
    body = json.dumps(
        {
            "id": "cksess_at_rest",
            "object": "chatkit.session",
            "client_secret": secret,
            "user": "user_dave",
            "expires_at": int(time.time()) + 600,
            "max_requests_per_1_minute": 3,
        }
    ).encode()
    record = session_from_response(body, hasher=HASHER, default_limit=10)
    store = RedisStore(connect(redis_url, cluster=False, timeout=5.0), pubsub_url=redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.register(record)
        # An issued session keeps its document (without the secret) by id.
        issued = dataclasses.replace(
            record,
            secret_hash=HASHER(b"issued"),
            session_id="cksess_issued_at_rest",
            document=b'{"id": "cksess_issued_at_rest"}',
            workflow_id="wf_x",
            issued=True,
        )
        await store.register(issued)
        for _ in range(4):  # admitted and refused, with a user window too
            await store.admit(_ask(record.secret_hash, user_limit=5))
        await store.admit(_ask(HASHER(b"unknown"), allow_unknown=True))
        await store.revoke(secret_hash=None, session_id=record.session_id, reason="t", replica="r")
        await store.revoke(secret_hash=None, session_id="cksess_unseen", reason="t", replica="r")

        contents = await _dump_everything(client)
    finally:
        await client.aclose()
        await store.close()

    assert b"ckg:{sid:cksess_issued_at_rest}:d" in contents
    kinds = {kind for kind, _, _ in contents.values()}
    assert {b"hash", b"zset", b"string", b"stream"} <= kinds  # the test saw every structure
    for key, (_kind, ttl, values) in contents.items():
        for needle in (secret.encode(), secret[3:].encode()):
            assert needle not in key, key
            assert needle not in values, key
        # The audit stream too: capped by length (XADD MAXLEN) and given the
        # revocation TTL at every append.
        assert ttl > 0, f"{key!r} has no TTL"


# -- model tokens ---------------------------------------------------------------------


def _grant(record: SessionRecord) -> ModelGrant:
    return ModelGrant(
        secret_hash=record.secret_hash,
        session_id=record.session_id,
        user=record.user,
        workflow_id="wf_x",
        request_id="req-1",
        expires_at=record.expires_at,
    )


async def test_a_model_token_lives_until_its_grace_ends(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    token = HASHER(b"ckmt_grace")
    await store.grant_model_token(token, _grant(record))
    assert await store.model_grant(token) == _grant(record)
    assert await store.model_grant(HASHER(b"ckmt_other")) is None
    ended_at = backend.now()
    await store.end_model_token(token, grace_seconds=1)
    assert await store.model_grant(token) == _grant(record)  # within the grace
    await backend.reach(ended_at + 1.2)
    assert await store.model_grant(token) is None


async def test_a_model_token_never_outlives_its_session(backend: Backend) -> None:
    store = backend.store()
    record = _record(backend, ttl=2)
    await store.register(record)
    token = HASHER(b"ckmt_expiry")
    await store.grant_model_token(token, _grant(record))
    await store.end_model_token(token, grace_seconds=3600)  # the grace cannot extend it
    assert await store.model_grant(token) is not None
    await backend.reach(record.expires_at + 0.2)
    assert await store.model_grant(token) is None


@pytest.mark.parametrize("by", ["secret", "session_id"])
async def test_revoking_a_session_ends_its_model_tokens(backend: Backend, by: str) -> None:
    store = backend.store()
    record = _record(backend)
    await store.register(record)
    token = HASHER(f"ckmt_revoke_{by}".encode())
    await store.grant_model_token(token, _grant(record))
    await store.revoke(
        secret_hash=record.secret_hash if by == "secret" else None,
        session_id=record.session_id if by == "session_id" else None,
        reason="test",
        replica="r",
    )
    assert await store.model_grant(token) is None


# -- budgets -----------------------------------------------------------------------------

TOKENS_USER_1D = BudgetLimit("tokens", "user", 86400, 1000)
TOKENS_SESSION_1M = BudgetLimit("tokens", "session", 60, 500)
USD_USER_1D = BudgetLimit("usd", "user", 86400, 2_000_000)  # 2 USD in micro-dollars


def _key(session: str = "cksess_a", user: str = "alice") -> BudgetKey:
    return BudgetKey("wf_budget", user, session)


def _charge(tokens: int, usd: float = 0.0) -> Charge:
    return Charge(tokens // 2, 0, tokens - tokens // 2, usd)


async def _reserve(store: Store, key: BudgetKey, call: str, tokens: int, *limits: BudgetLimit,
                   usd: float = 0.0, lease: int = 600) -> BudgetDecision:  # fmt: skip
    return await store.reserve_budget(
        Reservation(key, call, _charge(tokens, usd), limits, "gpt-5-mini", lease)
    )


async def test_reservations_are_admitted_exactly_as_far_as_they_fit(backend: Backend) -> None:
    store = backend.store()
    key = _key()
    assert (await _reserve(store, key, "c1", 400, TOKENS_USER_1D)).admitted
    assert (await _reserve(store, key, "c2", 400, TOKENS_USER_1D)).admitted
    refused = await _reserve(store, key, "c3", 400, TOKENS_USER_1D)
    # Only calls in flight stand in the way: worth asking again soon.
    assert refused == BudgetDecision(False, 0, 1000)
    # Settled to what it really used, the first call frees the rest of its room.
    await store.settle_budget(key, "c1", _charge(100), model="gpt-5-mini")
    assert (await _reserve(store, key, "c3", 400, TOKENS_USER_1D)).admitted  # 100 + 400 + 400
    assert not (await _reserve(store, key, "c4", 101, TOKENS_USER_1D)).admitted
    assert (await _reserve(store, key, "c4", 100, TOKENS_USER_1D)).admitted  # exactly full


async def test_a_call_that_could_never_fit_gets_no_retry_time(backend: Backend) -> None:
    store = backend.store()
    assert await _reserve(store, _key(), "c1", 1001, TOKENS_USER_1D) == BudgetDecision(
        False, 0, None
    )


async def test_settling_charges_once_and_is_kept_for_reports(backend: Backend) -> None:
    store = backend.store()
    key = _key()
    await _reserve(store, key, "c1", 400, TOKENS_USER_1D)
    charge = Charge(300, 100, 50, 123.5)
    await store.settle_budget(key, "c1", charge, model="gpt-5-mini")
    await store.settle_budget(key, "c1", charge, model="gpt-5-mini")  # a retry
    [record] = await store.budget_charges("wf_budget", "alice")
    assert (record.session_id, record.model, record.charge) == ("cksess_a", "gpt-5-mini", charge)
    assert await store.budget_charges("wf_other", "alice") == []


async def test_a_spent_budget_refuses_a_turn_until_usage_leaves_the_window(
    backend: Backend,
) -> None:
    store = backend.store()
    key = _key()
    assert (await store.budget_room(key, (TOKENS_SESSION_1M,))).admitted
    await _reserve(store, key, "c1", 500, TOKENS_SESSION_1M)
    await store.settle_budget(key, "c1", _charge(500), model="m")
    room = await store.budget_room(key, (TOKENS_SESSION_1M,))
    assert not room.admitted
    assert room.retry_after_ms is not None
    assert 50_000 < room.retry_after_ms <= 60_000  # when the charge leaves the 1m window
    # Another session of the same user has its own session budget.
    assert (await store.budget_room(_key("cksess_b"), (TOKENS_SESSION_1M,))).admitted
    # ... but not its own user budget, which the first session's charge counts in.
    assert not (
        await store.budget_room(
            _key("cksess_b"), (BudgetLimit("tokens", "user", 3600, 500), TOKENS_SESSION_1M)
        )
    ).admitted


async def test_dollar_budgets_count_micro_dollars(backend: Backend) -> None:
    store = backend.store()
    key = _key()
    assert (await _reserve(store, key, "c1", 10, USD_USER_1D, usd=1_500_000)).admitted
    assert not (await _reserve(store, key, "c2", 10, USD_USER_1D, usd=600_000)).admitted
    await store.settle_budget(key, "c1", _charge(10, 1_000_000.0), model="m")
    assert (await _reserve(store, key, "c2", 10, USD_USER_1D, usd=1_000_000)).admitted


async def test_a_lease_that_ends_unsettled_is_charged_its_reservation(backend: Backend) -> None:
    store = backend.store()
    key = _key()
    start = backend.now()
    await _reserve(store, key, "c1", 400, TOKENS_USER_1D, lease=1)
    await backend.reach(start + 1.3)
    # The next call finds the lease ended: charged, and no longer in flight.
    assert (await _reserve(store, key, "c2", 600, TOKENS_USER_1D)).admitted
    [record] = await store.budget_charges("wf_budget", "alice")
    assert record.charge.tokens == 400
    await store.settle_budget(key, "c1", _charge(5), model="m")  # too late: charged once
    assert len(await store.budget_charges("wf_budget", "alice")) == 1


async def test_budget_windows_slide(backend: Backend) -> None:
    if backend.name == "redis":
        pytest.skip("a minute of real time; the script's window arithmetic is shared above")
    store = backend.store()
    key = _key()
    await _reserve(store, key, "c1", 500, TOKENS_SESSION_1M)
    await store.settle_budget(key, "c1", _charge(500), model="m")
    room = await store.budget_room(key, (TOKENS_SESSION_1M,))
    assert room.retry_after_ms == 60_000
    await backend.reach(backend.now() + 60)
    assert (await store.budget_room(key, (TOKENS_SESSION_1M,))).admitted


# -- request classes and their windows (a workflow's policy) ---------------------


def _policed(
    backend: Backend,
    *,
    user: str = "user_alice",
    limit: int = 2,
    counts: str = "turn",
    windows: dict[str, str] | None = None,
) -> SessionRecord:
    """An issued session with class windows, its secret tagged with its user's slot."""
    secret = f"ek_{HASHER.user_tag(user)}_{secrets.token_urlsafe(24)}"
    return dataclasses.replace(
        _record(backend, limit=limit, user=user),
        secret_hash=HASHER(secret.encode()),
        issued=True,
        counts=counts,
        windows=windows or {},
    )


def _class(secret_hash: str, cls: str) -> AdmitRequest:
    return AdmitRequest(secret_hash, False, 10, None, cls)


async def test_reads_do_not_consume_turns_and_have_their_own_window(backend: Backend) -> None:
    store = backend.store()
    record = _policed(backend, limit=2, windows={"read": "s60:3"})
    await store.register(record)
    reads = await _admit_many(store, _class(record.secret_hash, "read"), 4)
    assert [d.outcome for d in reads] == [Outcome.ADMITTED] * 3 + [Outcome.CLASS_RATE_LIMITED]
    assert all(d.session is None for d in reads)  # the session limit counts turns only
    assert [d.class_window.window.remaining for d in reads if d.class_window] == [2, 1, 0, 0]
    refused = reads[-1].class_window
    assert refused is not None
    assert (refused.cls, refused.scope, refused.seconds, refused.name) == (
        "read",
        "session",
        60,
        "read-session-1m",
    )
    turns = await _admit_many(store, _class(record.secret_hash, "turn"), 3)
    assert [d.outcome for d in turns] == [Outcome.ADMITTED] * 2 + [Outcome.RATE_LIMITED]
    assert turns[0].session is not None
    assert turns[0].session.remaining == 1


async def test_session_limit_counting_all_counts_every_class(backend: Backend) -> None:
    store = backend.store()
    record = _policed(backend, limit=2, counts="all", windows={"read": "s60:5"})
    await store.register(record)
    read = await store.admit(_class(record.secret_hash, "read"))
    turn = await store.admit(_class(record.secret_hash, "turn"))
    refused = await store.admit(_class(record.secret_hash, "read"))
    assert (read.outcome, turn.outcome) == (Outcome.ADMITTED, Outcome.ADMITTED)
    assert refused.outcome is Outcome.RATE_LIMITED  # the session's own limit, 2 of any class
    assert refused.class_window is not None
    assert refused.class_window.window.remaining == 4


async def test_a_users_window_spans_the_users_sessions(backend: Backend) -> None:
    store = backend.store()
    windows = {"turn": "u86400:3"}
    first, second = (_policed(backend, limit=10, windows=windows) for _ in range(2))
    other = _policed(backend, user="user_bob", limit=10, windows=windows)
    for record in (first, second, other):
        await store.register(record)
    outcomes = [
        (await store.admit(_class(record.secret_hash, "turn"))).outcome
        for record in (first, second, first, second)
    ]
    assert outcomes == [Outcome.ADMITTED] * 3 + [Outcome.CLASS_RATE_LIMITED]
    refused = await store.admit(_class(first.secret_hash, "turn"))
    assert refused.class_window is not None
    assert refused.class_window.name == "turn-user-1d"
    assert 86_000_000 < refused.class_window.window.wait_ms <= 86_400_000
    # The refusals took nothing from the sessions' own limits, nor from another user.
    assert (await store.admit(_class(other.secret_hash, "turn"))).admitted
    lookup = await store.lookup(second.session_id)
    assert lookup is not None
    assert lookup.remaining == 9


async def test_a_refusal_reports_the_longest_wait_of_the_windows_that_refuse(
    backend: Backend,
) -> None:
    store = backend.store()
    record = _policed(backend, windows={"read": "s60:1,s3600:1"})
    await store.register(record)
    assert (await store.admit(_class(record.secret_hash, "read"))).admitted
    refused = await store.admit(_class(record.secret_hash, "read"))
    assert refused.outcome is Outcome.CLASS_RATE_LIMITED
    assert refused.class_window is not None
    assert refused.class_window.seconds == 3600  # the hour, not the minute, is the real wait
    assert refused.class_window.window.wait_ms > 3_500_000


async def test_a_class_limit_is_exact_under_concurrency(backend: Backend) -> None:
    store = backend.store()
    record = _policed(backend, windows={"upload": "s60:5,u3600:7"})
    await store.register(record)
    decisions = await asyncio.gather(
        *(store.admit(_class(record.secret_hash, "upload")) for _ in range(20))
    )
    assert sum(d.admitted for d in decisions) == 5


async def test_class_windows_slide(backend: Backend) -> None:
    store = backend.store()
    record = _policed(backend, windows={"write": "s60:1"})
    await store.register(record)
    start = backend.now()
    assert (await store.admit(_class(record.secret_hash, "write"))).admitted
    assert not (await store.admit(_class(record.secret_hash, "write"))).admitted
    if backend.name == "redis":
        return  # a minute of real time is too long for a test; the memory clock moves
    await backend.reach(start + 61)
    assert (await store.admit(_class(record.secret_hash, "write"))).admitted


async def test_a_forged_slot_tag_is_an_unknown_secret(backend: Backend) -> None:
    store = backend.store()
    secret = f"ek_{HASHER.user_tag('user_alice')}_{secrets.token_urlsafe(24)}"
    record = dataclasses.replace(_record(backend), secret_hash=HASHER(secret.encode()))
    await store.register(record)
    forged = "ek_" + ("0000" if secret[3:7] != "0000" else "ffff") + secret[7:]
    decision = await store.admit(_ask(HASHER(forged.encode())))
    assert decision.outcome is Outcome.UNKNOWN
    assert (await store.admit(_ask(record.secret_hash))).admitted


async def test_redis_budget_sums_let_a_charge_leave_its_window(redis_url: str) -> None:
    """The running sums subtract a charge when it leaves a window. A minute of
    real time is too long for a test, so the charge is moved 59.5 s back in
    the charges set: what the script sees is then a charge about to leave."""
    store = RedisStore(connect(redis_url, cluster=False, timeout=5.0), pubsub_url=redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        key = _key()
        hour = BudgetLimit("tokens", "session", 3600, 500)
        await _reserve(store, key, "c1", 500, TOKENS_SESSION_1M)
        await store.settle_budget(key, "c1", _charge(500), model="m")
        assert not (await store.budget_room(key, (TOKENS_SESSION_1M,))).admitted
        charges_key = store.keys.budget("wf_budget", "alice")[0]
        [member] = await client.zrange(charges_key, 0, -1)
        assert isinstance(member, bytes)
        leaves_at = time.time() + 0.5
        await client.zadd(charges_key, {member: int((leaves_at - 60) * 1_000_000)}, xx=True)
        assert not (await store.budget_room(key, (TOKENS_SESSION_1M,))).admitted
        await wall_clock_reach(leaves_at + 0.05)
        assert (await store.budget_room(key, (TOKENS_SESSION_1M,))).admitted
        assert not (await store.budget_room(key, (hour,))).admitted  # still in the hour
        # And a second session of the user was never charged in either.
        assert (await store.budget_room(_key("cksess_b"), (hour,))).admitted
    finally:
        await client.aclose()
        await store.close()


async def test_a_turns_calls_are_found_by_their_ids_and_its_usage_audited(
    backend: Backend,
) -> None:
    store = backend.store()
    key = _key()
    await _reserve(store, key, "req-1.a", 10, TOKENS_USER_1D)
    await _reserve(store, key, "req-1.b", 10, TOKENS_USER_1D)
    assert sorted(await store.calls_in_flight("wf_budget", "alice")) == ["req-1.a", "req-1.b"]
    await store.settle_budget(key, "req-1.a", _charge(10), model="m")
    assert await store.calls_in_flight("wf_budget", "alice") == ["req-1.b"]
    [record] = await store.budget_charges("wf_budget", "alice")
    assert record.call_id == "req-1.a"
    usage = {"calls": 1.0, "input_tokens": 5.0, "output_tokens": 5.0, "usd": 0.25}
    await store.audit_usage(session_id="cksess_a", replica="r1", usage=usage)
    [entry] = await store.audit_tail(1)
    assert (entry.reason, entry.session_id, entry.replica, entry.usage) == (
        "model_usage",
        "cksess_a",
        "r1",
        usage,
    )


# -- the session's chatkit_configuration -------------------------------------------


def _need(secret_hash: str, cls: str, need: str, declared: int = 0) -> AdmitRequest:
    return AdmitRequest(secret_hash, False, 10, None, cls, need, declared)


async def test_the_configuration_refuses_before_any_window_counts(backend: Backend) -> None:
    store = backend.store()
    record = dataclasses.replace(
        _policed(backend, windows={"read": "s60:5", "upload": "s60:5"}),
        history=False,
        uploads=False,
    )
    await store.register(record)
    refused = [
        await store.admit(_need(record.secret_hash, "read", "history")),
        await store.admit(_need(record.secret_hash, "upload", "attach", 10)),
        await store.admit(_need(record.secret_hash, "upload", "upload")),
    ]
    assert [d.outcome for d in refused] == [
        Outcome.HISTORY_DISABLED,
        Outcome.UPLOADS_DISABLED,
        Outcome.UPLOADS_DISABLED,
    ]
    read = await store.admit(_need(record.secret_hash, "read", ""))  # threads.get_by_id
    assert read.class_window is not None
    assert read.class_window.window.remaining == 4  # the refusals took nothing


async def test_declared_sizes_and_the_number_of_files_are_bounded(backend: Backend) -> None:
    store = backend.store()
    record = dataclasses.replace(
        _policed(backend), max_file_bytes=1000, max_files=2, configuration='{"x":1}'
    )
    await store.register(record)
    too_large = await store.admit(_need(record.secret_hash, "upload", "attach", 1001))
    assert too_large.outcome is Outcome.FILE_TOO_LARGE
    decisions = await asyncio.gather(
        *(store.admit(_need(record.secret_hash, "upload", "attach", 1000)) for _ in range(5))
    )
    assert (
        sorted(d.outcome for d in decisions)
        == [Outcome.ADMITTED] * 2 + [Outcome.TOO_MANY_FILES] * 3
    )
    # File bytes are no new file; the identity tells the proxy where to cut them.
    upload = await store.admit(_need(record.secret_hash, "upload", "upload"))
    assert upload.admitted
    assert upload.identity is not None
    assert (upload.identity.max_file_bytes, upload.identity.configuration) == (1000, '{"x":1}')


async def test_an_operators_count_of_a_class_window_slides_and_prunes_nothing(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    store = backend.store()
    # A one-second window (the spec allows any length; the policy names 1m, 1h, 1d).
    record = _policed(backend, windows={"read": "s1:5"})
    await store.register(record)
    for _ in range(2):
        assert (await store.admit(_class(record.secret_hash, "read"))).admitted
    admitted_by = backend.now()
    if backend.name == "redis":
        # A member a minute old, which admission would prune: the view counts
        # past it and leaves it where it is.
        assert isinstance(store, RedisStore)
        window = f"{store.keys.secret(record.secret_hash).window}:read:1"
        raw = redis.asyncio.from_url(request.getfixturevalue("redis_url"))
        try:
            await raw.zadd(window, {"old": int((time.time() - 60) * 1_000_000)})
            found = await store.class_windows([record.secret_hash])
            assert await raw.zcard(window) == 3
        finally:
            await raw.aclose()
    else:
        found = await store.class_windows([record.secret_hash])
    assert [(w.used, w.remaining) for w in found[record.secret_hash].windows] == [(2, 3)]
    await backend.reach(admitted_by + 1.05)
    found = await store.class_windows([record.secret_hash])
    assert [(w.used, w.remaining) for w in found[record.secret_hash].windows] == [(0, 5)]


async def test_a_refused_model_counts_in_no_window(backend: Backend) -> None:
    """The allow-list is decided in the admission step, before any window:
    after K refused models the session still has all N of its turns."""
    store = backend.store()
    record = dataclasses.replace(
        _policed(backend, user="user_models", limit=3, windows={"turn": "s60:3,u86400:3"}),
        models=("gpt-allowed", "gpt-other"),
    )
    await store.register(record)

    def turn(model: str | None) -> AdmitRequest:
        # The session's limit, the per-user cap, and the class's session and
        # user windows: every window a turn counts in, each allowing 3.
        return AdmitRequest(record.secret_hash, False, 10, 3, "turn", model=model)

    # Exact names only: no case folding, no trimming, no list smuggled in a name.
    names = ["gpt-dear", "", "GPT-ALLOWED", "gpt-allowed ", "gpt-allowed\ngpt-other", "mdl"]
    refused = await asyncio.gather(*(store.admit(turn(name)) for name in names))
    assert [d.outcome for d in refused] == [Outcome.MODEL_NOT_ALLOWED] * len(names)
    assert all(d.identity is None for d in refused)
    turns = [await store.admit(turn(m)) for m in ("gpt-allowed", None, "gpt-other", "gpt-allowed")]
    assert [d.admitted for d in turns] == [True, True, True, False]
    # Each window counted the admitted turn only.
    assert _windows_left(turns[0]) == (2, 2, 2)
    assert turns[3].outcome in (
        Outcome.RATE_LIMITED,
        Outcome.USER_RATE_LIMITED,
        Outcome.CLASS_RATE_LIMITED,
    )
    # A read names no model; a session whose workflow lists none takes any.
    assert (await store.admit(_class(record.secret_hash, "read"))).admitted
    free = _policed(backend, user="user_free")
    await store.register(free)
    assert (
        await store.admit(AdmitRequest(free.secret_hash, False, 10, None, "turn", model="x"))
    ).admitted


async def test_an_undone_admission_counts_in_no_window(backend: Backend) -> None:
    """A turn admitted and then refused by the gateway (its budget is spent)
    is undone: after K of them the session still has all N of its turns, in
    the session's limit, the per-user cap and both class windows."""
    store = backend.store()
    record = _policed(backend, user="user_undo", limit=3, windows={"turn": "s60:3,u86400:3"})
    await store.register(record)
    turn = AdmitRequest(record.secret_hash, False, 10, 3, "turn")
    for _ in range(5):
        decision = await store.admit(turn)
        assert decision.admitted
        assert decision.member
        await store.unadmit(turn, decision.member)
        await store.unadmit(turn, decision.member)  # idempotent: nothing more goes
    turns = await _admit_many(store, turn, 4)
    assert [d.admitted for d in turns] == [True, True, True, False]
    assert _windows_left(turns[0]) == (2, 2, 2)
    assert turns[3].member == ""  # a refusal counted nowhere: nothing to undo
    # Undoing one admitted turn gives exactly one back.
    await store.unadmit(turn, turns[2].member)
    again = await _admit_many(store, turn, 2)
    assert [d.admitted for d in again] == [True, False]


async def test_an_admitted_turn_grants_its_model_token_in_the_same_step(
    backend: Backend,
) -> None:
    """A model token tagged like the secret is granted by the admission that
    admits its turn, and only then: a refused turn grants nothing, an undone
    admission takes its grant back."""
    store = backend.store()
    record = dataclasses.replace(_policed(backend, user="user_tokens", limit=2), workflow_id="wf_t")
    await store.register(record)
    tag, _ = split_tag(record.secret_hash)

    def turn(n: int) -> tuple[AdmitRequest, str]:
        token_hash = HASHER(f"ckmt_{tag}_token-{n}".encode())
        assert split_tag(token_hash)[0] == tag
        return AdmitRequest(record.secret_hash, False, 10, None, "turn", token=token_hash,
                            request_id=f"req_{n}"), token_hash  # fmt: skip

    request, granted = turn(1)
    assert (await store.admit(request)).admitted
    assert await store.model_grant(granted) == ModelGrant(
        record.secret_hash, record.session_id, record.user, "wf_t", "req_1", record.expires_at
    )
    undone, taken_back = turn(2)
    decision = await store.admit(undone)
    assert await store.model_grant(taken_back) is not None
    await store.unadmit(undone, decision.member)
    assert await store.model_grant(taken_back) is None
    assert (await store.admit(turn(3)[0])).admitted  # the session's second turn
    refused, never = turn(4)
    assert (await store.admit(refused)).outcome is Outcome.RATE_LIMITED
    assert await store.model_grant(never) is None
    await store.revoke(secret_hash=None, session_id=record.session_id, reason="t", replica="r")
    assert await store.model_grant(granted) is None
