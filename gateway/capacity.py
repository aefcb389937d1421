"""A worker's connection capacity: the descriptors behind the cap, and who gives way at it.

At its connection cap a worker does not turn the new connection away: it
closes the connections that cost it most and gave it least, so that a flood
of connections sheds the attacker, not the next user:

1. connections whose request head is not complete, oldest first: a slow or
   silent client (Slowloris) holds a descriptor and has asked for nothing;
2. then idle keep-alive connections, longest idle first: the client can
   reconnect when it has something to ask;
3. never a connection with a request in progress, an SSE stream included.

Only when every other connection is in a request is the new one refused
(503). Its request may already be in, unread, and closing a socket with
unread input sends a reset that can destroy the answer, so the refusal
lingers like the gateway's others; a few at a time, past which they close
at once.

The cap only helps if the worker always gets to decide, that is if accept()
never fails for want of a descriptor first. libuv (under uvloop) accepts the
connections queued on the listening socket in a batch, before any of them
reaches the protocol, and a connection closed to make room gives its
descriptor back only on the next loop iteration. :func:`budget` therefore
derives the cap and the listen backlog together from the descriptor limit:
after what the process keeps for itself, half goes to client connections
with an upstream connection each, half to a full backlog accepted at once.
The backlog is also what a burst of new clients can queue without their SYN
being dropped (which costs a client a second before it retries).

The bookkeeping is O(1) per event: one ordered map per sheddable phase,
in the order connections entered it, so the oldest is always first.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

#: Where a connection-shed counter (``Callable[[str], None]``, called with a
#: :class:`Shed` value) is found in the ASGI lifespan state the protocol shares.
SHED_COUNTER = "chatkit_gateway.count_shed_connection"

#: The most the listen backlog is ever set to (uvicorn's own default).
MAX_BACKLOG = 2048
#: Descriptors the process keeps for itself (an eighth of the limit, at most
#: this): the Redis connections, log files, the listening, admin and metrics
#: sockets, the event loop's own.
MAX_RESERVED = 128


class Shed(enum.Enum):
    """Why a connection was closed to make room (the metric's ``reason`` label)."""

    NO_HEAD = "no_head"  # its request head was not complete
    IDLE = "idle"  # an idle keep-alive connection
    NO_ROOM = "no_room"  # the new connection itself: every other one is in a request


class Phase(enum.Enum):
    HEAD = "head"  # waiting for (the rest of) a request head
    REQUEST = "request"  # a request in progress (its response may be a stream)
    IDLE = "idle"  # keep-alive, between requests


@dataclass(frozen=True, slots=True)
class Budget:
    """How a worker spends its descriptors on client connections."""

    max_connections: int
    backlog: int
    #: The largest cap that keeps the room described in the module docstring.
    safe_max_connections: int


def budget(fd_limit: int, max_connections: int = 0) -> Budget:
    """The cap (``max_connections``, or derived when 0) and listen backlog for ``fd_limit``.

    Per client connection an upstream connection may be open too; beyond the
    cap, a backlog's worth of connections accepted at once (see the module
    docstring).
    """
    reserved = min(MAX_RESERVED, fd_limit // 8)
    free = fd_limit - reserved
    backlog = min(MAX_BACKLOG, free // 2)
    safe = max(1, (free - backlog) // 2)
    return Budget(max_connections or safe, backlog, safe)


Connection = TypeVar("Connection", bound=Hashable)


class ConnectionTable(Generic[Connection]):
    """One worker's open connections by phase, and the choice of who makes room.

    A connection is counted from :meth:`opened` until :meth:`closed` or until
    it is chosen to make room (the caller then closes it: its descriptor is
    about to be free, so it no longer counts against the cap).
    """

    def __init__(self, capacity: int, *, max_lingering: int = MAX_BACKLOG) -> None:
        self.capacity = capacity
        #: Refused newcomers (:attr:`Shed.NO_ROOM`) closing slowly, and how many may.
        self.lingering = 0
        self.max_lingering = max_lingering
        # Insertion order is the order of entering the phase: oldest first.
        self._head: OrderedDict[Connection, float] = OrderedDict()
        self._idle: OrderedDict[Connection, float] = OrderedDict()
        self._request: set[Connection] = set()

    def __len__(self) -> int:
        return len(self._head) + len(self._idle) + len(self._request)

    def opened(self, connection: Connection, now: float) -> tuple[Connection, Shed] | None:
        """Count a new connection (waiting for its head since ``now``).

        Returns the connection to close to stay within the cap, and why, if
        one must be: an older connection, or ``connection`` itself when every
        other one is in a request. It is no longer counted.
        """
        self._head[connection] = now
        if len(self) <= self.capacity:
            return None
        victim = next(iter(self._head))
        if victim is not connection:
            del self._head[victim]
            return victim, Shed.NO_HEAD
        if self._idle:
            return self._idle.popitem(last=False)[0], Shed.IDLE
        del self._head[connection]
        return connection, Shed.NO_ROOM

    def head_started(self, connection: Connection, now: float) -> None:
        """The first bytes of a request head arrived on a connection at ``now``."""
        if self._forget(connection):
            self._head[connection] = now

    def in_request(self, connection: Connection) -> None:
        """The request head is complete: the connection may not be shed until it ends."""
        if self._forget(connection):
            self._request.add(connection)

    def idle(self, connection: Connection, now: float) -> None:
        """The response is complete and the connection kept alive, idle since ``now``."""
        if self._forget(connection):
            self._idle[connection] = now

    def closed(self, connection: Connection) -> None:
        """The connection is gone (a no-op when it was already chosen to make room)."""
        self._forget(connection)

    def phase(self, connection: Connection) -> tuple[Phase, float | None] | None:
        """The connection's phase and since when (None while in a request); None if not counted."""
        if connection in self._head:
            return Phase.HEAD, self._head[connection]
        if connection in self._idle:
            return Phase.IDLE, self._idle[connection]
        if connection in self._request:
            return Phase.REQUEST, None
        return None

    def _forget(self, connection: Connection) -> bool:
        """Take the connection out of its phase; False if it was not counted."""
        if self._head.pop(connection, None) is not None:
            return True
        if self._idle.pop(connection, None) is not None:
            return True
        if connection in self._request:
            self._request.discard(connection)
            return True
        return False
