"""The Redis store, shared by every replica.

- ``keys.py``: where each piece of state lives (the key layout).
- ``client.py``: connecting (a URL, a cluster, Sentinel), and translating
  Redis errors into StoreUnavailable.
- ``cluster.py``: which cluster node serves a key, through failovers.
- ``batcher.py``: admission, batched EVALSHA of ``lua/admit.lua`` (the hot path).
- ``sender.py``: one batch's write and read on a server's admission connection.
- ``feed.py``: the pub/sub revocation feed.
- ``store.py``: :class:`RedisStore`, registry and revocation operations.
"""

from __future__ import annotations

from gateway.store.redis.batcher import ADMIT_SCRIPT, ADMIT_SHA, decode_decision
from gateway.store.redis.client import Client, connect, connect_sentinel
from gateway.store.redis.store import RedisStore

__all__ = [
    "ADMIT_SCRIPT",
    "ADMIT_SHA",
    "Client",
    "RedisStore",
    "connect",
    "connect_sentinel",
    "decode_decision",
]
