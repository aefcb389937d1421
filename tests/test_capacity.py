"""Whom a worker at its connection cap closes to make room, and the descriptor budget.

The table is pure bookkeeping (connections are any hashable value, times are
given), so each rule is a row here; tests/test_connection_flood.py shows the
same rules against a real gateway over real sockets.
"""

from __future__ import annotations

import pytest

from gateway.capacity import ConnectionTable, Phase, Shed, budget


def table_with(capacity: int, *steps: tuple[str, str, float]) -> ConnectionTable[str]:
    """A table after ``steps``: (event, connection, time) with event one of
    open (a new connection; must not need room), head, request, idle, close.
    Steps come in the order they happen, so their times only go up."""
    table: ConnectionTable[str] = ConnectionTable(capacity)
    for event, connection, now in steps:
        if event == "open":
            assert table.opened(connection, now) is None
        elif event == "head":
            table.head_started(connection, now)
        elif event == "request":
            table.in_request(connection)
        elif event == "idle":
            table.idle(connection, now)
        elif event == "close":
            table.closed(connection)
        else:
            raise ValueError(event)
    return table


def served(connection: str, opened: float, done: float) -> list[tuple[str, str, float]]:
    """A connection that made one request and is now idle (kept alive) since ``done``."""
    return [("open", connection, opened), ("request", connection, 0), ("idle", connection, done)]


def busy(connection: str, opened: float) -> list[tuple[str, str, float]]:
    """A connection with a request in progress (a stream, an upload, a wait upstream)."""
    return [("open", connection, opened), ("request", connection, 0)]


@pytest.mark.parametrize(
    ("steps", "victim"),
    [
        # Below the cap nobody is closed: covered by table_with's own check.
        # Unfinished heads go first, the oldest of them.
        ([("open", "a", 1), ("open", "b", 2), ("open", "c", 3)], ("a", Shed.NO_HEAD)),
        # ...even when an idle connection is older than every one of them.
        ([*served("k", 0, 1), ("open", "a", 2), ("open", "b", 3)], ("a", Shed.NO_HEAD)),
        # "Oldest" is since the head began: a kept-alive connection whose
        # next head started late is younger than a connection opened after it.
        (
            [*served("k", 0, 1), ("open", "a", 2), ("head", "k", 4), ("open", "b", 5)],
            ("a", Shed.NO_HEAD),
        ),
        # No unfinished head but the newcomer's: the longest idle goes.
        ([*served("k", 0, 1), *served("j", 2, 3), *busy("s", 4)], ("k", Shed.IDLE)),
        # A request in progress is never closed, however old; idle goes instead.
        ([*busy("s", 0), *busy("t", 1), *served("k", 2, 3)], ("k", Shed.IDLE)),
        # Every other connection is in a request: the newcomer itself is refused.
        ([*busy("s", 0), *busy("t", 1), *busy("u", 2)], ("new", Shed.NO_ROOM)),
        # A connection that went idle and then began a new request is busy again.
        (
            [
                *served("k", 0, 1),
                ("head", "k", 2),
                ("request", "k", 0),
                *busy("s", 3),
                *busy("t", 4),
            ],
            ("new", Shed.NO_ROOM),
        ),
        # A closed connection frees its place: nothing to close below the cap.
        ([*busy("s", 0), *busy("t", 1), ("open", "a", 2), ("close", "a", 0)], None),
    ],
)
def test_the_victim_of_a_new_connection_at_the_cap(
    steps: list[tuple[str, str, float]], victim: tuple[str, Shed] | None
) -> None:
    table = table_with(3, *steps)
    assert table.opened("new", 10) == victim
    assert len(table) <= 3


def test_a_chosen_connection_is_no_longer_counted_nor_chosen_again() -> None:
    table = table_with(2, ("open", "a", 1), ("open", "b", 2))
    assert table.opened("c", 3) == ("a", Shed.NO_HEAD)
    assert table.phase("a") is None
    # Its events until the socket is gone change nothing...
    table.head_started("a", 4)
    table.in_request("a")
    table.idle("a", 5)
    table.closed("a")
    assert table.phase("a") is None
    # ...and the next newcomer closes the next oldest.
    assert table.opened("d", 6) == ("b", Shed.NO_HEAD)
    assert len(table) == 2


def test_phases_and_since_when() -> None:
    table = table_with(10, ("open", "a", 1), *served("k", 2, 3), *busy("s", 4))
    assert table.phase("a") == (Phase.HEAD, 1)
    assert table.phase("k") == (Phase.IDLE, 3)
    assert table.phase("s") == (Phase.REQUEST, None)
    table.head_started("k", 7)
    assert table.phase("k") == (Phase.HEAD, 7)
    assert len(table) == 3
    table.closed("s")
    assert table.phase("s") is None
    assert len(table) == 2


def test_a_refused_newcomer_is_not_counted() -> None:
    table = table_with(1, *busy("s", 0))
    assert table.opened("new", 1) == ("new", Shed.NO_ROOM)
    assert len(table) == 1
    assert table.phase("new") is None


@pytest.mark.parametrize(
    ("fd_limit", "max_connections", "backlog"),
    [
        # The probe's limit: a full backlog and 56 client connections, each
        # with an upstream connection, fit beside the process's own 32.
        (256, 56, 112),
        (1024, 224, 448),
        # Large limits: uvicorn's default backlog, the rest to connections.
        (65536, 31680, 2048),
        (1 << 20, 523200, 2048),
    ],
)
def test_the_budget_leaves_room_below_the_descriptor_limit(
    fd_limit: int, max_connections: int, backlog: int
) -> None:
    room = budget(fd_limit)
    assert (room.max_connections, room.backlog) == (max_connections, backlog)
    reserved = min(128, fd_limit // 8)
    assert reserved + 2 * room.max_connections + room.backlog <= fd_limit


def test_a_configured_cap_is_kept_and_the_safe_one_reported() -> None:
    room = budget(256, 1000)
    assert room.max_connections == 1000
    assert room.safe_max_connections == 56
