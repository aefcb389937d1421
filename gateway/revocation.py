"""Revocation that is never lost, and the closing of streams it cuts off.

A revocation is written to the store; if the store cannot take it (Redis
down, paused, failing over) it is kept in a local pending set, enforced by
this replica at once, and stored as soon as the store answers again.
Streams in flight for a revoked secret are closed here and, through the
store's revocation channel, on every other replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import NotReplicated, StoreUnavailable
from gateway.metrics import Metrics
from gateway.store.base import RevokeResult, Store

logger = logging.getLogger(__name__)

# While revocations are pending, the store is probed this often.
PROBE_SECONDS = 0.05
# A listener that fails again and again is restarted at most this often.
LISTENER_BACKOFF = (0.1, 5.0)
# A listener that ran this long before failing starts over at the short delay.
LISTENER_HEALTHY_SECONDS = 30.0
# First and longest pause between attempts to re-check open streams.
RECHECK_DELAYS = (0.1, 1.0)


@dataclass(frozen=True, slots=True)
class PendingRevocation:
    secret_hash: str | None
    session_id: str | None
    reason: str


class Revoker:
    def __init__(self, store: Store, *, replica: str, metrics: Metrics) -> None:
        self._store = store
        self._replica = replica
        self._metrics = metrics
        self._pending: dict[tuple[str | None, str | None], PendingRevocation] = {}
        self._local: set[str] = set()
        self._streams: dict[str, set[Callable[[], None]]] = {}
        self._retry_task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._listener_up = False

    # -- what the hot path asks -----------------------------------------------

    def is_revoked_locally(self, secret_hash: str) -> bool:
        return secret_hash in self._local

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def listener_state(self) -> str:
        """For /readyz: "up", "restarting" (after a failure) or "stopped"."""
        if self._listener is None or self._listener.done():
            return "stopped"
        return "up" if self._listener_up else "restarting"

    # -- revoking -------------------------------------------------------------

    async def revoke(
        self, *, secret_hash: str | None, session_id: str | None, reason: str
    ) -> RevokeResult | None:
        """Revoke now; on a store failure keep it pending and return None."""
        if secret_hash is not None:
            # Enforced here before the store is even asked: from this moment
            # this replica admits nothing with the secret.
            self._local.add(secret_hash)
            self.close_streams(secret_hash)
        try:
            result = await self._store.revoke(
                secret_hash=secret_hash, session_id=session_id, reason=reason, replica=self._replica
            )
        except StoreUnavailable as exc:
            logger.warning("Revocation kept pending, the store failed: %s", exc)
            self._keep(PendingRevocation(secret_hash, session_id, reason))
            return None
        if secret_hash is not None:
            self._forget_local(secret_hash)
        if result.secret_hash is not None and result.secret_hash != secret_hash:
            self.close_streams(result.secret_hash)
        self._metrics.revocations.labels(reason, str(result.registered).lower()).inc()
        return result

    async def revoke_now(
        self, *, secret_hash: str, session_id: str | None, reason: str
    ) -> RevokeResult:
        """Revoke in the store, or raise StoreUnavailable and change nothing.

        For a caller that answers for the revocation itself (the issuer's
        cancel): it says 503 and is asked again, so nothing is kept pending.
        Except when the master took it and too few replicas acknowledged it
        (NotReplicated): the secret is refused from then on, so the caller's
        retry finds it cancelled and asks nothing; here it stays pending
        until the replicas have it.
        """
        try:
            result = await self._store.revoke(
                secret_hash=secret_hash, session_id=session_id, reason=reason, replica=self._replica
            )
        except NotReplicated as exc:
            logger.warning("Revocation kept pending: %s", exc)
            self._local.add(secret_hash)
            self.close_streams(secret_hash)
            self._keep(PendingRevocation(secret_hash, session_id, reason))
            raise
        self.close_streams(secret_hash)
        self._metrics.revocations.labels(reason, str(result.registered).lower()).inc()
        return result

    def _keep(self, item: PendingRevocation) -> None:
        self._pending[(item.secret_hash, item.session_id)] = item
        self._metrics.revocations_pending.set(len(self._pending))
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_until_stored())

    def _forget_local(self, secret_hash: str) -> None:
        """The store holds the revocation now, unless another pending one needs it."""
        if not any(item.secret_hash == secret_hash for item in self._pending.values()):
            self._local.discard(secret_hash)

    async def _retry_until_stored(self) -> None:
        """Store what is pending as soon as the store answers again.

        Not on a backoff: until a pending revocation is stored, other
        replicas admit the secret as soon as the store is back. A probe
        waits on the store (a paused Redis answers it the moment it resumes)
        or retries every PROBE_SECONDS, so the revocation is stored within a
        probe interval plus a round trip of the store's return.
        """
        while self._pending:
            await self._until_reachable()
            for key, item in list(self._pending.items()):
                try:
                    result = await self._store.revoke(
                        secret_hash=item.secret_hash,
                        session_id=item.session_id,
                        reason=item.reason,
                        replica=self._replica,
                    )
                except StoreUnavailable:
                    await asyncio.sleep(PROBE_SECONDS)
                    break
                del self._pending[key]
                self._metrics.revocations_pending.set(len(self._pending))
                if item.secret_hash is not None:
                    self._forget_local(item.secret_hash)
                if result.secret_hash is not None:
                    self.close_streams(result.secret_hash)
                self._metrics.revocations.labels(item.reason, str(result.registered).lower()).inc()
                logger.info("Pending revocation stored (%d left)", len(self._pending))

    async def _until_reachable(self) -> None:
        while True:
            try:
                await self._store.ping()
            except StoreUnavailable:
                await asyncio.sleep(PROBE_SECONDS)
            else:
                return

    # -- streams in flight ----------------------------------------------------

    def track(self, secret_hash: str, close: Callable[[], None]) -> None:
        self._streams.setdefault(secret_hash, set()).add(close)

    def untrack(self, secret_hash: str, close: Callable[[], None]) -> None:
        closers = self._streams.get(secret_hash)
        if closers is not None:
            closers.discard(close)
            if not closers:
                del self._streams[secret_hash]

    def close_streams(self, secret_hash: str) -> None:
        for close in self._streams.pop(secret_hash, ()):
            self._metrics.streams_closed.inc()
            close()

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._listener = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        """Keep the listener running whatever it raises.

        Without it no stream on this replica is closed by a revocation made
        elsewhere, and nothing says so: a failure is logged, counted and
        followed by a restart with backoff, and the streams held meanwhile
        are re-checked, since announcements made in between are lost.
        """
        loop = asyncio.get_running_loop()
        low, high = LISTENER_BACKOFF
        delay = low
        first = True
        while True:
            started = loop.time()
            self._set_listener_up(True)
            try:
                if not first:
                    self._start_recheck()
                first = False
                await self._listen()
                raise RuntimeError("the revocation feed ended")
            except Exception:
                logger.exception("Revocation listener failed; restarting in %.1f s", delay)
            self._set_listener_up(False)
            self._metrics.revocation_listener_restarts.inc()
            if loop.time() - started >= LISTENER_HEALTHY_SECONDS:
                delay = low
            await asyncio.sleep(delay)
            delay = min(delay * 2, high)

    def _set_listener_up(self, up: bool) -> None:
        self._listener_up = up
        self._metrics.revocation_listener_up.set(1 if up else 0)

    async def _listen(self) -> None:
        async for secret_hash in self._store.revocations():
            if secret_hash is None:
                self._start_recheck()
            else:
                self.close_streams(secret_hash)

    def _start_recheck(self) -> None:
        # A re-check still running may have read before this gap's
        # revocations were made: start over rather than trust it.
        if self._recheck is not None:
            self._recheck.cancel()
        self._recheck = asyncio.create_task(self._recheck_streams())

    async def _recheck_streams(self) -> None:
        """The feed had a gap: close the streams whose secret was revoked meanwhile.

        Retried until it succeeds: the feed often resumes before the store
        answers reads again (a blackholed connection still waits out its
        timeout), and a revocation missed here is never announced again.
        """
        delay = RECHECK_DELAYS[0]
        while self._streams:
            try:
                revoked = await self._store.revoked_among(list(self._streams))
            except StoreUnavailable as exc:
                if delay == RECHECK_DELAYS[0]:  # once per gap, not once per attempt
                    logger.warning("Open streams not re-checked yet after a feed gap: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECHECK_DELAYS[1])
                continue
            for secret_hash in revoked:
                self.close_streams(secret_hash)
            return

    async def stop(self, *, flush_timeout: float = 5.0) -> None:
        for task in (self._listener, self._recheck):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._listener is not None:
            self._set_listener_up(False)
        if self._retry_task is not None and not self._retry_task.done():
            # One last chance to store what is pending before the process ends.
            try:
                await asyncio.wait_for(asyncio.shield(self._retry_task), flush_timeout)
            except TimeoutError:
                logger.error(
                    "%d revocations could not be stored before shutdown", len(self._pending)
                )
            self._retry_task.cancel()
            await asyncio.gather(self._retry_task, return_exceptions=True)
