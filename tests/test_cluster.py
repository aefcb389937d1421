"""The Redis store on a real three-primary Redis Cluster.

The admission script touches only keys that share the secret's hash tag, so
it runs unchanged on a cluster; these tests prove it on one, including the
script cache being flushed on every primary and a gateway process configured
with GATEWAY_REDIS_CLUSTER=true.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import cast

import aiohttp
import pytest
import redis

from gateway.auth import SecretHasher, split_tag
from gateway.errors import ConfigError, StoreUnavailable
from gateway.model.budgets import BudgetKey, BudgetLimit, Charge, Reservation
from gateway.ratelimit import Outcome
from gateway.settings import load_settings
from gateway.store.base import AdmitRequest, ModelGrant, SessionRecord
from gateway.store.redis import RedisStore, connect
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisCluster,
    RedisServer,
    cancel_session,
    collecting,
    create_session,
    eventually,
    sdk_create,
    subscribed,
)

ISSUER_KEY = "ckgk_cluster-issuer-key-0123456789"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as running:
        yield running


@pytest.fixture
async def store(cluster: RedisCluster) -> AsyncIterator[RedisStore]:
    client = connect(cluster.url, cluster=True, timeout=2.0)
    await client.flushall()
    store = RedisStore(client, prefix="ct", pubsub_url=cluster.url)
    yield store
    await store.close()


def _hash(n: int) -> str:
    return f"{n:064x}"


async def test_keys_of_one_secret_share_a_slot_and_sessions_spread_over_primaries(
    store: RedisStore, cluster: RedisCluster
) -> None:
    client = cluster.client()
    try:
        owners = set()
        for n in range(12):
            keys = store.keys.secret(_hash(n))
            slots = {await client.cluster_keyslot(key) for key in keys}
            assert len(slots) == 1, keys
            node = client.get_node_from_key(keys[0])
            assert node is not None, keys
            owners.add(node.name)
        # Twelve secrets land on more than one primary, so the tests below
        # exercise more than one node.
        assert len(owners) > 1
    finally:
        await client.aclose()


async def test_exact_limits_on_every_primary(store: RedisStore) -> None:
    expires = int(time.time()) + 600
    for n in range(6):
        await store.register(SessionRecord(_hash(n), f"cksess_c{n}", "u", expires, n + 1))
    for n in range(6):
        request = AdmitRequest(_hash(n), False, 10, None)
        decisions = await asyncio.gather(*(store.admit(request) for _ in range(n + 4)))
        outcomes = [d.outcome for d in decisions]
        assert outcomes.count(Outcome.ADMITTED) == n + 1
        assert outcomes.count(Outcome.RATE_LIMITED) == 3


async def test_a_hung_primary_delays_and_fails_only_its_own_slots(
    store: RedisStore, cluster: RedisCluster
) -> None:
    expires = int(time.time()) + 600
    hashes = [_hash(100 + n) for n in range(12)]
    for n, secret_hash in enumerate(hashes):
        await store.register(SessionRecord(secret_hash, f"cksess_h{n}", "u", expires, 100))
    hung = cluster.primary_of(store.keys.secret(hashes[0]).session)
    stuck = {h for h in hashes if cluster.primary_of(store.keys.secret(h).session) is hung}
    assert len(stuck) < len(hashes), "every secret on one primary"

    async def timed(secret_hash: str) -> tuple[str, bool, float]:
        started = time.monotonic()
        try:
            decision = await store.admit(AdmitRequest(secret_hash, False, 10, None))
        except StoreUnavailable:
            return secret_hash, False, time.monotonic() - started
        return secret_hash, decision.outcome is Outcome.ADMITTED, time.monotonic() - started

    hung.pause()  # the port stays open and nothing answers: a hung host
    try:
        answers = await asyncio.gather(*(timed(h) for h in hashes))
    finally:
        hung.resume()
    for secret_hash, admitted, took in answers:
        if secret_hash in stuck:
            assert not admitted
        else:
            # Decided at once, not after the hung node's timeout (2 s here).
            assert admitted
            assert took < 1.0, f"a healthy node's decision waited {took:.2f}s"
    # And the hung node's slots are served again once it answers.
    decision = await store.admit(AdmitRequest(hashes[0], False, 10, None))
    assert decision.outcome is Outcome.ADMITTED


async def test_script_flush_on_every_primary_is_recovered(
    store: RedisStore, cluster: RedisCluster
) -> None:
    await store.register(SessionRecord(_hash(1), "cksess_f", "u", int(time.time()) + 600, 2))
    request = AdmitRequest(_hash(1), False, 10, None)
    assert (await store.admit(request)).outcome is Outcome.ADMITTED
    for node in cluster.nodes:
        client = node.client()
        await client.script_flush()
        await client.aclose()
    decisions = await asyncio.gather(store.admit(request), store.admit(request))
    # The NOSCRIPT replies did not run the script, so nothing was counted twice.
    assert sorted(d.outcome for d in decisions) == [Outcome.ADMITTED, Outcome.RATE_LIMITED]


async def test_revocation_by_session_id_and_its_announcement(
    store: RedisStore, cluster: RedisCluster
) -> None:
    await store.register(SessionRecord(_hash(7), "cksess_r", "u", int(time.time()) + 600, 5))
    # An async generator underneath; the Store interface only promises iteration.
    announcements = cast(AsyncGenerator[str | None, None], store.revocations())
    listener = asyncio.ensure_future(anext(announcements))
    # The store subscribes through the node its URL names while it answers;
    # wait until that node counts the subscriber, so the announcement cannot
    # be missed.
    node = cluster.nodes[0].client()
    await eventually(lambda: subscribed(node, "ct:revocations"), what="the store to subscribe")
    await node.aclose()
    result = await store.revoke(secret_hash=None, session_id="cksess_r", reason="t", replica="x")
    assert result.secret_hash == _hash(7)
    assert await asyncio.wait_for(listener, 5) == _hash(7)
    await announcements.aclose()
    decision = await store.admit(AdmitRequest(_hash(7), False, 10, None))
    assert decision.outcome is Outcome.REVOKED
    info = await store.lookup("cksess_r")
    assert info is not None
    assert info.status == "revoked"


async def test_a_users_class_windows_span_sessions_on_every_primary(
    store: RedisStore, cluster: RedisCluster
) -> None:
    # An issued secret carries its user's slot tag, so its keys and its user's
    # windows share one slot: one script decides both, on a cluster too.
    hasher = SecretHasher(b"cluster-pepper")
    expires = int(time.time()) + 600
    users = [f"user_{n}" for n in range(8)]
    client = cluster.client()
    try:
        owners = set()
        for user in users:
            for n in range(2):
                secret = f"ek_{hasher.user_tag(user)}_{user}-{n}-secret-bytes"
                record = SessionRecord(
                    hasher(secret.encode()),
                    f"cksess_{user}_{n}",
                    user,
                    expires,
                    50,
                    issued=True,
                    counts="turn",
                    windows={"turn": "u86400:3,s60:2"},
                    models=("gpt-allowed",),
                )
                await store.register(record)
                keys = store.keys.secret(record.secret_hash)
                user_key = store.keys.class_user_prefix(record.secret_hash) + "x:turn:86400"
                slots = {await client.cluster_keyslot(key) for key in (*keys, user_key)}
                assert len(slots) == 1, keys
                node = client.get_node_from_key(keys[0])
                assert node is not None
                owners.add(node.name)
        assert len(owners) > 1  # the users spread over the primaries
    finally:
        await client.aclose()
    for user in users:
        hashes = [
            hasher(f"ek_{hasher.user_tag(user)}_{user}-{n}-secret-bytes".encode()) for n in (0, 1)
        ]
        # Models the workflow does not list are refused in the same step,
        # before any window counts: they leave the user all 3 turns.
        models = [
            await store.admit(AdmitRequest(hashes[n % 2], False, 10, None, "turn", model="x"))
            for n in range(2)
        ]
        assert [d.outcome for d in models] == [Outcome.MODEL_NOT_ALLOWED] * 2
        # Admissions undone (turns refused for a spent budget) give back
        # every window they counted in, on the session's primary.
        # The turn's model token is granted in the same script, in the
        # session's slot, and taken back with it.
        for n in range(2):
            tag, _ = split_tag(hashes[n])
            token = hasher(f"ckmt_{tag}_{user}-{n}-token".encode())
            request = AdmitRequest(
                hashes[n], False, 10, None, "turn", model="gpt-allowed", token=token
            )
            undone = await store.admit(request)
            assert undone.admitted
            assert await store.model_grant(token) is not None
            await store.unadmit(request, undone.member)
            assert await store.model_grant(token) is None
        decisions = [
            await store.admit(
                AdmitRequest(hashes[n % 2], False, 10, None, "turn", model="gpt-allowed")
            )
            for n in range(5)
        ]
        outcomes = [d.outcome for d in decisions]
        assert outcomes == [Outcome.ADMITTED] * 3 + [Outcome.CLASS_RATE_LIMITED] * 2, user
        refused = decisions[-1].class_window
        assert refused is not None
        assert refused.name == "turn-user-1d"


async def test_model_tokens_and_budgets_work_on_a_cluster(
    store: RedisStore, cluster: RedisCluster
) -> None:
    """A user's budget keys share one hash tag (one script, one node); a
    model token's check reads its own key, then its session's flags on theirs."""
    record = SessionRecord(_hash(77), "cksess_model", "alice", int(time.time()) + 600, 10)
    await store.register(record)
    grant = ModelGrant(
        record.secret_hash, record.session_id, "alice", "wf", "req", record.expires_at
    )
    await store.grant_model_token(_hash(78), grant)
    assert await store.model_grant(_hash(78)) == grant
    limit = BudgetLimit("tokens", "user", 86400, 1000)
    keys = store.keys.budget("wf", "alice")
    assert len({cluster.primary_of(k).port for k in keys}) == 1
    for user in ("alice", "bob", "carol", "dave"):  # users spread over primaries
        key = BudgetKey("wf", user, f"cksess_{user}")

        def claim(call: str, key: BudgetKey = key) -> Reservation:
            return Reservation(key, call, Charge(300, 0, 300, 0.0), (limit,), "m", 60)

        assert (await store.reserve_budget(claim("c1"))).admitted
        refused = await store.reserve_budget(claim("c2"))
        assert not refused.admitted
        await store.settle_budget(key, "c1", Charge(100, 0, 100, 0.0), model="m")
        assert (await store.reserve_budget(claim("c2"))).admitted
        [charged] = await store.budget_charges("wf", user)
        assert charged.charge.tokens == 200
    await store.revoke(secret_hash=None, session_id=record.session_id, reason="t", replica="r")
    assert await store.model_grant(_hash(78)) is None


def test_user_limits_are_refused_on_a_cluster_at_start_up() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_USER_MAX_REQUESTS_PER_1_MINUTE"):
        load_settings(
            {
                "GATEWAY_REDIS_URL": "redis://127.0.0.1:7000",
                "GATEWAY_REDIS_CLUSTER": "true",
                "GATEWAY_USER_MAX_REQUESTS_PER_1_MINUTE": "5",
            }
        )


async def test_gateway_on_a_cluster_admits_exactly_the_limit_and_honours_cancel(
    cluster: RedisCluster, upstream: FakeUpstream
) -> None:
    async with (
        GatewayProcess(
            upstream.url, redis_url=cluster.url, env={"GATEWAY_REDIS_CLUSTER": "true"}
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        session = await create_session(http, gateway.url, limit=4)
        auth = {"Authorization": f"Bearer {session['client_secret']}"}

        async def call() -> int:
            async with http.post(
                f"{gateway.url}/v1/chatkit/conversation", headers=auth, json={}
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call() for _ in range(9)))
        assert sorted(statuses) == [200] * 4 + [429] * 5
        assert upstream.count("/v1/chatkit/conversation") == 4

        await cancel_session(http, gateway.url, session["id"])
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation", headers=auth, json={}
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "client_secret_revoked"
        assert upstream.count("/v1/chatkit/conversation") == 4


async def test_two_gateways_on_a_cluster_hold_a_users_daily_turns_across_sessions(
    cluster: RedisCluster, upstream: FakeUpstream
) -> None:
    # Issued sessions end to end: minted by the gateways, each stored in its
    # user's slot, so the per-user window holds on the cluster.
    env = {
        "GATEWAY_REDIS_CLUSTER": "true",
        "GATEWAY_ISSUER_API_KEYS": ISSUER_KEY,
        "GATEWAY_WORKFLOWS": json.dumps(
            {
                "wf_c": {
                    "upstream": f"{upstream.url}/v1/chatkit/server",
                    "policy": {"limits": {"turn": {"user": {"1d": 3}}}},
                }
            }
        ),
    }
    async with (
        GatewayProcess("none", redis_url=cluster.url, env=env) as a,
        GatewayProcess("none", redis_url=cluster.url, env=env) as b,
        aiohttp.ClientSession() as http,
    ):
        sessions = [
            await sdk_create(g, ISSUER_KEY, user="erin", workflow={"id": "wf_c"}) for g in (a, b, a)
        ]
        other = await sdk_create(b, ISSUER_KEY, user="frank", workflow={"id": "wf_c"})
        turn = {"type": "threads.add_user_message", "params": {"input": {}}}

        async def send(gateway: GatewayProcess, secret: str) -> int:
            async with http.post(
                f"{gateway.url}/chatkit",
                json=turn,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                await response.read()
                return response.status

        statuses = [await send((a, b)[n % 2], sessions[n % 3].client_secret) for n in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        assert await send(a, other.client_secret) == 200
        assert upstream.count("/v1/chatkit/server") == 4


# -- failover: 3 primaries, 3 replicas, one primary killed -------------------------------

# How long a silent primary goes before its replica is elected (the default,
# 15 s, would make this test wait; the recovery after election is the gateway's).
NODE_TIMEOUT_MS = 1000


@pytest.fixture
def replicated_cluster() -> Iterator[RedisCluster]:
    # Surviving primaries keep answering for their own slots while a failover
    # runs, as docs/deployment.md advises; with full coverage required, every
    # node refuses every command until the replica is elected.
    with RedisCluster(
        replicas=1,
        node_timeout_ms=NODE_TIMEOUT_MS,
        extra={"cluster-require-full-coverage": "no"},
    ) as running:
        yield running


async def _feed_on(node: RedisServer, channel: str) -> bool:
    client = node.client()
    try:
        return await subscribed(client, channel)
    finally:
        await client.aclose()


async def test_a_killed_primary_fails_only_its_own_slots_and_everything_resumes_in_seconds(
    replicated_cluster: RedisCluster,
) -> None:
    cluster = replicated_cluster
    # The URL names the primary about to die, as the replica that lost its
    # revocation feed for good was configured.
    victim = cluster.nodes[0]
    store = RedisStore(
        connect(victim.url, cluster=True, timeout=0.5),
        prefix="fo",
        pubsub_url=victim.url,
        ping_seconds=0.5,
    )
    try:
        async with collecting(store.revocations()) as heard:
            expires = int(time.time()) + 600
            hashes = [_hash(n) for n in range(24)]
            for n, secret_hash in enumerate(hashes):
                await store.register(
                    SessionRecord(secret_hash, f"cksess_fo{n}", "u", expires, 10_000)
                )
            lost = {h for h in hashes if cluster.primary_of(store.keys.secret(h).session) is victim}
            kept = set(hashes) - lost
            assert lost, "no secret on the victim"
            assert kept, "every secret on the victim"
            await eventually(
                lambda: _feed_on(victim, "fo:revocations"), what="the feed on the victim"
            )

            async def admit_all() -> dict[str, bool]:
                requests = [AdmitRequest(h, False, 10, None) for h in hashes]
                decisions = await asyncio.gather(
                    *(store.admit(r) for r in requests), return_exceptions=True
                )
                return {
                    h: not isinstance(d, BaseException) and d.outcome is Outcome.ADMITTED
                    for h, d in zip(hashes, decisions, strict=True)
                }

            assert all((await admit_all()).values())
            victim.kill()
            killed_at = time.monotonic()
            failed_elsewhere: list[str] = []

            async def resumed() -> bool:
                # Load on every slot meanwhile: the other primaries must keep answering.
                answers = await admit_all()
                failed_elsewhere.extend(h for h in kept if not answers[h])
                return all(answers[h] for h in lost)

            await eventually(
                resumed, timeout=20, interval=0.05, what="admissions for the dead primary's slots"
            )
            resumed_at = time.monotonic()
            elected = await eventually(cluster.state_ok, timeout=5, what="cluster_state:ok")

            # The feed left the dead node, said so (None), and hears announcements again.
            await eventually(lambda: None in heard, timeout=10, what="the feed to resubscribe")
            feed_back_at = time.monotonic()
            result = await store.revoke(
                secret_hash=hashes[0], session_id=None, reason="t", replica="x"
            )
            assert result.secret_hash == hashes[0]
            await eventually(lambda: hashes[0] in heard, timeout=5, what="the announcement")
            print(
                f"cluster failover: admissions for the moved slots resumed "
                f"{resumed_at - killed_at:.2f}s after the kill (cluster ok "
                f"{elected:.2f}s after that); feed back within {feed_back_at - killed_at:.2f}s"
            )
            assert failed_elsewhere == [], "other primaries' slots failed while one node was down"
            assert resumed_at - killed_at < 10.0
    finally:
        await store.close()


async def test_a_coordinated_failover_is_followed_through_moved_replies(
    replicated_cluster: RedisCluster,
) -> None:
    cluster = replicated_cluster
    store = RedisStore(
        connect(cluster.url, cluster=True, timeout=2.0), prefix="mv", pubsub_url=cluster.url
    )
    try:
        expires = int(time.time()) + 600
        hashes = [_hash(200 + n) for n in range(12)]
        for n, secret_hash in enumerate(hashes):
            await store.register(SessionRecord(secret_hash, f"cksess_mv{n}", "u", expires, 100))
        requests = [AdmitRequest(h, False, 10, None) for h in hashes]
        first = await asyncio.gather(*(store.admit(r) for r in requests))
        assert {d.outcome for d in first} == {Outcome.ADMITTED}

        # The replica of one shard takes over, and the old primary stays up as
        # its replica: it answers MOVED for the slots it no longer serves.
        old = cluster.primary_of(store.keys.secret(hashes[0]).session)
        replica = next(n for n in cluster.nodes if _replica_of(n, old))
        client = replica.client()
        try:
            await client.cluster("FAILOVER")
        finally:
            await client.aclose()
        await eventually(
            lambda: cluster.serves(store.keys.secret(hashes[0]).session, replica),
            timeout=10,
            what="the replica to take over",
        )

        # Every decision still comes back: MOVED means the script did not run,
        # so it is sent again to the new primary (and counted once).
        again = await asyncio.gather(*(store.admit(r) for r in requests))
        assert {d.outcome for d in again} == {Outcome.ADMITTED}
        for decision in again:
            assert decision.session is not None
            assert decision.session.remaining == 100 - 2
    finally:
        await store.close()


def _replica_of(node: RedisServer, primary: RedisServer) -> bool:
    with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
        info = client.info("replication")
    return info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port


async def test_admissions_in_flight_when_the_store_closes_leave_no_connection_open(
    cluster: RedisCluster,
) -> None:
    def connected() -> int:
        total = 0
        for node in cluster.nodes:
            with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
                total += int(client.info("clients")["connected_clients"]) - 1  # not this one
        return total

    before = connected()
    store = RedisStore(
        connect(cluster.url, cluster=True, timeout=2.0), prefix="cl", pubsub_url=cluster.url
    )
    expires = int(time.time()) + 600
    hashes = [_hash(300 + n) for n in range(12)]
    for n, secret_hash in enumerate(hashes):
        await store.register(SessionRecord(secret_hash, f"cksess_cl{n}", "u", expires, 100))
    # Admissions that have not found their node's lane yet (none exists: the
    # first admission of each node makes it) when the store starts closing.
    admissions = [
        asyncio.ensure_future(store.admit(AdmitRequest(h, False, 10, None))) for h in hashes
    ]
    await store.close()
    outcomes = await asyncio.gather(*admissions, return_exceptions=True)
    for outcome in outcomes:  # decided before the close, or refused
        assert isinstance(outcome, StoreUnavailable) or (
            not isinstance(outcome, BaseException) and outcome.admitted
        ), outcome

    # Every connection the store opened is closed, on every node.
    def listing() -> str:
        out = []
        for node in cluster.nodes:
            with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
                out.append(str(client.client_list()))
        return "\n".join(out)

    await eventually(
        lambda: connected() == before,
        timeout=5,
        what=lambda: f"{connected()} != {before}\n{listing()}",
    )
