"""A revocation reported stored survives a failover (GATEWAY_REDIS_REVOCATION_REPLICAS).

Redis replicates asynchronously: what a master took but its replica had not
received yet is gone once the replica is promoted. With the setting at n,
a revocation counts as stored only when n replicas acknowledged it (WAIT);
until then the gateway keeps it pending and writes it again.

Real processes throughout: a master and its replica, and for the failover
three ``redis-server --sentinel`` and two gateway replicas. The replica is
held back with SIGSTOP; for the failover, the master's link to it is also
filled first (JUNK_BYTES), so that the revocation waits in the master's own
output buffer, not in a kernel buffer the replica reads on waking, and
dies with the master: the loss is deterministic. A forced ``SENTINEL
FAILOVER`` leaves the old master running and writable for seconds: the
revocation must reach the new one all the same.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio
import redis

from gateway.auth import SecretHasher
from gateway.errors import ConfigError, StoreUnavailable
from gateway.settings import load_settings
from gateway.store.redis import RedisStore, connect
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisCluster,
    RedisSentinels,
    RedisServer,
    converse,
    create_session,
    eventually,
    metric_value,
    running,
    scrape,
)

HASH = SecretHasher(None)  # no GATEWAY_SECRET_PEPPER is configured
WAIT_MS = 300
# A cluster replica that just finished its initial sync may take longer than
# WAIT_MS to answer its first GETACK; the refusal below still waits it all.
CLUSTER_WAIT_MS = 1500
# More than the loopback socket buffers between master and replica hold.
JUNK_BYTES = 48 * 1024 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and a replica in sync with it."""
    with (
        RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]) as master,
        RedisServer(extra_args=["--replicaof", master.host, str(master.port)]) as replica,
    ):
        yield master, replica


def _acknowledging(master: RedisServer) -> bool:
    """Whether the master counts its replica for WAIT: only once the replica
    is online, after its first acknowledgement (up to a second after sync)."""
    with redis.Redis(host=master.host, port=master.port, socket_timeout=2) as client:
        client.set("probe", 1)
        return bool(client.wait(1, 100) == 1)


@pytest_asyncio.fixture
async def synced(
    pair: tuple[RedisServer, RedisServer],
) -> AsyncIterator[tuple[RedisServer, RedisServer]]:
    master, replica = pair
    await eventually(lambda: _acknowledging(master), timeout=20, what="the replica to sync")
    yield master, replica
    replica.resume()


@contextlib.asynccontextmanager
async def _store(
    url: str, *, replicas: int, cluster: bool = False, wait_ms: int = WAIT_MS
) -> AsyncIterator[RedisStore]:
    """A store on ``url`` whose revocations wait for ``replicas``, closed on exit."""
    store = RedisStore(
        connect(url, cluster=cluster, timeout=1.0),
        prefix="dr",
        pubsub_url=url,
        revocation_replicas=replicas,
        revocation_wait_ms=wait_ms,
    )
    try:
        yield store
    finally:
        await store.close()


async def _has(server: RedisServer, key: str) -> bool:
    client = server.client()
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


async def _pending(http: aiohttp.ClientSession, gateway: GatewayProcess) -> float | None:
    samples = await scrape(http, gateway.url)
    return metric_value(samples, "chatkit_gateway_revocations_pending")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # nothing to wait for without Redis
        ({"GATEWAY_REDIS_REVOCATION_REPLICAS": "1"}, "needs a Redis store"),
        # negative counts and waits are typos, not policies
        (
            {"GATEWAY_REDIS_URL": "redis://r:6379", "GATEWAY_REDIS_REVOCATION_REPLICAS": "-1"},
            "REDIS_REVOCATION_REPLICAS",
        ),
        (
            {"GATEWAY_REDIS_URL": "redis://r:6379", "GATEWAY_REDIS_REVOCATION_WAIT_MS": "0"},
            "REDIS_REVOCATION_WAIT_MS",
        ),
    ],
)
def test_revocation_replica_settings_are_checked_at_start_up(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


async def test_a_revocation_reported_stored_is_already_on_the_replica(
    synced: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = synced
    async with _store(master.url, replicas=1) as store:
        result = await store.revoke(
            secret_hash="a" * 64, session_id="cksess_a", reason="t", replica="x"
        )
        # Read from the replica at once: no polling, WAIT already saw to it.
        assert await _has(replica, store.keys.secret("a" * 64).revoked)
        assert await _has(replica, store.keys.session_id("cksess_a").revoked)
        assert not result.already_revoked


async def test_a_revocation_no_replica_acknowledged_is_not_reported_stored(
    synced: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = synced
    async with _store(master.url, replicas=1) as store:
        flag = store.keys.secret("b" * 64).revoked
        replica.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="0 of 1 within 300 ms"):
            await store.revoke(secret_hash="b" * 64, session_id=None, reason="t", replica="x")
        # One WAIT, not one per quick retry: the replicas' silence is not a
        # blip that 50 ms cures, and the caller retries anyway.
        assert time.monotonic() - started < 3 * WAIT_MS / 1000
        # The master took it (other gateways refuse the secret meanwhile).
        assert await _has(master, flag)

        # A second attempt, on a connection that never wrote: its WAIT must
        # still wait for this revocation (the script writes every time).
        async with _store(master.url, replicas=1) as again:
            with pytest.raises(StoreUnavailable):
                await again.revoke(secret_hash="b" * 64, session_id=None, reason="t", replica="x")

        replica.resume()

        async def stored() -> bool:
            # What the Revoker does with a pending revocation: write it again.
            try:
                await store.revoke(secret_hash="b" * 64, session_id=None, reason="t", replica="x")
            except StoreUnavailable:
                return False
            return await _has(replica, flag)

        await eventually(stored, timeout=10, what="the revocation acknowledged once resumed")


async def test_without_replicas_to_wait_for_a_revocation_is_stored_by_the_master_alone(
    synced: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = synced
    async with _store(master.url, replicas=0) as store:
        replica.pause()
        await store.revoke(secret_hash="c" * 64, session_id=None, reason="t", replica="x")
        assert await _has(master, store.keys.secret("c" * 64).revoked)


def _has_on_cluster_replica(replica: RedisServer, key: str) -> bool:
    with redis.Redis(
        host=replica.host, port=replica.port, socket_timeout=1, single_connection_client=True
    ) as client:
        client.execute_command("READONLY")  # a cluster replica redirects reads without it
        return bool(client.exists(key))


async def _until_refused(
    http: aiohttp.ClientSession, gateway: GatewayProcess, secret: str
) -> list[tuple[int, str | None]]:
    """Ask ``gateway`` until it refuses ``secret`` as revoked; every answer seen."""
    answers: list[tuple[int, str | None]] = []

    async def refuses() -> bool:
        answers.append(await converse(http, gateway, secret))
        return answers[-1] == (401, "client_secret_revoked")

    await eventually(refuses, timeout=10, what=f"{gateway.url} to refuse the secret")
    return answers


def _replica_online(primary: RedisServer) -> bool:
    """Whether the primary counts its replica for WAIT (``state=online``)."""
    with redis.Redis(host=primary.host, port=primary.port, socket_timeout=1) as client:
        replica = client.info("replication").get("slave0")
    return isinstance(replica, dict) and replica.get("state") == "online"


def _replica_of(cluster: RedisCluster, primary: RedisServer) -> RedisServer:
    for node in cluster.nodes:
        with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
            info = client.info("replication")
        if info.get("role") == "slave" and int(info["master_port"]) == primary.port:
            return node
    raise LookupError(f"no replica of {primary.port}")


async def test_on_a_cluster_the_node_owning_the_slot_waits_for_its_own_replica() -> None:
    with RedisCluster(masters=3, replicas=1, extra={"repl-diskless-sync-delay": "0"}) as cluster:
        async with _store(cluster.url, replicas=1, cluster=True, wait_ms=CLUSTER_WAIT_MS) as store:
            hashes = [f"{n:064x}" for n in range(8)]
            flags = {h: store.keys.secret(h).revoked for h in hashes}
            primaries = {h: cluster.primary_of(flags[h]) for h in hashes}
            held = primaries[hashes[0]]
            others = [h for h in hashes if primaries[h] is not held]
            assert others, "every key on one primary: pick other hashes"
            for primary in {p.port: p for p in primaries.values()}.values():
                await eventually(
                    functools.partial(_replica_online, primary), timeout=20, what="replicas in sync"
                )

            lagging = _replica_of(cluster, held)
            other_replica = _replica_of(cluster, primaries[others[0]])
            lagging.pause()
            try:
                with pytest.raises(StoreUnavailable, match="0 of 1"):
                    await store.revoke(
                        secret_hash=hashes[0], session_id=None, reason="t", replica="x"
                    )
                # Another primary's slots wait only for that primary's replica.
                await store.revoke(secret_hash=others[0], session_id=None, reason="t", replica="x")
                assert _has_on_cluster_replica(other_replica, flags[others[0]])
            finally:
                lagging.resume()


# -- a failover through Sentinel, two gateway replicas ----------------------------


def _behind_sentinel(
    upstream: FakeUpstream, sentinels: RedisSentinels, **env: str
) -> tuple[GatewayProcess, GatewayProcess]:
    """Gateways a and b on the master the sentinels name, with ``env`` besides."""
    env = {
        "GATEWAY_REDIS_SENTINELS": sentinels.setting,
        "GATEWAY_REDIS_SENTINEL_MASTER": RedisSentinels.MASTER_NAME,
        "GATEWAY_REDIS_TIMEOUT": "1.0",
        **env,
    }
    return (
        GatewayProcess(upstream.url, env={**env, "GATEWAY_REPLICA_ID": "a"}),
        GatewayProcess(upstream.url, env={**env, "GATEWAY_REPLICA_ID": "b"}),
    )


@pytest.mark.parametrize(
    "replicas",
    [
        # today's default: the master's word is enough, and the failover loses it
        0,
        # one replica must acknowledge: kept pending until one did
        1,
    ],
)
async def test_a_cancel_just_before_a_failover_survives_only_when_replicas_must_acknowledge(
    upstream: FakeUpstream, replicas: int
) -> None:
    with RedisSentinels() as sentinels:
        old = sentinels.master()
        replica = next(s for s in sentinels.servers if s is not old)
        gateways = _behind_sentinel(
            upstream,
            sentinels,
            GATEWAY_REDIS_REVOCATION_REPLICAS=str(replicas),
            GATEWAY_REDIS_REVOCATION_WAIT_MS=str(WAIT_MS),
        )
        async with running(gateways), aiohttp.ClientSession() as http:
            a, b = gateways
            session = await create_session(http, a.url, limit=1000)
            secret = session["client_secret"]
            assert await converse(http, b, secret) == (200, None)
            flag = f"ckg:{{{HASH(secret.encode())}}}:r"
            old_client = old.client()
            try:
                # The registration is on the replica before it is held back.
                assert await old_client.wait(1, 5000) == 1
            except BaseException:
                await old_client.aclose()
                raise

            # The replica stops reading the replication stream; the cancel
            # reaches the master only, which then dies.
            replica.pause()
            try:
                await old_client.set("junk", b"x" * JUNK_BYTES)
            finally:
                await old_client.aclose()
            async with http.post(
                f"{a.url}/v1/chatkit/sessions/{session['id']}/cancel",
                headers={"Authorization": "Bearer sk-test"},
            ) as response:
                assert response.status == 200
                marked = response.headers["x-chatkit-gateway-revocation"]
            assert await _has(old, flag)
            old.kill()
            replica.resume()
            await eventually(lambda: sentinels.master() is replica, timeout=20, what="the failover")

            if replicas == 0:
                # Reported stored, then lost with the master: the failover
                # took the revocation, and both replicas admit the secret.
                assert marked == "stored"

                async def admitted_again() -> bool:
                    return await converse(http, b, secret) == (200, None)

                await eventually(admitted_again, timeout=10, what="B to admit the secret")
                assert not await _has(replica, flag)
                return

            # Not acknowledged before the master died: pending, enforced by A
            # at once and written again until the promoted replica has it.
            assert marked == "pending"
            assert await converse(http, a, secret) == (401, "client_secret_revoked")
            assert await _pending(http, a) == 1
            await eventually(
                lambda: _has(replica, flag), timeout=15, what="the revocation on the new master"
            )
            answers = await _until_refused(http, b, secret)
            # Before the new master answered, B could only fail closed.
            assert set(answers) <= {(401, "client_secret_revoked"), (503, "store_unavailable")}
            assert await converse(http, a, secret) == (401, "client_secret_revoked")

            # The new master has no replica until the old one comes back as
            # one: only then is the revocation acknowledged, and stored.
            assert await _pending(http, a) == 1
            old.start()

            async def drained() -> bool:
                return await _pending(http, a) == 0

            await eventually(drained, timeout=30, what="the revocation to be acknowledged")
            assert await _has(old, flag)


async def test_a_cancel_during_a_forced_failover_reaches_the_new_master(
    upstream: FakeUpstream,
) -> None:
    # SENTINEL FAILOVER: the old master keeps running and taking writes,
    # with no replica left, until the sentinels convert it (about 10 s);
    # every other gateway has moved to the new master long before.
    with RedisSentinels() as sentinels:
        old = sentinels.master()
        promoted = next(s for s in sentinels.servers if s is not old)
        gateways = _behind_sentinel(upstream, sentinels, GATEWAY_REDIS_REVOCATION_REPLICAS="1")
        async with running(gateways), aiohttp.ClientSession() as http:
            a, b = gateways
            session = await create_session(http, a.url, limit=1000)
            secret = session["client_secret"]
            flag = f"ckg:{{{HASH(secret.encode())}}}:r"
            client = old.client()
            try:
                assert await client.wait(1, 5000) == 1
            finally:
                await client.aclose()
            with redis.Redis(*sentinels.addresses[0], socket_timeout=5) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", RedisSentinels.MASTER_NAME)
            # Into the window: the replica is being promoted, the old master
            # still answers, and nothing it takes now reaches the new one.
            await eventually(lambda: _role(promoted) == "master", timeout=10, what="the promotion")
            async with http.post(
                f"{a.url}/v1/chatkit/sessions/{session['id']}/cancel",
                headers={"Authorization": "Bearer sk-test"},
            ) as response:
                assert response.status == 200
                assert response.headers["x-chatkit-gateway-revocation"] == "pending"
            await eventually(
                lambda: _has(promoted, flag), timeout=10, what="the revocation on the new master"
            )
            await _until_refused(http, b, secret)
            assert await converse(http, a, secret) == (401, "client_secret_revoked")
            assert await _pending(http, a) == 1  # until the old master rejoins as a replica


def _role(server: RedisServer) -> str:
    with redis.Redis(host=server.host, port=server.port, socket_timeout=1) as client:
        return str(client.info("replication")["role"])
