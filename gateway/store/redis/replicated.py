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
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, ResponseError

from gateway.store.redis.client import Client


class Replicated(NamedTuple):
    """A script's reply, and how many replicas acknowledged its write in time."""

    reply: Any
    acknowledged: int


class ReplicatedWriter:
    """Runs a script and WAIT for ``replicas`` on one connection."""

    def __init__(self, client: Client, *, replicas: int, wait_ms: int, timeout: float) -> None:
        self._client = client
        self.replicas = replicas
        self.wait_ms = wait_ms
        # The reply to WAIT comes up to wait_ms late by design.
        self._deadline = timeout + wait_ms / 1000

    async def run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Replicated:
        """The script's reply and the replicas' count; Redis and socket errors propagate.

        EVAL rather than EVALSHA: revocations are rare, and a script cache
        emptied by a failover or a restart costs no extra round trip.
        """
        commands = [
            ("EVAL", source, len(keys), *keys, *args),
            ("WAIT", self.replicas, self.wait_ms),
        ]
        script_reply, acknowledged = await self._on_one_connection(keys[0], commands)
        if isinstance(script_reply, Exception):
            raise script_reply
        if isinstance(acknowledged, Exception):
            raise acknowledged
        return Replicated(script_reply, int(acknowledged))

    async def _on_one_connection(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        client = self._client
        if isinstance(client, RedisCluster):
            await client.initialize()
            node = client.get_node_from_key(key)
            if node is None:  # only for replica lookups; kept for the type checker
                raise RedisConnectionError("Redis Cluster has no node for the key")
            connection = node.acquire_connection()
            try:
                replies = await self._send(connection, commands)
            finally:
                node.release(connection)
            for reply in replies:
                if isinstance(reply, MovedError):
                    # The slot has a new owner (a failover): learn it, so the
                    # next attempt goes there.
                    await client.nodes_manager.move_slot(reply)
            return replies
        pool = client.connection_pool
        master = None
        if isinstance(pool, SentinelConnectionPool):
            # Asked every time (revocations are rare): after a forced
            # failover the old master keeps taking writes for seconds, with
            # no replica left to acknowledge them, while every other gateway
            # has moved to the new one. Asking drops idle connections to a
            # former master.
            master = await pool.get_master_address()  # type: ignore[no-untyped-call]
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        if (
            master is not None
            and connection.is_connected
            and (connection.host, connection.port) != master
        ):
            await connection.disconnect()
        try:
            return await self._send(connection, commands)
        finally:
            await pool.release(connection)

    async def _send(self, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self._deadline):
                await connection.send_packed_command(connection.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await connection.read_response(timeout=self._deadline))
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
        except BaseException:
            # Cut short, the connection may hold unread replies: never reuse it.
            await connection.disconnect(nowait=True)
            raise
