"""The embedded store: the same contract as Redis, inside one process.

For trying the gateway with nothing else installed, and for tests that drive
the window with a controllable clock. State is per process: replicas (or
uvicorn workers) each keep their own, so limits are not shared. The gateway
logs a warning saying so at start-up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.ratelimit import Decision, Identity, Outcome, Window
from gateway.store.base import (
    AdmitRequest,
    AuditEntry,
    IssuedSession,
    RevokeResult,
    SessionInfo,
    SessionRecord,
    Store,
)

AUDIT_MAXLEN = 10_000

V = TypeVar("V")


@dataclass(slots=True)
class _Expiring(Generic[V]):
    value: V
    until: float  # clock seconds


@dataclass(slots=True)
class _SlidingWindow:
    # µs, ascending. A deque: each admission is appended once and popped once,
    # so pruning costs O(1) amortised even for limits in the millions.
    times: deque[int] = field(default_factory=deque)

    def state(self, now: int, window: int) -> tuple[int, int, int]:
        """Prune and return (count, µs until oldest leaves, µs until newest leaves)."""
        times = self.times
        cutoff = now - window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            return 0, 0, 0
        return len(times), times[0] + window - now, times[-1] + window - now


def _ms(us: int) -> int:
    return -(-us // 1000)


class MemoryStore(Store):
    name = "embedded"

    def __init__(
        self,
        *,
        window_seconds: int = 60,
        retention_seconds: int = 3600,
        revocation_ttl_seconds: int = 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._window = window_seconds * 1_000_000
        self._retention = retention_seconds
        self._revocation_ttl = revocation_ttl_seconds
        self._clock = clock
        self._sessions: dict[str, _Expiring[SessionRecord]] = {}  # by hash
        self._revoked: dict[str, _Expiring[bool]] = {}  # by hash
        self._sid_hash: dict[str, _Expiring[str]] = {}  # sid -> hash
        self._sid_revoked: dict[str, _Expiring[bool]] = {}
        self._windows: dict[str, _SlidingWindow] = {}  # "s:" + hash | "u:" + user
        self._audit: list[AuditEntry] = []
        self._audit_seq = 0
        self._listeners: set[asyncio.Queue[str]] = set()
        self._admits = 0

    def _get(self, table: dict[str, _Expiring[V]], key: str) -> V | None:
        entry = table.get(key)
        if entry is None:
            return None
        if entry.until <= self._clock():
            del table[key]
            return None
        return entry.value

    def _keep_until(self, expires_at: int | None) -> float:
        if expires_at is None:
            return self._clock() + self._revocation_ttl
        return max(expires_at + self._retention, self._clock() + 60)

    async def admit(self, request: AdmitRequest) -> Decision:
        now = int(self._clock() * 1_000_000)
        self._admits += 1
        if self._admits % 4096 == 0:
            self._sweep()
        if self._get(self._revoked, request.secret_hash) is not None:
            return Decision(Outcome.REVOKED)
        record = self._get(self._sessions, request.secret_hash)
        identity = None
        if record is None:
            if not request.allow_unknown:
                return Decision(Outcome.UNKNOWN)
            limit, user = request.default_limit, None
        else:
            if record.expires_at * 1_000_000 <= now:
                return Decision(Outcome.EXPIRED)
            limit, user = record.limit, record.user
            identity = Identity(
                record.session_id,
                record.user,
                record.workflow_id,
                record.workflow_version,
                record.expires_at,
            )

        session = self._windows.setdefault("s:" + request.secret_hash, _SlidingWindow())
        count, wait, reset = session.state(now, self._window)
        if count >= limit:
            return Decision(Outcome.RATE_LIMITED, Window(limit, 0, _ms(wait), _ms(reset)))
        user_window = None
        if request.user_limit and user:  # no user, no user window (as in Redis)
            user_window = self._windows.setdefault("u:" + user, _SlidingWindow())
            ucount, uwait, ureset = user_window.state(now, self._window)
            if ucount >= request.user_limit:
                return Decision(
                    Outcome.USER_RATE_LIMITED,
                    Window(limit, limit - count, _ms(wait), _ms(reset)),
                    Window(request.user_limit, 0, _ms(uwait), _ms(ureset)),
                )
        session.times.append(now)
        admitted_session = Window(
            limit, limit - count - 1, _ms(wait if count else self._window), _ms(self._window)
        )
        if user_window is None or request.user_limit is None:
            return Decision(Outcome.ADMITTED, admitted_session, None, identity)
        user_window.times.append(now)
        return Decision(
            Outcome.ADMITTED,
            admitted_session,
            Window(
                request.user_limit,
                request.user_limit - ucount - 1,
                _ms(uwait if ucount else self._window),
                _ms(self._window),
            ),
            identity,
        )

    async def register(self, record: SessionRecord) -> bool:
        until = self._keep_until(record.expires_at)
        self._sessions[record.secret_hash] = _Expiring(record, until)
        self._sid_hash[record.session_id] = _Expiring(record.secret_hash, until)
        born_revoked = self._get(self._sid_revoked, record.session_id) is not None
        if born_revoked:
            self._revoked[record.secret_hash] = _Expiring(True, until)
        self._sweep()
        return born_revoked

    async def secret_hash_for(self, session_id: str) -> str | None:
        return self._get(self._sid_hash, session_id)

    async def issued_session(self, session_id: str) -> IssuedSession | None:
        secret_hash = self._get(self._sid_hash, session_id)
        record = self._get(self._sessions, secret_hash) if secret_hash else None
        if record is None or secret_hash is None or not record.issued:
            return None
        revoked = (
            self._get(self._revoked, secret_hash) is not None
            or self._get(self._sid_revoked, session_id) is not None
        )
        return IssuedSession(record.document, secret_hash, record.expires_at, revoked)

    async def revoke(
        self, *, secret_hash: str | None, session_id: str | None, reason: str, replica: str
    ) -> RevokeResult:
        already = True
        registered = False
        if session_id is not None:
            if self._get(self._sid_revoked, session_id) is None:
                already = False
                self._sid_revoked[session_id] = _Expiring(True, self._keep_until(None))
            if secret_hash is None:
                secret_hash = await self.secret_hash_for(session_id)
        if secret_hash is not None:
            record = self._get(self._sessions, secret_hash)
            expires_at = None
            if record is not None:
                registered = True
                expires_at = record.expires_at
                session_id = session_id or record.session_id
            if self._get(self._revoked, secret_hash) is None:
                already = False
                self._revoked[secret_hash] = _Expiring(True, self._keep_until(expires_at))
            for queue in self._listeners:
                queue.put_nowait(secret_hash)
        self._audit_seq += 1
        self._audit.append(
            AuditEntry(
                id=str(self._audit_seq),
                session_id=session_id,
                secret_hash_prefix=secret_hash[:12] if secret_hash else None,
                reason=reason,
                replica=replica,
                at=self._clock(),
            )
        )
        del self._audit[:-AUDIT_MAXLEN]
        return RevokeResult(secret_hash, session_id, already, registered)

    async def lookup(self, session_id: str) -> SessionInfo | None:
        sid_revoked = self._get(self._sid_revoked, session_id) is not None
        secret_hash = await self.secret_hash_for(session_id)
        record = self._get(self._sessions, secret_hash) if secret_hash else None
        if record is None or secret_hash is None:
            if sid_revoked:
                return SessionInfo(session_id, "revoked", None, None, None, None, None)
            return None
        if sid_revoked or self._get(self._revoked, secret_hash) is not None:
            status = "revoked"
        elif record.expires_at <= self._clock():
            status = "expired"
        else:
            status = "active"
        window = self._windows.get("s:" + secret_hash, _SlidingWindow())
        used, _, _ = window.state(int(self._clock() * 1_000_000), self._window)
        return SessionInfo(
            session_id=session_id,
            status=status,
            user=record.user,
            limit=record.limit,
            remaining=max(record.limit - used, 0),
            expires_at=record.expires_at,
            secret_hash_prefix=secret_hash[:12],
        )

    async def audit_tail(self, count: int) -> list[AuditEntry]:
        return self._audit[-count:] if count > 0 else []

    async def revoked_among(self, secret_hashes: Collection[str]) -> set[str]:
        return {h for h in secret_hashes if self._get(self._revoked, h) is not None}

    async def revocations(self) -> AsyncIterator[str | None]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)

    async def ping(self) -> None:
        return None

    async def now(self) -> float:
        return self._clock()

    def _sweep(self) -> None:
        """Drop expired entries now and then, so memory stays bounded."""
        now = self._clock()
        for table in (self._sessions, self._revoked, self._sid_hash, self._sid_revoked):
            if len(table) > 1024:
                for key in [k for k, v in table.items() if v.until <= now]:
                    del table[key]
        if len(self._windows) > 1024:
            now_us = int(now * 1_000_000)
            for key in [
                k for k, w in self._windows.items() if w.state(now_us, self._window)[0] == 0
            ]:
                del self._windows[key]
