"""Where a key lives on a Redis Cluster, kept true through failovers.

Admissions go straight to the node that owns the secret's slot (the batcher
keeps one lane per node, see batcher.py), so this module answers one question
quickly, which node, and keeps the answer right: a connection error, a MOVED
or a CLUSTERDOWN reply schedules a refresh of the slot map (CLUSTER SLOTS,
asked of any node that answers). Refreshes run in the background, at most one
at a time and one per REFRESH_SECONDS, so a dead node's slots are served by
its promoted replica within a refresh of the cluster electing it, while the
other nodes' slots never wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisError,
    TryAgainError,
)

from gateway.errors import StoreUnavailable

logger = logging.getLogger(__name__)

#: The slot map is asked for at most this often while nodes keep failing.
REFRESH_SECONDS = 0.25


class ClusterRouter:
    """The slot map of one cluster client, refreshed when the cluster changes.

    ``on_refresh`` gets the names of the primaries after every refresh, so
    whoever holds per-node state can let go of nodes that left.
    """

    def __init__(
        self, client: RedisCluster, *, on_refresh: Callable[[frozenset[str]], None]
    ) -> None:
        self._client = client
        self._on_refresh = on_refresh
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")
        self._failing = False
        self._closed = False

    async def node_for(self, key: bytes | str) -> ClusterNode:
        """The primary serving ``key``'s slot, as far as this client knows."""
        if self._closed:
            # redis-py's initialize() reconnects a closed client, and nothing
            # would close those connections again.
            raise StoreUnavailable("The Redis store is closed")
        try:
            # A no-op once the client has a slot map (and again after another
            # operation's connection error asked for a new one).
            await self._client.initialize()
            node = self._client.get_node_from_key(key)  # type: ignore[arg-type]
        except (RedisError, OSError, TimeoutError) as exc:
            self.stale()
            raise StoreUnavailable(f"Redis Cluster is unavailable: {type(exc).__name__}") from exc
        if node is None:  # only for replica lookups; kept for the type checker
            raise StoreUnavailable("Redis Cluster has no node for the key")
        return node

    @staticmethod
    def retryable(reply: Exception) -> bool:
        """Whether an error reply means the command did not run, and where
        to send it again can be learned (MOVED, ASK, TRYAGAIN; in redis-py a
        MovedError is an AskError)."""
        return isinstance(reply, AskError | TryAgainError)

    async def redirected(self, reply: Exception) -> None:
        """Learn from a redirection before the command is sent again."""
        if isinstance(reply, MovedError):
            # The slot has a new owner: a failover or a resharding, which
            # moves many slots at once, so the whole map is refreshed too.
            await self._client.nodes_manager.move_slot(reply)
            self.stale()
        elif isinstance(reply, TryAgainError):
            await asyncio.sleep(0.05)  # a slot mid-migration; it settles quickly

    async def send_asking(self, *args: Any) -> Any:
        """One command through the cluster client, which follows ASK itself."""
        return await self._client.execute_command(*args)

    def failed(self, reply: Exception) -> None:
        """An error reply: a CLUSTERDOWN means the map is about to change."""
        if isinstance(reply, ClusterDownError):
            self.stale()

    def stale(self) -> None:
        """Something suggests the slot map is wrong: refresh it soon."""
        if self._closed:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._refreshed_at + REFRESH_SECONDS - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._refreshed_at = loop.time()
        if self._closed:
            return
        try:
            await self._client.nodes_manager.initialize()
        except (RedisError, OSError, TimeoutError) as exc:
            # The next failure asks again; nothing waits on this one. Logged
            # once per outage, not four times a second.
            if not self._failing:
                logger.warning("Redis Cluster slot map not refreshed: %s", type(exc).__name__)
            self._failing = True
            return
        if self._failing:
            logger.warning("Redis Cluster slot map refreshed again")
        self._failing = False
        self._on_refresh(frozenset(node.name for node in self._client.get_primaries()))

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
