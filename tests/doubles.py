"""In-process stand-ins: a clock the test moves, a store that can fail, the app without a server.

For fast tests of the components between the socket and the store
(:class:`~gateway.admission.Gatekeeper`, :class:`~gateway.revocation.Revoker`):
the embedded store with a clock the test controls decides exactly as the
contract suite proves Redis does, and an outage is a flag, not a paused process.
For the app's own endpoints, ``started`` and ``asgi_get`` drive
:class:`~gateway.app.GatewayApp` through its ASGI interface in the test's loop;
``serving_in_process`` puts it behind a real uvicorn server in that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Collection, Iterator
from typing import Any

import uvicorn

from gateway import lifecycle
from gateway.app import GatewayApp
from gateway.errors import StoreUnavailable
from gateway.ratelimit import Decision
from gateway.store.base import AdmitRequest, RevokeResult
from gateway.store.memory import MemoryStore
from gateway.types import ASGIApp, Message
from tests.harness import eventually, free_port


class FakeClock:
    """A clock a test moves by hand: seconds since the epoch, held in whole µs.

    Whole microseconds keep steps exact; the stores read ``int(seconds * 1e6)``
    and get back the microsecond that was set.
    """

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.us = round(start * 1_000_000)

    def __call__(self) -> float:
        return self.us / 1_000_000

    def at(self, us: int) -> None:
        """Move to ``us`` microseconds; time only moves forward."""
        if us < self.us:
            raise ValueError("time only moves forward")
        if int(us / 1_000_000 * 1_000_000) != us:
            raise ValueError(f"{us} µs does not survive the stores' float seconds exactly")
        self.us = us

    def set(self, seconds: float) -> None:
        """Move to ``seconds`` unless the clock is already past it."""
        self.us = max(self.us, round(seconds * 1_000_000))

    def advance(self, seconds: float) -> None:
        self.at(self.us + round(seconds * 1_000_000))


class OutageStore(MemoryStore):
    """The embedded store, failing every call like an unreachable Redis while ``down``.

    ``calls`` counts the operations asked of it, up or down, so a test can
    prove a decision was made without the store.
    """

    def __init__(self, *, clock: FakeClock, window_seconds: int = 60) -> None:
        super().__init__(window_seconds=window_seconds, clock=clock)
        self.down = False
        self.calls = 0

    def _ask(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("the store is unreachable (a test's outage)")

    async def admit(self, request: AdmitRequest) -> Decision:
        self._ask()
        return await super().admit(request)

    async def revoke(
        self, *, secret_hash: str | None, session_id: str | None, reason: str, replica: str
    ) -> RevokeResult:
        self._ask()
        return await super().revoke(
            secret_hash=secret_hash, session_id=session_id, reason=reason, replica=replica
        )

    async def revoked_among(self, secret_hashes: Collection[str]) -> set[str]:
        self._ask()
        return await super().revoked_among(secret_hashes)

    async def ping(self) -> None:
        self._ask()


@contextlib.contextmanager
def collector_restored() -> Iterator[None]:
    """Undo, on exit, what the app's start-up does to the garbage collector.

    Start-up freezes and retunes the collector for a long-running server; the
    rest of the pytest process should not run that way.
    """
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@contextlib.asynccontextmanager
async def started(app: GatewayApp) -> AsyncIterator[GatewayApp]:
    """``app`` started in this event loop (no server), shut down on exit."""
    with collector_restored():
        await app.startup()
        try:
            yield app
        finally:
            await app.shutdown()


async def asgi_get(app: ASGIApp, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI interface: (status, body). The endpoints need no server."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"a")],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


@contextlib.asynccontextmanager
async def serving_in_process(app: GatewayApp, **config: Any) -> AsyncIterator[int]:
    """``app`` under uvicorn on a free port, in this test's event loop; yields the port.

    ``config`` goes to :class:`uvicorn.Config` (``http=GatewayHttpProtocol``
    for the gateway's own connection handling). What start-up does to the
    garbage collector, and the draining flag that stopping the gateway's
    protocol sets for the whole process, are undone on exit.
    """
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None, **config)
    )
    with collector_restored():
        task = asyncio.create_task(server.serve())
        try:

            def up() -> bool:
                assert not task.done(), task
                return bool(server.started)

            await eventually(up, timeout=10, what="uvicorn to start")
            yield port
        finally:
            server.should_exit = True
            await task
            lifecycle.draining.clear()
