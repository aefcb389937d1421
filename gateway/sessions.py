"""What a session create or cancel means to the gateway.

The proxy moves bytes; this module decides. For a session the upstream
(OpenAI's hosted API) creates, the gateway learns the secret from the create
answer and revokes it after a cancel's success, both before the caller sees
the answer: a secret is usable, or revoked, the moment it is returned. For a
workflow the gateway serves itself, :mod:`gateway.issuer` answers instead and
nothing is forwarded.

The proxy runs these calls to completion even when the caller goes away: once
the upstream may have acted, the gateway must see its answer and act on it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.auth import SecretHasher
from gateway.errors import BadRequest, PermissionDenied, SessionNotFound, StoreUnavailable
from gateway.headers import header_value
from gateway.jsonbody import Unreadable, loads
from gateway.metrics import Metrics
from gateway.registry import (
    SESSION_ID,
    Unlearnable,
    decoded_body,
    secret_hash_from_cancel,
    session_from_response,
    user_text,
)
from gateway.revocation import Revoker
from gateway.store.base import SessionRecord, SessionSlot, SlotOutcome, Store
from gateway.types import Headers

logger = logging.getLogger(__name__)

#: Session create/cancel answers are small JSON; the gateway reads this much
#: of one at most, and passes a larger one through unread (and counted).
MAX_CONTROL_BODY = 1024 * 1024
#: How many recently created sessions each replica remembers (id -> hash, about
#: 150 bytes each) for cancels that arrive while the store is unreachable.
RECENT_SESSIONS = 100_000


@dataclass(slots=True)
class Answer:
    """The answer to a session call, from the upstream or the gateway itself.

    ``body`` is the whole body unless the upstream's answer exceeded
    :data:`MAX_CONTROL_BODY`; then it is the part read, ``rest`` yields the
    remainder and ``release`` closes the upstream response if nobody reads it.
    """

    status: int
    headers: Headers
    body: bytes
    rest: AsyncIterator[bytes] | None = None
    release: Callable[[], None] | None = None
    #: The issuer app that made the call (for the access log), if any.
    app: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


#: Sends the buffered request upstream and reads the answer (the proxy's part).
Forward = Callable[[], Awaitable[Answer]]


class LocalSessions(Protocol):
    """Sessions the gateway answers for itself (issuer mode, :mod:`gateway.issuer`)."""

    def serves_create(self, body: bytes) -> bool:
        """Whether this create names a workflow the gateway issues sessions for."""

    def owns(self, session_id: str) -> bool:
        """Whether the gateway minted this session id."""

    async def create(self, headers: Headers, body: bytes) -> Answer: ...

    async def cancel(self, session_id: str, headers: Headers) -> Answer: ...


def user_of(body: bytes) -> str | None:
    """A create body's ``user``, if it has one (the upstream validates the rest),
    as the session will be learned: a lone surrogate kept as its escape.

    A body the gateway cannot read is forwarded all the same; should the
    upstream read a user from it, the ban is still applied as it is learned.
    """
    try:
        data = loads(body)
    except Unreadable:
        return None
    user = data.get("user") if isinstance(data, dict) else None
    return user_text(user) if isinstance(user, str) and user else None


def banned(user: str, seconds_left: float) -> PermissionDenied:
    """The refusal of a create for a user the operator banned."""
    seconds = max(int(-(-seconds_left // 1)), 1)
    # 403, not 429: a ban is an operator's decision about the user, and the
    # official SDKs retry a 429 on their own, only to be refused again.
    return PermissionDenied(
        f"User '{user}' may not be given sessions for another {seconds} s "
        "(banned by the gateway's operator).",
        code="user_banned",
        param="user",
        headers=[(b"retry-after", str(seconds).encode())],
    )


class SessionControl:
    """Decides what the gateway does around ``POST /v1/chatkit/sessions[/{id}/cancel]``."""

    def __init__(
        self,
        *,
        store: Store,
        revoker: Revoker,
        hasher: SecretHasher,
        metrics: Metrics,
        default_limit: int,
        issuer: LocalSessions | None = None,
        forwarding: bool = True,
    ) -> None:
        self._store = store
        self._revoker = revoker
        self._hasher = hasher
        self._metrics = metrics
        self._default_limit = default_limit
        self._issuer = issuer
        # False when no hosted upstream is configured: nothing can be forwarded.
        self._forwarding = forwarding
        # Sessions this replica saw created, newest last: lets a cancel find
        # the secret's hash even when the store is down at that moment.
        self._recent: OrderedDict[str, str] = OrderedDict()

    async def create(self, headers: Headers, body: bytes, forward: Forward) -> Answer:
        if self._issuer is not None and self._issuer.serves_create(body):
            return await self._issuer.create(headers, body)
        if not self._forwarding:
            raise BadRequest(
                "Unknown workflow: this gateway issues sessions only for the workflows "
                "in its configuration.",
                param="workflow.id",
                code="invalid_value",
            )
        user = user_of(body)
        if user is not None:
            # The hosted API creates the session, so a banned user's create
            # is refused before it is forwarded; one that races the ban is
            # revoked as it is learned (_index).
            left = await self._store.banned_for(user)
            if left is not None:
                raise banned(user, left)
        answer = await forward()
        if answer.ok:
            await self._learn(answer)
        return answer

    async def cancel(self, session_id: str, headers: Headers, forward: Forward) -> Answer:
        if self._issuer is not None and self._issuer.owns(session_id):
            return await self._issuer.cancel(session_id, headers)
        if not self._forwarding:
            raise SessionNotFound(session_id)
        # Looked up before forwarding, so that a store failure after the
        # upstream succeeded can still be enforced locally by hash.
        known_hash = await self._resolve(session_id)
        answer = await forward()
        if answer.ok:
            await self._revoke_cancelled(session_id, known_hash, answer)
        return answer

    # -- hosted sessions ----------------------------------------------------------

    def _readable(self, answer: Answer) -> bytes | None:
        """The answer as JSON text, or None (counted) when it cannot be read."""
        if answer.rest is not None:
            self._metrics.sessions_unparsed.labels("too_large").inc()
            return None
        encoding = header_value(answer.headers, b"content-encoding")
        text = decoded_body(
            answer.body, encoding.decode("latin-1") if encoding else None, limit=MAX_CONTROL_BODY
        )
        if text is None:
            self._metrics.sessions_unparsed.labels("encoding").inc()
        return text

    async def _learn(self, answer: Answer) -> None:
        body = self._readable(answer)
        if body is None:
            return
        try:
            record = session_from_response(
                body, hasher=self._hasher, default_limit=self._default_limit
            )
        except Unlearnable as exc:
            self._metrics.sessions_unparsed.labels(exc.reason).inc()
            logger.warning("Session-create response not learned: %s", exc.reason)
            return
        self._remember(record.session_id, record.secret_hash)
        try:
            born_revoked = await self._store.register(record)
        except StoreUnavailable as exc:
            # A secret the gateway cannot enforce must not be handed out as
            # working: the caller gets 503 (the SDKs retry it) instead of a
            # session every client request would be refused with. The session
            # the upstream created meanwhile is never used and expires there.
            self._metrics.sessions_unparsed.labels("store_unavailable").inc()
            logger.error("Session %s not registered: %s", record.session_id, exc)
            raise StoreUnavailable(
                "The session could not be registered with the gateway's store, so its "
                "client secret could not be enforced; retry the request."
            ) from exc
        self._metrics.sessions_registered.inc()
        if born_revoked:
            self._revoker.close_streams(record.secret_hash)
            logger.info("Session %s was cancelled before it was registered", record.session_id)
        await self._index(record)

    async def _index(self, record: SessionRecord) -> None:
        """Put a learned session in its user's index, so a ban finds it."""
        if not record.user:
            return
        slot = SessionSlot(
            session_id=record.session_id,
            secret_hash=record.secret_hash,
            user=record.user,
            app="",
            workflow_id=record.workflow_id,
            expires_at=record.expires_at,
        )
        try:
            decision = await self._store.open_session(slot)
        except StoreUnavailable as exc:
            # As with the registration: a session a ban could miss is not handed out.
            raise StoreUnavailable(
                "The session could not be indexed under its user; retry the request."
            ) from exc
        if decision.outcome is SlotOutcome.BANNED:
            await self._revoker.revoke(
                secret_hash=record.secret_hash, session_id=record.session_id, reason="ban"
            )
            raise banned(record.user, decision.retry_after_ms / 1000)

    async def _resolve(self, session_id: str) -> str | None:
        if not SESSION_ID.match(session_id):
            return None
        try:
            found = await self._store.secret_hash_for(session_id)
        except StoreUnavailable:
            found = None
        return found or self._recent.get(session_id)

    def _remember(self, session_id: str, secret_hash: str) -> None:
        self._recent[session_id] = secret_hash
        if len(self._recent) > RECENT_SESSIONS:
            self._recent.popitem(last=False)

    async def _revoke_cancelled(
        self, session_id: str, known_hash: str | None, answer: Answer
    ) -> None:
        # A 2xx cancel whose answer cannot be read still revokes what is known.
        body = self._readable(answer)
        echoed = secret_hash_from_cancel(body, hasher=self._hasher) if body else None
        hashes: set[str | None] = {h for h in (known_hash, echoed) if h is not None} or {None}
        sid = session_id if SESSION_ID.match(session_id) else None
        stored = True
        for secret_hash in hashes:
            result = await self._revoker.revoke(
                secret_hash=secret_hash, session_id=sid, reason="cancel"
            )
            stored = stored and result is not None
        answer.headers.append(
            (b"x-chatkit-gateway-revocation", b"stored" if stored else b"pending")
        )
