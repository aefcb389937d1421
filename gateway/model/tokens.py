"""Model tokens: what an admitted turn's ChatKit server uses as its OpenAI key.

A token is random and opaque (``ckmt_``, the secret's slot tag and ``_`` when
it has one, and 43 URL-safe characters); the
store keeps only its HMAC, with the turn it was given to (session, user,
workflow, request id). It is valid from the moment the turn is forwarded
until the turn's response to the ChatKit client ends, then for a grace
(``GATEWAY_MODEL_TOKEN_GRACE_SECONDS``), and never past the session's expiry.
Every check reads the session's revocation flags, so a cancel, revoke or ban
ends its tokens on every replica at once; the model streams in flight are
cut through the revocation feed (they are tracked under the session's
secret, like the turn itself).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from gateway.auth import SecretHasher, bearer_secret
from gateway.errors import AuthError, StoreUnavailable
from gateway.ratelimit import Identity
from gateway.revocation import Revoker
from gateway.store.base import ModelGrant, Store
from gateway.types import Headers

logger = logging.getLogger(__name__)

HEADER = b"x-chatkit-model-token"
PREFIX = "ckmt_"


def _refused(message: str) -> AuthError:
    return AuthError(message, code="invalid_model_token")


class ModelTokens:
    """Issues, ends and checks model tokens. Store errors pass through
    (StoreUnavailable: the caller answers 503)."""

    def __init__(
        self, store: Store, *, hasher: SecretHasher, revoker: Revoker, grace_seconds: int
    ) -> None:
        self._store = store
        self._hash = hasher
        self._revoker = revoker
        self._grace = grace_seconds
        self._ending: set[asyncio.Task[None]] = set()

    def mint(self, tag: str) -> tuple[str, str]:
        """A new token and its hash, not yet granted. A tagged secret's turn
        gets a token with the same tag, whose grant the admission step of the
        turn writes (one round trip for both)."""
        token = PREFIX + (f"{tag}_" if tag else "") + secrets.token_urlsafe(32)
        return token, self._hash(token.encode())

    async def issue(self, secret_hash: str, identity: Identity, *, request_id: str) -> str:
        """A token for an admitted turn whose admission did not grant one."""
        token = PREFIX + secrets.token_urlsafe(32)
        grant = ModelGrant(
            secret_hash=secret_hash,
            session_id=identity.session_id,
            user=identity.user,
            workflow_id=identity.workflow_id,
            request_id=request_id,
            expires_at=identity.expires_at,
        )
        await self._store.grant_model_token(self._hash(token.encode()), grant)
        return token

    def end(self, token: str) -> None:
        """The turn's response is over: start the grace. Never raises; runs on
        after the request (its task may be ending by cancellation)."""
        task = asyncio.ensure_future(self._end(self._hash(token.encode())))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end(self, token_hash: str) -> None:
        try:
            await self._store.end_model_token(token_hash, grace_seconds=self._grace)
        except StoreUnavailable as exc:  # the token then lives to its session's expiry
            logger.warning("A model token's grace was not started: %s", type(exc).__name__)

    async def check(self, headers: Headers) -> ModelGrant:
        """The grant of the bearer token, or raise AuthError (401)."""
        try:
            token = bearer_secret(headers)
        except AuthError as exc:
            raise _refused("Send the model token as 'Authorization: Bearer <token>'.") from exc
        if not token.startswith(PREFIX.encode()):
            raise _refused("This is not a model token.")
        grant = await self._store.model_grant(self._hash(token))
        if grant is None or self._revoker.is_revoked_locally(grant.secret_hash):
            raise _refused("The model token is invalid, expired or revoked.")
        return grant

    async def close(self) -> None:
        """Wait for graces being started (shutdown)."""
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
