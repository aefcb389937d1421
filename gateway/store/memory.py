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
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gateway.auth import split_tag
from gateway.chatkit import RequestClass
from gateway.model.budgets import (
    LONGEST_WINDOW_SECONDS,
    NO_CHARGE,
    BudgetDecision,
    BudgetKey,
    BudgetLimit,
    Charge,
    ChargeRecord,
    Reservation,
    Spent,
    decide,
)
from gateway.policy import parse_spec
from gateway.ratelimit import ClassWindow, Decision, Identity, Outcome, Window
from gateway.store.base import (
    AdmitRequest,
    AppStats,
    AuditEntry,
    IndexedSession,
    IssuedSession,
    ModelGrant,
    RevokeResult,
    SessionInfo,
    SessionRecord,
    SessionSlot,
    SessionWindows,
    SlotDecision,
    SlotOutcome,
    Store,
    WindowUse,
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
    length: int = 0  # µs; 0: the store's session window

    def state(self, now: int, window: int) -> tuple[int, int, int]:
        """Prune and return (count, µs until oldest leaves, µs until newest leaves)."""
        times = self.times
        cutoff = now - window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            return 0, 0, 0
        return len(times), times[0] + window - now, times[-1] + window - now

    def live(self, now: int, window: int) -> int:
        """How many are in the window, without pruning: what an operator reads."""
        cutoff = now - window
        count = 0
        for at in reversed(self.times):
            if at <= cutoff:
                break
            count += 1
        return count


@dataclass(slots=True)
class _Reservation:
    session_id: str
    charge: Charge
    model: str
    lease_end: float  # clock seconds


@dataclass(slots=True)
class _Budget:
    """One user's model calls in one workflow: charges oldest first, and
    reservations of calls in flight by call id."""

    charges: deque[ChargeRecord] = field(default_factory=deque)
    flight: dict[str, _Reservation] = field(default_factory=dict)


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
        self.window_seconds = window_seconds
        self._window = window_seconds * 1_000_000
        self._retention = retention_seconds
        self._revocation_ttl = revocation_ttl_seconds
        self._clock = clock
        self._sessions: dict[str, _Expiring[SessionRecord]] = {}  # by hash
        self._revoked: dict[str, _Expiring[bool]] = {}  # by hash
        self._sid_hash: dict[str, _Expiring[str]] = {}  # sid -> hash
        self._sid_revoked: dict[str, _Expiring[bool]] = {}
        self._windows: dict[str, _SlidingWindow] = {}  # "s:" + hash | "u:" + user
        self._model_tokens: dict[str, _Expiring[ModelGrant]] = {}  # by token hash
        self._budgets: dict[tuple[str, str], _Budget] = {}  # by (workflow, user)
        self._audit: list[AuditEntry] = []
        self._audit_seq = 0
        self._listeners: set[asyncio.Queue[str]] = set()
        self._admits = 0
        # Apps and users (see Store.open_session): a user's active sessions
        # by id, the users' bans, each app's creates and active sessions.
        self._user_index: dict[str, dict[str, IndexedSession]] = {}
        self._bans: dict[str, _Expiring[bool]] = {}
        self._app_creates: dict[str, _SlidingWindow] = {}
        self._app_active: dict[str, dict[str, int]] = {}  # app -> sid -> expires_at
        self._opened_at: dict[str, int] = {}  # sid -> µs, its entry in the app's window

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
                record.max_file_bytes,
                record.configuration,
                record.app,
            )
            need = request.need
            if need:
                if need == "history" and not record.history:
                    return Decision(Outcome.HISTORY_DISABLED)
                if need != "history" and not record.uploads:
                    return Decision(Outcome.UPLOADS_DISABLED)
                if (
                    need == "attach"
                    and record.max_file_bytes
                    and request.declared_size > record.max_file_bytes
                ):
                    return Decision(Outcome.FILE_TOO_LARGE)
            if request.model is not None and record.models and request.model not in record.models:
                return Decision(Outcome.MODEL_NOT_ALLOWED)

        windows = self._windows_of(request, record, limit, user)
        states = [w.state(now, length) for w, length, _, _, _ in windows]
        refused = None
        for i, ((_, _, lim, _, _), (count, wait, _)) in enumerate(
            zip(windows, states, strict=True)
        ):
            if count >= lim and (refused is None or wait > states[refused][1]):
                refused = i
        session = user_window = class_window = None
        for i, ((sliding, length, lim, outcome, name), (count, wait, reset)) in enumerate(
            zip(windows, states, strict=True)
        ):
            if refused is None:
                sliding.times.append(now)
                state = Window(lim, lim - count - 1, _ms(wait if count else length), _ms(length))
            else:
                remaining = 0 if i == refused else max(lim - count, 0)
                state = Window(lim, remaining, _ms(wait), _ms(reset))
            if outcome is Outcome.RATE_LIMITED:
                session = state
            elif outcome is Outcome.USER_RATE_LIMITED:
                user_window = state
            elif outcome is Outcome.CLASS_RATE_LIMITED:
                candidate = ClassWindow(
                    request.cls, "user" if name[0] == "u" else "session", int(name[1:]), state
                )
                if refused is not None and windows[refused][3] is Outcome.CLASS_RATE_LIMITED:
                    if i == refused:
                        class_window = candidate
                elif class_window is None or state.remaining < class_window.window.remaining:
                    class_window = candidate
        if refused is not None:
            return Decision(windows[refused][3], session, user_window, identity, class_window)
        if request.token and record is not None:
            self._model_tokens[request.token] = _Expiring(
                ModelGrant(
                    request.secret_hash,
                    record.session_id,
                    record.user,
                    record.workflow_id,
                    request.request_id,
                    record.expires_at,
                ),
                float(record.expires_at),
            )
        return Decision(Outcome.ADMITTED, session, user_window, identity, class_window, str(now))

    async def unadmit(self, request: AdmitRequest, member: str) -> None:
        record = self._get(self._sessions, request.secret_hash)
        if record is None:
            limit, user = request.default_limit, None
        else:
            limit, user = record.limit, record.user
        if request.token:
            self._model_tokens.pop(request.token, None)
        at = int(member)
        for sliding, _, _, _, _ in self._windows_of(request, record, limit, user):
            # Another admission of the same µs counts the same: either goes.
            if at in sliding.times:
                sliding.times.remove(at)

    def _windows_of(
        self, request: AdmitRequest, record: SessionRecord | None, limit: int, user: str | None
    ) -> list[tuple[_SlidingWindow, int, int, Outcome, str]]:
        """The windows a request counts in, as admit.lua builds them:
        (window, length µs, limit, outcome, class window spec)."""
        windows: list[tuple[_SlidingWindow, int, int, Outcome, str]] = []
        cls = request.cls
        counts = record.counts if record is not None else "all"
        if not cls or counts in ("all", cls):
            windows.append(
                (
                    self._window_at("s:" + request.secret_hash),
                    self._window,
                    limit,
                    Outcome.RATE_LIMITED,
                    "",
                )
            )
        if request.user_limit and user:  # no user, no user window (as in Redis)
            windows.append(
                (
                    self._window_at("u:" + user),
                    self._window,
                    request.user_limit,
                    Outcome.USER_RATE_LIMITED,
                    "",
                )
            )
        spec = record.windows.get(cls) if record is not None and cls else None
        tag, _ = split_tag(request.secret_hash)
        for policy_window in parse_spec(spec or ""):
            if policy_window.scope == "session":
                key = f"s:{request.secret_hash}:{cls}:{policy_window.seconds}"
            elif tag and user:  # user windows of tagged (issued) secrets only, as in Redis
                key = f"t:{user}:{cls}:{policy_window.seconds}"
            else:
                continue
            windows.append(
                (
                    self._window_at(key, policy_window.seconds * 1_000_000),
                    policy_window.seconds * 1_000_000,
                    policy_window.limit,
                    Outcome.CLASS_RATE_LIMITED,
                    f"{policy_window.scope[0]}{policy_window.seconds}",
                )
            )
        if request.need == "attach" and record is not None and record.max_files:
            # Longer than any session lives: nothing leaves it (as in admit.lua).
            files = 8 * 86400 * 1_000_000
            windows.append(
                (
                    self._window_at(f"f:{request.secret_hash}", files),
                    files,
                    record.max_files,
                    Outcome.TOO_MANY_FILES,
                    "",
                )
            )
        return windows

    def _window_at(self, key: str, length: int = 0) -> _SlidingWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _SlidingWindow(length=length)
        return window

    async def register(self, record: SessionRecord) -> bool:
        until = self._keep_until(record.expires_at)
        self._opened_at.pop(record.session_id, None)  # close_session's need is over
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
        return IssuedSession(record.document, secret_hash, record.expires_at, revoked, record.app)

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
        app = None
        if secret_hash is not None:
            record = self._get(self._sessions, secret_hash)
            expires_at = None
            if record is not None:
                registered = True
                expires_at = record.expires_at
                session_id = session_id or record.session_id
                app = record.app or None
                self._unindex(record)
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
                app=app,
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
            app=record.app or None,
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

    async def grant_model_token(self, token_hash: str, grant: ModelGrant) -> None:
        self._model_tokens[token_hash] = _Expiring(grant, float(grant.expires_at))

    async def end_model_token(self, token_hash: str, *, grace_seconds: int) -> None:
        entry = self._model_tokens.get(token_hash)
        if entry is not None:
            entry.until = min(entry.until, self._clock() + grace_seconds)

    async def model_grant(self, token_hash: str) -> ModelGrant | None:
        grant = self._get(self._model_tokens, token_hash)
        if grant is None:
            return None
        if (
            self._get(self._revoked, grant.secret_hash) is not None
            or self._get(self._sid_revoked, grant.session_id) is not None
        ):
            return None
        return grant

    def _budget(self, workflow_id: str, user: str) -> _Budget:
        """The user's budget, its ended leases charged and old charges dropped."""
        budget = self._budgets.setdefault((workflow_id, user), _Budget())
        now = self._clock()
        charged = False
        for call_id, reservation in list(budget.flight.items()):
            if reservation.lease_end <= now:
                charged = True
                del budget.flight[call_id]
                record = ChargeRecord(
                    reservation.lease_end,
                    reservation.session_id,
                    reservation.model,
                    reservation.charge,
                    call_id,
                )
                budget.charges.append(record)
        if charged:  # at their leases' ends, maybe before charges already kept
            budget.charges = deque(sorted(budget.charges, key=lambda c: c.at))
        while budget.charges and budget.charges[0].at <= now - LONGEST_WINDOW_SECONDS:
            budget.charges.popleft()
        return budget

    def _decide(
        self,
        budget: _Budget,
        key: BudgetKey,
        limits: tuple[BudgetLimit, ...],
        need: Charge,
        *,
        check: bool,
    ) -> BudgetDecision:
        return decide(
            int(self._clock() * 1_000_000),
            [
                Spent(int(c.at * 1_000_000), c.session_id, c.charge.tokens, c.charge.usd_micros)
                for c in budget.charges
            ],
            [
                Spent(0, r.session_id, r.charge.tokens, r.charge.usd_micros)
                for r in budget.flight.values()
            ],
            limits,
            session_id=key.session_id,
            need_tokens=need.tokens,
            need_usd=need.usd_micros,
            check=check,
        )

    async def reserve_budget(self, reservation: Reservation) -> BudgetDecision:
        key = reservation.key
        budget = self._budget(key.workflow_id, key.user)
        charge = reservation.charge
        decision = self._decide(budget, key, reservation.limits, charge, check=False)
        if decision.admitted:
            budget.flight[reservation.call_id] = _Reservation(
                key.session_id,
                charge,
                reservation.model,
                self._clock() + reservation.lease_seconds,
            )
        return decision

    async def budget_room(self, key: BudgetKey, limits: tuple[BudgetLimit, ...]) -> BudgetDecision:
        budget = self._budget(key.workflow_id, key.user)
        return self._decide(budget, key, limits, Charge(0, 0, 0, 0.0), check=True)

    async def settle_budget(
        self, key: BudgetKey, call_id: str, charge: Charge, *, model: str
    ) -> None:
        budget = self._budget(key.workflow_id, key.user)
        if budget.flight.pop(call_id, None) is not None and charge != NO_CHARGE:
            budget.charges.append(
                ChargeRecord(self._clock(), key.session_id, model, charge, call_id)
            )

    async def budget_charges(self, workflow_id: str, user: str) -> list[ChargeRecord]:
        return list(self._budget(workflow_id, user).charges)

    async def calls_in_flight(self, workflow_id: str, user: str) -> list[str]:
        return list(self._budget(workflow_id, user).flight)

    async def audit_usage(self, *, session_id: str, replica: str, usage: dict[str, float]) -> None:
        self._audit_seq += 1
        self._audit.append(
            AuditEntry(
                id=str(self._audit_seq),
                session_id=session_id,
                secret_hash_prefix=None,
                reason="model_usage",
                replica=replica,
                at=self._clock(),
                usage=dict(usage),
            )
        )
        del self._audit[:-AUDIT_MAXLEN]

    # -- apps and users -------------------------------------------------------

    def _live_index(self, user: str) -> dict[str, IndexedSession]:
        index = self._user_index.setdefault(user, {})
        now = self._clock()
        for sid in [sid for sid, s in index.items() if s.expires_at <= now]:
            del index[sid]
        return index

    def _app_window(self, app: str) -> tuple[_SlidingWindow, int]:
        window = self._app_creates.setdefault(app, _SlidingWindow())
        count, _, _ = window.state(int(self._clock() * 1_000_000), self._window)
        return window, count

    def _app_sessions(self, app: str) -> dict[str, int]:
        sessions = self._app_active.setdefault(app, {})
        now = self._clock()
        for sid in [sid for sid, expires_at in sessions.items() if expires_at <= now]:
            del sessions[sid]
        return sessions

    def _unindex(self, record: SessionRecord) -> None:
        self._user_index.get(record.user, {}).pop(record.session_id, None)
        self._app_active.get(record.app, {}).pop(record.session_id, None)

    async def open_session(self, slot: SessionSlot) -> SlotDecision:
        now = self._clock()
        now_us = int(now * 1_000_000)
        window = None
        if slot.app:
            window, count = self._app_window(slot.app)
            if slot.app_rate is not None and count >= slot.app_rate:
                _, wait, _ = window.state(now_us, self._window)
                return SlotDecision(SlotOutcome.APP_RATE_LIMITED, _ms(wait))
        ban_left = await self.banned_for(slot.user)
        if ban_left is not None:
            return SlotDecision(SlotOutcome.BANNED, int(ban_left * 1000))
        index = self._live_index(slot.user)
        evicted: tuple[IndexedSession, ...] = ()
        if slot.max_active is not None:
            key = (slot.app, slot.workflow_id)
            mine = sorted(
                (s for s in index.values() if (s.app, s.workflow_id) == key),
                key=lambda s: s.created_at,
            )
            if len(mine) >= slot.max_active:
                if slot.refuse:
                    soonest = min(s.expires_at for s in mine)
                    return SlotDecision(
                        SlotOutcome.TOO_MANY_SESSIONS, max(int((soonest - now) * 1000), 1)
                    )
                evicted = tuple(mine[: len(mine) - slot.max_active + 1])
                for gone in evicted:
                    del index[gone.session_id]
        index[slot.session_id] = IndexedSession(
            slot.session_id, slot.secret_hash, slot.app, slot.workflow_id, now, slot.expires_at
        )
        if window is not None:
            window.times.append(now_us)
            self._opened_at[slot.session_id] = now_us
            # Pruned here, as the app's sorted set is in Redis: an app's
            # sessions are bounded by its unexpired ones.
            self._app_sessions(slot.app)[slot.session_id] = slot.expires_at
        return SlotDecision(SlotOutcome.OPENED, 0, evicted)

    async def close_session(self, slot: SessionSlot) -> None:
        self._user_index.get(slot.user, {}).pop(slot.session_id, None)
        self._app_active.get(slot.app, {}).pop(slot.session_id, None)
        opened_at = self._opened_at.pop(slot.session_id, None)
        window = self._app_creates.get(slot.app)
        if window is not None and opened_at is not None and opened_at in window.times:
            window.times.remove(opened_at)

    async def ban_user(self, user: str, *, for_seconds: int) -> list[IndexedSession]:
        if for_seconds > 0:
            self._bans[user] = _Expiring(True, self._clock() + for_seconds)
        index = self._live_index(user)
        sessions = list(index.values())
        index.clear()
        for session in sessions:
            self._app_active.get(session.app, {}).pop(session.session_id, None)
        return sessions

    async def lift_ban(self, user: str) -> bool:
        active = await self.banned_for(user) is not None  # an expired one is not lifted
        self._bans.pop(user, None)
        return active

    async def banned_for(self, user: str) -> float | None:
        entry = self._bans.get(user)
        if entry is None:
            return None
        left = entry.until - self._clock()
        if left <= 0:
            del self._bans[user]
            return None
        return left

    async def user_sessions(self, user: str) -> tuple[list[IndexedSession], float | None]:
        sessions = sorted(self._live_index(user).values(), key=lambda s: s.created_at)
        return sessions, await self.banned_for(user)

    async def class_windows(self, secret_hashes: Sequence[str]) -> dict[str, SessionWindows]:
        now = self._clock()
        now_us = int(now * 1_000_000)
        found: dict[str, SessionWindows] = {}
        for secret_hash in secret_hashes:
            # Read without _get: a view evicts nothing.
            entry = self._sessions.get(secret_hash)
            if entry is None or entry.until <= now:
                continue
            record = entry.value
            tag, _ = split_tag(secret_hash)
            uses = []
            for cls in RequestClass:  # the order the Redis store reads them in
                for w in parse_spec(record.windows.get(cls.value, "")):
                    if w.scope == "session":
                        key = f"s:{secret_hash}:{cls.value}:{w.seconds}"
                    elif tag and record.user:  # as admit() keys them
                        key = f"t:{record.user}:{cls.value}:{w.seconds}"
                    else:
                        continue
                    window = self._windows.get(key)
                    used = window.live(now_us, w.seconds * 1_000_000) if window else 0
                    uses.append(WindowUse(cls.value, w.scope, w.seconds, w.limit, used))
            found[secret_hash] = SessionWindows(record.counts, uses)
        return found

    async def app_stats(self, app: str) -> AppStats:
        _, count = self._app_window(app)
        return AppStats(count, self.window_seconds, len(self._app_sessions(app)))

    async def ping(self) -> None:
        return None

    async def now(self) -> float:
        return self._clock()

    def _sweep(self) -> None:
        """Drop expired entries now and then, so memory stays bounded."""
        now = self._clock()
        tables: tuple[dict[str, _Expiring[Any]], ...] = (
            self._sessions,
            self._revoked,
            self._sid_hash,
            self._sid_revoked,
            self._model_tokens,
        )
        for table in tables:
            if len(table) > 1024:
                for key in [k for k, v in table.items() if v.until <= now]:
                    del table[key]
        if len(self._windows) > 1024:
            now_us = int(now * 1_000_000)
            for key in [
                k
                for k, w in self._windows.items()
                if w.state(now_us, w.length or self._window)[0] == 0
            ]:
                del self._windows[key]
        if len(self._bans) > 1024:
            for user in [u for u, ban in self._bans.items() if ban.until <= now]:
                del self._bans[user]
        # Users whose sessions have all expired are dropped from the index.
        if len(self._user_index) > 1024:
            for user in list(self._user_index):
                if not self._live_index(user):
                    del self._user_index[user]
