"""The decision step in front of every client-secret request.

Parses the bearer secret, hashes it, and asks the store for one atomic
decision; the local pending-revocation set is consulted first, so a
revocation this replica could not yet write to Redis is still enforced here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.auth import SecretHasher, bearer_secret, split_tag
from gateway.errors import AuthError, GatewayError, RateLimited, StoreUnavailable
from gateway.head import RequestHead
from gateway.metrics import Metrics
from gateway.ratelimit import Decision, Identity, Outcome, rate_limit_headers, rejection
from gateway.revocation import Revoker
from gateway.store.base import AdmitRequest, Store
from gateway.types import Headers

logger = logging.getLogger(__name__)

_REVOKED = Decision(Outcome.REVOKED)


class Admission(NamedTuple):
    """What an admitted request carries on: whose secret, the headers to add, who it is.

    ``secret_hash`` is None only in report-only mode, for a malformed secret;
    ``identity`` is None for secrets no session registered (allowed unknown).
    """

    secret_hash: str | None
    headers: Headers
    identity: Identity | None = None
    #: What was admitted, and its window member: for :meth:`Gatekeeper.unadmit`.
    request: AdmitRequest | None = None
    member: str = ""
    #: The turn's model token, granted by the admission step itself.
    model_token: str | None = None


class Gatekeeper:
    """Admits or rejects client-secret requests. Raises the rejecting GatewayError."""

    def __init__(
        self,
        store: Store,
        *,
        hasher: SecretHasher,
        revoker: Revoker,
        metrics: Metrics,
        allow_unknown: bool,
        default_limit: int,
        user_limit: int | None,
        window_seconds: int,
        enforce: bool,
    ) -> None:
        self._store = store
        self._hash = hasher
        self._revoker = revoker
        self._metrics = metrics
        self._allow_unknown = allow_unknown
        self._default_limit = default_limit
        self._user_limit = user_limit
        self._window = window_seconds
        self._enforce = enforce

    async def check(
        self,
        headers: RequestHead | Headers,
        cls: str = "",
        need: str = "",
        declared_size: int = 0,
        model: str | None = None,
        mint: Callable[[str], tuple[str, str]] | None = None,
        request_id: str = "",
        secret: bytes | None = None,
    ) -> Admission:
        """Decide; raise the rejecting error, or return what the request carries on.

        ``headers``: the request's head, as the protocol read it (or its list).
        ``cls`` is the request's class (``gateway.chatkit.RequestClass``), ""
        for requests without one (counted by the session's limit only);
        ``need`` and ``declared_size`` what the session's configuration is
        asked for (:class:`~gateway.store.base.AdmitRequest`), ``model`` the
        model a turn names (refused by the session's policy before counting).
        ``mint`` (a turn, with a model key) makes a model token for a tagged
        secret's tag, which the admission step grants if it admits the turn
        of a registered session (``Admission.model_token``). ``secret``: the
        request's secret when the caller has read it already (:meth:`secret`).
        """
        try:
            secret_hash = self._hash(secret if secret is not None else bearer_secret(headers))
        except AuthError as exc:
            return Admission(None, self._report_only(exc, "malformed"))
        request: AdmitRequest | None = None
        token = token_hash = ""
        if self._revoker.is_revoked_locally(secret_hash):
            decision = _REVOKED
        else:
            started = time.perf_counter()
            if mint is not None:
                tag, _ = split_tag(secret_hash)
                if tag:
                    token, token_hash = mint(tag)
            request = AdmitRequest(
                secret_hash,
                self._allow_unknown,
                self._default_limit,
                self._user_limit,
                cls,
                need,
                declared_size,
                model,
                token_hash,
                request_id,
            )
            try:
                decision = await self._store.admit(request)
            except StoreUnavailable as exc:
                self._metrics.store_errors.inc()
                # The store logs an outage once and then once per interval.
                logger.debug("Admission refused: %s", exc)
                return Admission(secret_hash, self._report_only(exc, "store_unavailable"))
            self._metrics.decision_seconds.observe(time.perf_counter() - started)
        identity = decision.identity
        if identity is None:
            self._metrics.count_decision(decision.outcome, "", cls)
        else:
            self._metrics.count_decision(decision.outcome, identity.workflow_id, cls, identity.app)
        error = rejection(decision, window_seconds=self._window)
        if error is not None:
            if self._enforce:
                if identity is not None:
                    error.app = identity.app or None  # the access log names the app
                    if isinstance(error, RateLimited):
                        error.workflow_id = identity.workflow_id
                raise error  # a 429 carries its own rate-limit headers
            self._metrics.would_reject_by_outcome[decision.outcome].inc()
            logger.info("Report-only: would reject (%s)", decision.outcome.name.lower())
        return Admission(
            secret_hash,
            rate_limit_headers(decision, window_seconds=self._window),
            decision.identity,
            request if decision.member else None,
            decision.member,
            token if token and decision.admitted and decision.identity is not None else None,
        )

    async def unadmit(self, admission: Admission) -> None:
        """Undo an admission the gateway then refused (a turn whose budget is
        spent), so that the refused request consumes no quota. A store that
        cannot be reached leaves the windows as they are (the member leaves
        with its window); the refusal goes out all the same."""
        if admission.request is None or not admission.member:
            return
        try:
            await self._store.unadmit(admission.request, admission.member)
        except StoreUnavailable as exc:
            self._metrics.store_errors.inc()
            logger.debug("Undoing an admission failed: %s", exc)

    def secret(self, headers: RequestHead | Headers) -> bytes | None:
        """The request's secret if it is well-formed (only then may its body
        be read before admission), else None; :meth:`check` says why not."""
        try:
            return bearer_secret(headers)
        except AuthError:
            return None

    def _report_only(self, error: GatewayError, what: str) -> Headers:
        if self._enforce:
            raise error
        # Counted like the store's outcomes: "malformed" and "store_unavailable"
        # complete the label's fixed vocabulary.
        self._metrics.would_reject.labels(what).inc()
        logger.info("Report-only: would reject (%s)", what)
        return []
