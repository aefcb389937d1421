"""The store interface and the records that cross it."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from gateway.model import budgets
from gateway.ratelimit import Decision


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session the gateway admits: learned from a create response, or issued.

    ``document`` is the ChatSession JSON the gateway answered with, without
    its client_secret (only the hash is ever stored); it is kept only for
    sessions the gateway issued itself (``issued``), so it can answer for them
    again (cancel, retrieve).
    """

    secret_hash: str
    session_id: str
    user: str
    expires_at: int  # unix seconds
    limit: int
    workflow_id: str = ""
    workflow_version: str = ""
    document: bytes = b""
    issued: bool = False
    #: The class the session's ``limit`` counts (``gateway.policy``): "all",
    #: or one class, whose other classes then count only in ``windows``.
    counts: str = "all"
    #: The workflow policy's windows by class, compiled
    #: (:meth:`gateway.policy.Policy.windows`).
    windows: Mapping[str, str] = field(default_factory=dict)
    #: The session's chatkit_configuration, enforced at admission (issued
    #: sessions; a learned session's own server enforces it): threads.list
    #: allowed, uploads allowed, largest file (bytes, 0: no limit), most
    #: attachments.create (0: no limit), and the whole of it as JSON for the
    #: ChatKit server.
    history: bool = True
    uploads: bool = True
    max_file_bytes: int = 0
    max_files: int = 0
    configuration: str = ""
    #: The models a turn may name (the workflow policy's ``models``), () for
    #: any: refused in the admission step, so a refused model counts nowhere.
    models: tuple[str, ...] = ()
    #: The app that created an issued session ("" for a learned one). Kept
    #: beside the ChatSession document, not in it: the SDK parses that.
    app: str = ""


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """A session the gateway issued, as found by its id."""

    document: bytes  # the ChatSession JSON, without client_secret
    secret_hash: str
    expires_at: int  # unix seconds
    revoked: bool
    app: str = ""  # "" for sessions issued before apps were recorded


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """An operator's view of one session."""

    session_id: str
    status: str  # "active" | "revoked" | "expired"
    user: str | None
    limit: int | None
    remaining: int | None
    expires_at: int | None
    secret_hash_prefix: str | None
    app: str | None = None


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """Parameters of one admission, fixed by configuration except the hash."""

    secret_hash: str
    allow_unknown: bool
    default_limit: int
    user_limit: int | None
    #: The request's class (``gateway.chatkit.RequestClass``), "" for none.
    cls: str = ""
    #: What of the session's configuration the request needs: "history"
    #: (threads.list), "attach" (attachments.create), "upload" (file bytes), "".
    need: str = ""
    #: The size an attachments.create declares, in bytes.
    declared_size: int = 0
    #: The model a turn names (``params.input.inference_options.model``),
    #: None when it names none (the server's default).
    model: str | None = None
    #: A model token's hash to grant in the same step when a registered
    #: session's turn is admitted ("" for none): the token's grant is the
    #: session's (its id, user, workflow, expiry) and ``request_id``. Only
    #: for tokens tagged like the secret (their grant shares its slot).
    token: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class WindowUse:
    """One of a session's class windows (its policy's), as counted now."""

    cls: str  # "turn", "read", ...
    scope: str  # "session": this session's; "user": every session of its user
    seconds: int
    limit: int
    used: int  # requests admitted in the window's live range

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class SessionWindows:
    """What a session's windows count, as an operator sees them."""

    #: The class the session's own limit counts ("all": every request).
    counts: str
    #: Its policy's class windows, session and user scope.
    windows: list[WindowUse]


@dataclass(frozen=True, slots=True)
class ModelGrant:
    """What a model token stands for: the admitted turn that was given it.

    Kept under the token's hash, never the token. ``expires_at`` is the
    session's expiry, the latest a token can live whatever else happens.
    """

    secret_hash: str
    session_id: str
    user: str
    workflow_id: str
    request_id: str
    expires_at: int  # unix seconds


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str
    session_id: str | None
    secret_hash_prefix: str | None
    reason: str
    replica: str
    at: float  # unix seconds
    app: str | None = None
    #: A turn's model usage (reason "model_usage"): input_tokens,
    #: cached_input_tokens, output_tokens, total_tokens, usd, calls.
    usage: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class RevokeResult:
    """What a revocation changed.

    ``secret_hash`` is None when no hash was given and the session id maps to
    none; ``registered`` says whether the store held the session's record (a
    hash echoed by a cancel reply can be known for a session never seen).
    """

    secret_hash: str | None
    session_id: str | None
    already_revoked: bool
    registered: bool = False


# -- apps and users: what is checked when a session is handed out ----------------


@dataclass(frozen=True, slots=True)
class SessionSlot:
    """A session about to be handed out, as the create-time checks see it.

    ``app`` is "" for a session learned from the hosted API: it is indexed
    under its user (so a ban finds it) but counted against no app.
    """

    session_id: str
    secret_hash: str
    user: str
    app: str
    workflow_id: str
    expires_at: int  # unix seconds
    #: The app's max_sessions_per_minute (an exact sliding window), or None.
    app_rate: int | None = None
    #: max_active_sessions_per_user for this app and workflow, or None.
    max_active: int | None = None
    #: Over ``max_active``: refuse (True) or revoke the oldest (False).
    refuse: bool = False


class SlotOutcome(Enum):
    OPENED = "opened"
    BANNED = "banned"
    APP_RATE_LIMITED = "app_rate_limited"
    TOO_MANY_SESSIONS = "too_many_sessions"


@dataclass(frozen=True, slots=True)
class IndexedSession:
    """One active session in a user's index."""

    session_id: str
    secret_hash: str
    app: str  # "" for a learned session
    workflow_id: str
    created_at: float  # unix seconds, the store's clock
    expires_at: int


@dataclass(frozen=True, slots=True)
class SlotDecision:
    """What the create-time checks decided. ``evicted``: the user's oldest
    sessions that must be revoked to make room (``revoke_oldest``)."""

    outcome: SlotOutcome
    retry_after_ms: int = 0
    evicted: tuple[IndexedSession, ...] = ()


@dataclass(frozen=True, slots=True)
class AppStats:
    """An app's creates in the current window and its active sessions."""

    creates: int
    window_seconds: int
    active: int


class Store(abc.ABC):
    """Backend-independent operations. Every method may raise StoreUnavailable."""

    #: Shown in the start-up log and /readyz.
    name: str
    #: The sliding windows' length (GATEWAY_WINDOW_SECONDS).
    window_seconds: int = 60

    @abc.abstractmethod
    async def admit(self, request: AdmitRequest) -> Decision:
        """Check revocation, expiry and both windows, and count an admission.

        One atomic step: a rejected request consumes no quota. An admitted
        request of a registered session carries its :class:`~gateway.ratelimit.Identity`.
        """

    @abc.abstractmethod
    async def unadmit(self, request: AdmitRequest, member: str) -> None:
        """Undo an admission the gateway refused after all (a turn whose
        budget is spent): remove its member (``Decision.member``) from every
        window it counted in, so the refused request consumes nothing.
        Idempotent."""

    @abc.abstractmethod
    async def register(self, record: SessionRecord) -> bool:
        """Record a session. Returns True when its id was already revoked (born revoked)."""

    @abc.abstractmethod
    async def secret_hash_for(self, session_id: str) -> str | None:
        """The secret hash registered for a session id."""

    @abc.abstractmethod
    async def issued_session(self, session_id: str) -> IssuedSession | None:
        """A session registered with ``issued=True``, revoked or not; else None.

        Kept as long as its record (until ``expires_at`` plus the retention).
        """

    @abc.abstractmethod
    async def revoke(
        self, *, secret_hash: str | None, session_id: str | None, reason: str, replica: str
    ) -> RevokeResult:
        """Revoke a secret and/or session id, idempotently, audit it and announce it."""

    @abc.abstractmethod
    async def lookup(self, session_id: str) -> SessionInfo | None:
        """An operator's view of a session, or None if the store never saw it."""

    @abc.abstractmethod
    async def audit_tail(self, count: int) -> list[AuditEntry]:
        """The newest ``count`` revocations, oldest first."""

    @abc.abstractmethod
    def revocations(self) -> AsyncIterator[str | None]:
        """Secret hashes revoked anywhere, as they happen (for closing open streams).

        ``None`` means the feed was interrupted and has resumed: revocations
        made meanwhile were not delivered, so re-check with :meth:`revoked_among`.
        """

    @abc.abstractmethod
    async def revoked_among(self, secret_hashes: Collection[str]) -> set[str]:
        """Those of ``secret_hashes`` that are revoked."""

    # -- model tokens (issued for admitted turns, see gateway.model) ---------------

    @abc.abstractmethod
    async def grant_model_token(self, token_hash: str, grant: ModelGrant) -> None:
        """Record a model token, valid until the session expires or it is ended."""

    @abc.abstractmethod
    async def end_model_token(self, token_hash: str, *, grace_seconds: int) -> None:
        """The turn's response ended: the token lives ``grace_seconds`` more
        (by the store's clock), never past its session's expiry."""

    @abc.abstractmethod
    async def model_grant(self, token_hash: str) -> ModelGrant | None:
        """The token's grant, or None if it is unknown, has expired, or its
        session was revoked (its secret or its id)."""

    # -- budgets (gateway.model.budgets) --------------------------------------------

    @abc.abstractmethod
    async def reserve_budget(self, reservation: budgets.Reservation) -> budgets.BudgetDecision:
        """Reserve room for a call if every window holds it, atomically; else
        change nothing (but charge leases that have ended)."""

    @abc.abstractmethod
    async def budget_room(
        self, key: budgets.BudgetKey, limits: tuple[budgets.BudgetLimit, ...]
    ) -> budgets.BudgetDecision:
        """Whether spent + reserved leaves any room in every window (a turn's admission)."""

    @abc.abstractmethod
    async def settle_budget(
        self, key: budgets.BudgetKey, call_id: str, charge: budgets.Charge, *, model: str
    ) -> None:
        """Drop the call's reservation and record its charge (once)."""

    @abc.abstractmethod
    async def budget_charges(self, workflow_id: str, user: str) -> list[budgets.ChargeRecord]:
        """The user's charges of the last day in a workflow, oldest first."""

    @abc.abstractmethod
    async def calls_in_flight(self, workflow_id: str, user: str) -> list[str]:
        """The call ids of the user's model calls still reserved (unsettled)."""

    @abc.abstractmethod
    async def audit_usage(self, *, session_id: str, replica: str, usage: dict[str, float]) -> None:
        """Append a turn's model usage to the audit stream (reason "model_usage")."""

    # -- apps and users -------------------------------------------------------

    @abc.abstractmethod
    async def open_session(self, slot: SessionSlot) -> SlotDecision:
        """Check and count a session being handed out, atomically per user.

        In this order: the app's create window, then (one atomic step on the
        user's keys) the user's ban and the user's active sessions for this
        app and workflow; opened, the session is in the user's index and
        counted in the app's window. Refused, nothing is counted.
        """

    @abc.abstractmethod
    async def close_session(self, slot: SessionSlot) -> None:
        """Undo :meth:`open_session` (the session's registration failed)."""

    @abc.abstractmethod
    async def ban_user(self, user: str, *, for_seconds: int) -> list[IndexedSession]:
        """Empty the user's index and return the sessions that were in it;
        with ``for_seconds`` > 0, refuse the user's new sessions that long."""

    @abc.abstractmethod
    async def lift_ban(self, user: str) -> bool:
        """End the user's ban now; whether there was one."""

    @abc.abstractmethod
    async def banned_for(self, user: str) -> float | None:
        """Seconds left of the user's ban, or None."""

    @abc.abstractmethod
    async def user_sessions(self, user: str) -> tuple[list[IndexedSession], float | None]:
        """The user's indexed, unexpired sessions and the seconds left of a ban."""

    @abc.abstractmethod
    async def class_windows(self, secret_hashes: Sequence[str]) -> dict[str, SessionWindows]:
        """Each registered session's class windows with what each counts now.

        Read only, on the store's clock, exactly as admission would count
        them (a request leaves a window once it is a full window old), but
        nothing is pruned or written: looking never changes what is admitted.
        A user window appears only where admission counts it (issued
        sessions). Unregistered hashes are absent from the answer.
        """

    @abc.abstractmethod
    async def app_stats(self, app: str) -> AppStats:
        """The app's creates in the last window and its active sessions."""

    @abc.abstractmethod
    async def now(self) -> float:
        """The store's clock in unix seconds: the one every replica's decisions use.

        Anything that must hold across replicas (an issued session's expiry)
        is computed from it, never from one replica's own clock.
        """

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @property
    def full(self) -> bool:
        """True while the store refuses writes for lack of memory (Redis maxmemory)."""
        return False

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
