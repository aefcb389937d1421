"""The scale soak's long SSE streams: a population kept open, and the revocation cut-off.

:class:`StreamKeeper` holds ``target`` client streams open through the
replicas, each on one of the stream sessions, and opens a new one whenever
one ends, so the population stays at its size for the whole soak. Every
stream is recorded: when its request was sent, when its response started,
when it ended.

:func:`cutoffs` then checks what a cancel promises: every stream of the
cancelled session that had been admitted is closed, on whichever replica it
runs, within ``limit`` seconds of the cancel's answer.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

#: Streams whose request is on its way at once while the population is refilled.
OPENING = 64


@dataclass
class Stream:
    session: str
    replica: str
    sent: float
    status: int = 0
    started: float | None = None  # the response's 200 (its headers) arrived
    ended: float | None = None  # the client saw the end: EOF, a cut, an error
    held: bool = False  # still open when the soak ended (closed by the soak itself)


@dataclass(frozen=True)
class Cancel:
    session: str
    sent: float
    answered: float  # when the cancel's 200 arrived
    pending: bool  # the revocation was answered "pending" (the store was away)


@dataclass
class Cutoffs:
    """Streams of cancelled sessions, and how long each took to close after the cancel."""

    delays: list[float] = field(default_factory=list)  # stored cancels
    late: list[float] = field(default_factory=list)  # stored cancels, over the limit
    open_at_end: int = 0  # stored cancels: still open when the soak ended
    pending_delays: list[float] = field(default_factory=list)
    pending_open_at_end: int = 0
    #: Admitted streams that ended while the soak went on, with no cancel of
    #: their session under way (nothing else should end one).
    unexplained: int = 0


def cutoffs(streams: Sequence[Stream], cancels: Sequence[Cancel], *, limit: float) -> Cutoffs:
    """Each admitted stream of a cancelled session against its cancel's answer.

    A stream counts when it was admitted at all, before or after the cancel's
    answer (a request sent before the cancel may be admitted just before the
    revocation reached its replica): either way the replica must cut it. A
    cut may reach the client before the cancel's own answer: that is a delay
    of 0.
    """
    by_session: dict[str, list[Cancel]] = {}
    for each in cancels:
        by_session.setdefault(each.session, []).append(each)
    found = Cutoffs()
    for stream in streams:
        if stream.status != 200:
            continue
        cancel = next(
            (
                c
                for c in by_session.get(stream.session, ())
                if stream.sent <= c.answered and (stream.ended is None or stream.ended >= c.sent)
            ),
            None,
        )
        if cancel is None:
            found.unexplained += stream.ended is not None and not stream.held
            continue
        if stream.held or stream.ended is None:
            if cancel.pending:
                found.pending_open_at_end += 1
            else:
                found.open_at_end += 1
            continue
        delay = max(0.0, stream.ended - cancel.answered)
        if cancel.pending:
            found.pending_delays.append(delay)
            continue
        found.delays.append(delay)
        if delay > limit:
            found.late.append(delay)
    return found


class StreamKeeper:
    """Keeps ``target`` SSE streams open on live sessions through the replicas."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        replicas: Sequence[str],
        sessions: Callable[[], Sequence[tuple[str, str]]],
        *,
        target: int,
        interval: float,
        rng: random.Random,
    ) -> None:
        self._http = http
        self._replicas = list(replicas)
        self._sessions = sessions  # (session id, secret) of the live stream sessions
        self._target = target
        self._interval = interval
        self._rng = rng
        self._opening = asyncio.Semaphore(OPENING)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.streams: list[Stream] = []
        self.open = 0  # responses started and not ended
        self.open_by_replica: Counter[str] = Counter()

    @property
    def live(self) -> int:
        """Streams open or on their way."""
        return len(self._tasks)

    async def fill(self, *, within: float) -> None:
        """Open streams until ``target`` are open at once; fails after ``within`` seconds."""
        async with asyncio.timeout(within):
            while self.open < self._target:
                self._top_up()
                self._changed.clear()
                await self._changed.wait()

    async def keep(self, deadline: float) -> None:
        """Replace every stream that ends until ``deadline`` (monotonic)."""
        while (left := deadline - time.monotonic()) > 0:
            self._top_up()
            self._changed.clear()
            try:
                async with asyncio.timeout(left):
                    await self._changed.wait()
            except TimeoutError:
                return

    async def close(self) -> None:
        """End every stream still open (the soak is over: these are not failures)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _top_up(self) -> None:
        while len(self._tasks) < self._target:
            task = asyncio.create_task(self._one())
            self._tasks.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._changed.set()

    async def _one(self) -> None:
        pool = self._sessions()
        if not pool:
            await asyncio.sleep(0.1)  # every stream session is being replaced
            return
        session, secret = self._rng.choice(pool)
        replica = self._rng.choice(self._replicas)
        url = f"{replica}/v1/chatkit/conversation?events=1000000&interval={self._interval}"
        headers = {"Authorization": f"Bearer {secret}", "Accept": "text/event-stream"}
        async with self._opening:
            stream = Stream(session, replica, time.monotonic())
            self.streams.append(stream)
            try:
                response = await self._http.post(
                    url, json={}, headers=headers, timeout=aiohttp.ClientTimeout(sock_connect=10)
                )
            except (aiohttp.ClientError, TimeoutError):
                stream.ended = time.monotonic()
                return
        stream.status = response.status
        stream.started = time.monotonic()
        counted = response.status == 200
        if counted:
            self.open += 1
            self.open_by_replica[replica] += 1
            self._changed.set()
        try:
            # Read to the end: for a stream, until the gateway cuts it.
            async for _ in response.content:
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass  # cut off mid-body: what a revoked stream looks like to a client
        except asyncio.CancelledError:
            stream.held = True
            raise
        finally:
            stream.ended = time.monotonic()
            response.release()
            if counted:
                self.open -= 1
                self.open_by_replica[replica] -= 1
