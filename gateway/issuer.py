"""Issuer mode: the gateway as the session authority for self-hosted ChatKit.

Self-hosted ChatKit servers (PyPI ``openai-chatkit``) have no sessions, no
client secrets and no cancel. For the workflows named in ``GATEWAY_WORKFLOWS``
the gateway answers OpenAI's session API itself, so server code written for
the hosted API (``client.beta.chatkit.sessions.create`` / ``.cancel`` with the
official SDK) works unchanged against ``base_url=<gateway>/v1``:

- create validates the body as the API does, mints a session id and a client
  secret, registers the session (only the secret's hash) in the shared store
  before the caller sees the secret, and answers a ``ChatSession``;
- cancel revokes through the store (every replica, open streams cut) and
  answers the session with ``status: "cancelled"``; repeating it is harmless.

If the store cannot take the registration or the revocation, the answer is
503 and nothing is handed out or claimed: the SDK retries 5xx on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.apps import DEFAULT_APP, App, AppKeys, OnTooManySessions
from gateway.auth import FailedAttempts, SecretHasher
from gateway.errors import (
    BadRequest,
    GatewayError,
    InvalidApiKey,
    PermissionDenied,
    RateLimited,
    SessionNotFound,
    StoreUnavailable,
)
from gateway.jsonbody import request_json, request_object
from gateway.metrics import Metrics
from gateway.policy import Policy
from gateway.revocation import Revoker
from gateway.sessions import Answer, banned
from gateway.store.base import SessionRecord, SessionSlot, SlotDecision, SlotOutcome, Store
from gateway.types import Headers

#: Longest ``user`` accepted; the API requires one, the headers carry it.
MAX_USER_LENGTH = 512
MAX_STATE_VARIABLES = 64  # the API's own limit
MAX_UPLOAD_MB = 512  # the API's file_upload.max_file_size ceiling
#: file_upload.max_file_size is in MB; read as MiB, the larger reading, so a
#: file the client considers within the limit is never cut.
MB = 1024 * 1024
DEFAULT_MAX_FILES = 10

_ID_PREFIX = "cksess_"
_SECRET_PREFIX = "ek_"  # noqa: S105 - a prefix, not a secret
_ID_TAG_KEY = b"chatkit-gateway/session-id/v1"

logger = logging.getLogger(__name__)


# -- the create body, as the API validates it -------------------------------------


class _Strict(BaseModel):
    # Unknown fields are refused like the API refuses unknown parameters;
    # strict: "5" is not an integer, 1 is not a boolean.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Tracing(_Strict):
    enabled: bool = True


class _Workflow(_Strict):
    id: str = Field(min_length=1, max_length=128)
    version: str | None = Field(default=None, min_length=1, max_length=128)
    state_variables: dict[str, Any] | None = Field(default=None, max_length=MAX_STATE_VARIABLES)
    tracing: _Tracing = _Tracing()

    @field_validator("state_variables")
    @classmethod
    def _scalar_values(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, item in (value or {}).items():
            if not isinstance(item, str | bool | int | float):
                raise ValueError(f"'{key}' must be a string, a boolean or a number")
        return value


class _ExpiresAfter(_Strict):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=1)


class _RateLimits(_Strict):
    max_requests_per_1_minute: int | None = Field(default=None, ge=1)


class _Titling(_Strict):
    enabled: bool = True


class _FileUpload(_Strict):
    enabled: bool = False
    max_file_size: int = Field(default=MAX_UPLOAD_MB, ge=1, le=MAX_UPLOAD_MB)
    max_files: int = Field(default=DEFAULT_MAX_FILES, ge=1)


class _History(_Strict):
    enabled: bool = True
    recent_threads: int | None = Field(default=None, ge=1)


class _Configuration(_Strict):
    automatic_thread_titling: _Titling = _Titling()
    file_upload: _FileUpload = _FileUpload()
    history: _History = _History()


class CreateSessionBody(_Strict):
    """``CreateChatSessionBody``: what ``sessions.create`` sends."""

    user: str = Field(min_length=1, max_length=MAX_USER_LENGTH)
    workflow: _Workflow
    expires_after: _ExpiresAfter | None = None
    rate_limits: _RateLimits | None = None
    chatkit_configuration: _Configuration = _Configuration()


def parse_create_body(body: bytes) -> CreateSessionBody:
    """The validated body; raises :class:`BadRequest` naming the parameter."""
    data = request_object(body)
    try:
        return CreateSessionBody.model_validate(data)
    except ValidationError as exc:
        raise _as_bad_request(exc) from None


def _as_bad_request(exc: ValidationError) -> BadRequest:
    error = exc.errors()[0]
    param = ".".join(str(part) for part in error["loc"]) or None
    kind = error["type"]
    if kind == "missing":
        return BadRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    if kind == "extra_forbidden":
        return BadRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    return BadRequest(
        f"Invalid value for '{param}': {error['msg'].rstrip('.')}.",
        param=param,
        code="invalid_value",
    )


def workflow_id_of(body: bytes) -> str | None:
    """The create body's ``workflow.id`` if it has one, without validating the rest.

    A body that is not JSON the gateway can read is refused (:class:`BadRequest`)
    rather than forwarded: where a create goes is decided by what it names, and
    a body read differently upstream (a repeated key, say) could name another.
    """
    data = request_json(body)
    workflow = data.get("workflow") if isinstance(data, dict) else None
    found = workflow.get("id") if isinstance(workflow, dict) else None
    return found if isinstance(found, str) else None


# -- minting ----------------------------------------------------------------------


class SessionIds:
    """Session ids the gateway can later recognise as its own without the store.

    An id is ``cksess_`` + 128 random bits + a 64-bit HMAC tag of them: a
    cancel for an id the gateway minted is never forwarded to the hosted API,
    even when the store cannot be asked (it is answered 503 instead).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None) -> None:
        self._key = key or _ID_TAG_KEY

    def _tag(self, random_hex: str) -> str:
        return hmac.new(self._key, random_hex.encode(), hashlib.sha256).hexdigest()[:16]

    def mint(self) -> str:
        random_hex = secrets.token_hex(16)
        return _ID_PREFIX + random_hex + self._tag(random_hex)

    def owns(self, session_id: str) -> bool:
        body = session_id.removeprefix(_ID_PREFIX)
        if len(body) != 48 or body == session_id:
            return False
        return hmac.compare_digest(self._tag(body[:32]), body[32:])


def new_client_secret(tag: str = "") -> str:
    """``ek_`` + the user's slot tag and ``_`` if given + 256 random bits,
    URL-safe (RFC 4648 section 5)."""
    prefix = f"{_SECRET_PREFIX}{tag}_" if tag else _SECRET_PREFIX
    return prefix + secrets.token_urlsafe(32)


def session_document(
    request: CreateSessionBody, *, session_id: str, expires_at: int, limit: int, status: str
) -> dict[str, Any]:
    """The ``ChatSession`` object, every field resolved, without its client secret."""
    workflow = request.workflow
    config = request.chatkit_configuration
    return {
        "id": session_id,
        "object": "chatkit.session",
        "expires_at": expires_at,
        "user": request.user,
        "status": status,
        "workflow": {
            "id": workflow.id,
            "version": workflow.version,
            "state_variables": workflow.state_variables,
            "tracing": {"enabled": workflow.tracing.enabled},
        },
        "rate_limits": {"max_requests_per_1_minute": limit},
        "max_requests_per_1_minute": limit,
        "chatkit_configuration": {
            "automatic_thread_titling": {"enabled": config.automatic_thread_titling.enabled},
            "file_upload": {
                "enabled": config.file_upload.enabled,
                "max_file_size": config.file_upload.max_file_size,
                "max_files": config.file_upload.max_files,
            },
            "history": {
                "enabled": config.history.enabled,
                "recent_threads": config.history.recent_threads,
            },
        },
    }


def json_answer(status: int, document: Mapping[str, Any], *, app: str | None = None) -> Answer:
    body = json.dumps(document, separators=(",", ":")).encode()
    headers: Headers = [
        (b"date", formatdate(usegmt=True).encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return Answer(status, headers, body, app=app)


def refusal(decision: SlotDecision, *, user: str, app: App) -> GatewayError:
    """The error for a create the store's checks refused (see Store.open_session)."""
    seconds = max(-(-decision.retry_after_ms // 1000), 1)
    retry = [(b"retry-after", str(seconds).encode())]
    if decision.outcome is SlotOutcome.BANNED:
        return banned(user, decision.retry_after_ms / 1000)
    if decision.outcome is SlotOutcome.APP_RATE_LIMITED:
        return RateLimited(
            f"App '{app.name}' may create at most {app.max_sessions_per_minute} sessions "
            f"per minute; retry in {seconds} s.",
            code="session_rate_limit_exceeded",
            headers=retry,
        )
    return RateLimited(
        f"User '{user}' already has {app.max_active_sessions_per_user} active sessions of "
        f"this workflow from app '{app.name}'; one expires in {seconds} s.",
        code="too_many_active_sessions",
        param="user",
        headers=retry,
    )


# -- the session API ----------------------------------------------------------------


class Issuer:
    """Answers session create and cancel for the configured workflows."""

    def __init__(
        self,
        *,
        workflows: frozenset[str],
        apps: AppKeys,
        store: Store,
        revoker: Revoker,
        hasher: SecretHasher,
        metrics: Metrics,
        ids: SessionIds,
        default_limit: int,
        default_expires_seconds: int,
        max_expires_seconds: int,
        serves_every_create: bool = False,
        policies: Mapping[str, Policy] | None = None,
    ) -> None:
        self._workflows = workflows
        # Compiled once: every session of a workflow carries the same windows.
        policies = policies or {}
        self._policies = {
            wf: (policy.session_limit_counts, policy.windows(), policy.models or ())
            for wf, policy in ((wf, policies.get(wf, Policy())) for wf in workflows)
        }
        self._apps = apps
        self._store = store
        self._revoker = revoker
        self._hasher = hasher
        self._metrics = metrics
        self._failures = FailedAttempts(
            metrics.auth_failures.labels("issuer_key"), logger, "issuer API key"
        )
        self._ids = ids
        self._default_limit = default_limit
        self._default_expires = default_expires_seconds
        self._max_expires = max_expires_seconds
        # With no hosted upstream, every create is the issuer's to validate
        # (an unknown workflow is a 400 here rather than a forward).
        self._every_create = serves_every_create

    def serves_create(self, body: bytes) -> bool:
        return self._every_create or workflow_id_of(body) in self._workflows

    def owns(self, session_id: str) -> bool:
        return self._ids.owns(session_id)

    def _authenticate(self, headers: Headers) -> App:
        app = self._apps.identify(headers)
        if app is None:
            self._failures.record()
            # Never echo the key, not even a prefix of it.
            raise InvalidApiKey(
                "Incorrect or missing API key: this gateway issues ChatKit sessions only "
                "for the keys in its configuration (GATEWAY_ISSUER_KEYS)."
            )
        return app

    async def create(self, headers: Headers, body: bytes) -> Answer:
        app = self._authenticate(headers)
        try:
            return await self._create(app, body)
        except GatewayError as exc:
            exc.app = app.name  # for the access log
            raise

    async def _create(self, app: App, body: bytes) -> Answer:
        request = parse_create_body(body)
        if request.workflow.id not in self._workflows:
            raise BadRequest(
                f"Unknown workflow '{request.workflow.id}': this gateway issues sessions "
                "only for the workflows in its configuration.",
                param="workflow.id",
                code="invalid_value",
            )
        if not app.may_use(request.workflow.id):
            self._metrics.session_creates_refused.labels(app.name, "workflow_not_allowed").inc()
            raise PermissionDenied(
                f"The API key of app '{app.name}' may not create sessions for workflow "
                f"'{request.workflow.id}'.",
                param="workflow.id",
                code="workflow_not_allowed",
            )
        seconds = self._default_expires
        if request.expires_after is not None:
            seconds = request.expires_after.seconds
            if seconds > self._max_expires:
                raise BadRequest(
                    f"Invalid value for 'expires_after.seconds': at most {self._max_expires}.",
                    param="expires_after.seconds",
                    code="invalid_value",
                )
        counts, windows, models = self._policies[request.workflow.id]
        config = request.chatkit_configuration
        limit = self._default_limit
        if request.rate_limits is not None and request.rate_limits.max_requests_per_1_minute:
            limit = request.rate_limits.max_requests_per_1_minute
        session_id = self._ids.mint()
        # The secret names its user's slot tag: its state is stored beside the
        # user's windows (see gateway.store.redis.keys).
        secret = new_client_secret(self._hasher.user_tag(request.user))
        # Expiry is checked against the store's clock (Redis TIME), so it is
        # set from that clock too: a replica whose clock runs fast or slow
        # must not issue sessions that live longer or shorter than asked.
        expires_at = int(await self._store.now()) + seconds
        document = session_document(
            request, session_id=session_id, expires_at=expires_at, limit=limit, status="active"
        )
        record = SessionRecord(
            secret_hash=self._hasher(secret.encode()),
            session_id=session_id,
            user=request.user,
            expires_at=expires_at,
            limit=limit,
            workflow_id=request.workflow.id,
            workflow_version=request.workflow.version or "",
            document=json.dumps(document, separators=(",", ":")).encode(),
            issued=True,
            counts=counts,
            windows=windows,
            models=models,
            # The session's own configuration, enforced by the gateway (it sees
            # every request) and stated to the ChatKit server (for the rest).
            history=config.history.enabled,
            uploads=config.file_upload.enabled,
            max_file_bytes=config.file_upload.max_file_size * MB,
            max_files=config.file_upload.max_files,
            configuration=json.dumps(document["chatkit_configuration"], separators=(",", ":")),
            app=app.name,
        )
        slot = SessionSlot(
            session_id=session_id,
            secret_hash=record.secret_hash,
            user=request.user,
            app=app.name,
            workflow_id=request.workflow.id,
            expires_at=expires_at,
            app_rate=app.max_sessions_per_minute,
            max_active=app.max_active_sessions_per_user,
            refuse=app.on_too_many_sessions is OnTooManySessions.REFUSE,
        )
        decision = await self._store.open_session(slot)
        if decision.outcome is not SlotOutcome.OPENED:
            self._metrics.session_creates_refused.labels(app.name, decision.outcome.value).inc()
            raise refusal(decision, user=request.user, app=app)
        # Registered on the shared store before anyone sees the secret; a
        # StoreUnavailable here is the caller's 503, with nothing handed out.
        try:
            await self._store.register(record)
        except StoreUnavailable:
            # If this fails too, the slot stays counted until the session
            # would have expired: never one session too many.
            with contextlib.suppress(StoreUnavailable):
                await self._store.close_session(slot)
            raise
        # The user's oldest sessions beyond the cap, revoked the normal way
        # (every replica, streams cut, audited), before the new one is out.
        for old in decision.evicted:
            await self._revoker.revoke(
                secret_hash=old.secret_hash, session_id=old.session_id, reason="too_many_sessions"
            )
        self._metrics.sessions_issued.labels(app.name).inc()
        return json_answer(200, {**document, "client_secret": secret}, app=app.name)

    async def cancel(self, session_id: str, headers: Headers) -> Answer:
        app = self._authenticate(headers)
        issued = await self._store.issued_session(session_id)
        # Another app's session is not found, exactly like an unknown id: the
        # answer must not tell a key holder what other apps have issued.
        if issued is None or (issued.app or DEFAULT_APP) != app.name:
            error = SessionNotFound(session_id)
            error.app = app.name
            raise error
        if not issued.revoked:
            await self._revoker.revoke_now(
                secret_hash=issued.secret_hash, session_id=session_id, reason="cancel"
            )
        document = json.loads(issued.document)
        document["status"] = "cancelled"
        return json_answer(200, document, app=app.name)
