"""Writes that must survive a failover: run, then ``WAIT`` for the replicas.

Redis replicates asynchronously, so a write the master acknowledged can die
with it: a replica promoted by Sentinel or Cluster never received what the
master took in its last moments. ``WAIT n ms`` blocks until ``n`` replicas
acknowledged every write made *on the same connection*, so the script and
the WAIT are sent together on one connection of the server that owns the
key (on a cluster, the primary of the key's slot).

A WAIT that times out does not undo the write: the master keeps it and may
still replicate it. The caller treats it as not stored and writes again
later; the scripts always write (see revoke_secret.lua), so each attempt's
WAIT measures that attempt, wherever the key lives by then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NamedTuple

from redis.asyncio.cluster import RedisCluster

from gateway.store.redis.client import Client, read_replies
from gateway.store.redis.cluster import ClusterRouter


class Replicated(NamedTuple):
    """A script's reply, and how many replicas acknowledged its write in time."""

    reply: Any
    acknowledged: int


class ReplicatedWriter:
    """Runs a script and WAIT for ``replicas`` on one connection."""

    def __init__(self, client: Client, *, replicas: int, wait_ms: int, timeout: float) -> None:
        self.replicas = replicas
        self.wait_ms = wait_ms
        # The reply to WAIT comes up to wait_ms late by design.
        self._deadline = timeout + wait_ms / 1000
        self._router: ClusterRouter | None = None
        self._pool: Any = None
        if isinstance(client, RedisCluster):
            # Its own router: a revocation retried while no admission runs
            # must still learn where a failed node's slots went.
            self._router = ClusterRouter(client, on_refresh=lambda _primaries: None)
        else:
            self._pool = client.connection_pool

    async def run(
        self, source: str, keys: Sequence[str], args: Sequence[Any], *, wait: bool = True
    ) -> Replicated:
        """The script's reply and the replicas' count; Redis and socket errors propagate.

        Without ``wait`` the script alone runs, on a connection chosen the
        same way (the count is then 0): a pooled connection that was in use
        when the master changed may still reach the old one.

        EVAL rather than EVALSHA: revocations are rare, and a script cache
        emptied by a failover or a restart costs no extra round trip.
        """
        commands: list[tuple[Any, ...]] = [("EVAL", source, len(keys), *keys, *args)]
        if wait:
            commands.append(("WAIT", self.replicas, self.wait_ms))
        replies = await self._on_one_connection(keys[0], commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return Replicated(replies[0], int(replies[1]) if wait else 0)

    async def _on_one_connection(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        if self._router is not None:
            node = await self._router.node_for(key)
            connection = node.acquire_connection()
            try:
                replies = await self._send(connection, commands)
            except BaseException:
                self._router.stale()  # a node that fails may have been replaced
                raise
            finally:
                node.release(connection)
            for reply in replies:
                if isinstance(reply, Exception):
                    # A MOVED (the slot has a new owner): learnt now, so the
                    # next attempt goes there; a CLUSTERDOWN: refreshed soon.
                    if self._router.retryable(reply):
                        await self._router.redirected(reply)
                    self._router.failed(reply)
            return replies
        # A connection of its own, not a pooled one: a pooled connection that
        # was busy when the master changed still reaches the old one, which
        # after a forced failover keeps taking writes for seconds, with no
        # replica left, while every other gateway has moved on. A new
        # Sentinel connection asks the sentinels where the master is; one
        # connect per revocation is cheap, as revocations are rare.
        pool = self._pool
        fresh = pool.connection_class(**pool.connection_kwargs)
        try:
            # Explicitly: a Sentinel connection finds its master in connect(),
            # which sending on an unconnected one would bypass.
            async with asyncio.timeout(self._deadline):
                await fresh.connect()
            return await self._send(fresh, commands)
        finally:
            await fresh.disconnect()

    async def _send(self, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self._deadline):
                await connection.send_packed_command(connection.pack_commands(commands))
                return await read_replies(connection, len(commands))
        except BaseException:
            # Cut short, the connection may hold unread replies: never reuse it.
            await connection.disconnect(nowait=True)
            raise

    async def close(self) -> None:
        if self._router is not None:
            await self._router.close()
