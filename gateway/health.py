"""What /readyz reports, and the store check behind it.

Readiness means "this process accepts traffic": started and not draining.
It does not follow the store by default: in the sidecar layout the gateway's
readiness is the pod's, and a Redis blip would take every application pod out
of its Service at once, including traffic that never needs Redis (client
routes answer 503 ``store_unavailable`` on their own meanwhile).
``GATEWAY_READINESS_REQUIRES_STORE=true`` opts back in.

The store is checked in the background, so a probe never waits on a hung Redis
(kubelet's probe timeout is one second) and ``chatkit_gateway_store_up`` stays
current between probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.errors import StoreUnavailable
from gateway.logs import Throttled
from gateway.metrics import Metrics
from gateway.store.base import Store

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0


class StoreMonitor:
    """Pings the store every ``interval`` seconds; logs each change of state once."""

    def __init__(
        self,
        store: Store,
        *,
        metrics: Metrics,
        interval: float,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._crashes = Throttled(logger, 60.0)
        #: None until the first check has finished.
        self.up: bool | None = None
        self.error: str | None = None
        self.checked_at: float | None = None

    async def check(self) -> bool:
        """Ping once and record the result."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._store.ping()
        except (StoreUnavailable, TimeoutError) as exc:
            self._record(False, str(exc) or "the store did not answer in time")
        else:
            self._record(True, None)
        return bool(self.up)

    def _record(self, up: bool, error: str | None) -> None:
        if up != self.up:
            if up:
                logger.info("The store is reachable (%s)", self._store.name)
            else:
                logger.warning("The store is unreachable (%s): %s", self._store.name, error)
        self.up = up
        self.error = error
        self.checked_at = self._clock()
        self._metrics.store_up.set(1 if up else 0)
        # Read live on a single process (set_function); with several workers
        # the scrape sums files, so the value is also written at each check.
        self._metrics.store_full.set(1 if self._store.full else 0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        # Supervised: a bug in a check must not stop the checks for good, or
        # the gauge would freeze at its last value.
        backoff = self._interval
        while True:
            try:
                await self.check()
                backoff = self._interval
            except Exception as exc:
                self._crashes.error("The store check failed unexpectedly: %r", exc)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            await asyncio.sleep(backoff)

    def report(self) -> dict[str, object]:
        """The store's part of the /readyz body."""
        out: dict[str, object] = {"backend": self._store.name, "up": self.up}
        if self.error is not None:
            out["error"] = self.error
        return out
