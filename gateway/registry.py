"""Learning sessions from session-create responses as they pass through.

There is no upstream endpoint to look a session up later, so the create
response is the only chance to learn a secret's session, limit, expiry and
user. Parsing is forgiving (unknown fields are ignored, the stale shapes in
the spec's examples are accepted) and never affects the response itself.
"""

from __future__ import annotations

import re
import time
import zlib
from typing import Any

from gateway.auth import SecretHasher
from gateway.jsonbody import Unreadable, is_text, loads
from gateway.store.base import SessionRecord

# Session ids go into Redis keys inside a hash tag, so braces and the like are
# refused; every id seen in the API matches this.
SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")
DEFAULT_TTL_SECONDS = 600  # the API's default expires_after


class Unlearnable(ValueError):
    """The response cannot be learned from; ``reason`` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _limit(body: dict[str, Any]) -> int | None:
    for value in (body.get("max_requests_per_1_minute"), _nested_limit(body)):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _nested_limit(body: dict[str, Any]) -> object:
    limits = body.get("rate_limits")
    return limits.get("max_requests_per_1_minute") if isinstance(limits, dict) else None


def session_from_response(
    body: bytes, *, hasher: SecretHasher, default_limit: int, now: float | None = None
) -> SessionRecord:
    """The session a create response describes; raises :class:`Unlearnable`."""
    try:
        data = loads(body)
    except Unreadable:
        raise Unlearnable("not_json") from None
    if not isinstance(data, dict):
        raise Unlearnable("not_object")
    secret = _secret(data)
    if secret is None:
        raise Unlearnable("no_client_secret")
    session_id = data.get("id")
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise Unlearnable("bad_session_id")
    expires_at = data.get("expires_at")
    if not isinstance(expires_at, int) or isinstance(expires_at, bool) or expires_at <= 0:
        expires_at = int((now if now is not None else time.time()) + DEFAULT_TTL_SECONDS)
    user = data.get("user")
    return SessionRecord(
        secret_hash=hasher(secret.encode()),
        session_id=session_id,
        user=user_text(user) if isinstance(user, str) else "",
        expires_at=expires_at,
        limit=_limit(data) or default_limit,
    )


def secret_hash_from_cancel(body: bytes, *, hasher: SecretHasher) -> str | None:
    """The secret hash when a cancel response echoes ``client_secret`` (often it does not)."""
    try:
        data = loads(body)
    except Unreadable:
        return None
    secret = _secret(data) if isinstance(data, dict) else None
    return hasher(secret.encode()) if secret is not None else None


def _secret(data: dict[str, Any]) -> str | None:
    """The answer's client secret, if it is one a client could ever present.

    A secret with a lone surrogate (``"\\ud800"`` in the JSON) cannot be
    encoded, so no request can carry it: there is nothing to learn or revoke.
    """
    secret = data.get("client_secret")
    if isinstance(secret, dict):  # some API versions nest {"value": ..., "expires_at": ...}
        secret = secret.get("value")
    return secret if isinstance(secret, str) and secret and is_text(secret) else None


def user_text(user: str) -> str:
    """The user as storable text: a lone surrogate (valid JSON, not encodable) is
    kept as its escape, ``\\ud800``, so distinct users stay distinct and the
    session is learned (per-user limits included) instead of failing to register.
    """
    return user if is_text(user) else user.encode("utf-8", "backslashreplace").decode()


def decoded_body(body: bytes, content_encoding: str | None, *, limit: int) -> bytes | None:
    """The body as JSON text for parsing, whatever gzip/deflate it came in.

    The gateway asks for identity on these routes, but an upstream may
    compress anyway; the caller still receives the bytes as they came. None
    when the encoding is one we do not read or the text would exceed ``limit``
    (a decompression bomb stops there).
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        # RFC 9110 says zlib-wrapped; some servers send raw deflate.
        wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
    else:
        return None
    decompressor = zlib.decompressobj(wbits)
    try:
        text = decompressor.decompress(body, limit)
    except zlib.error:
        return None
    if decompressor.unconsumed_tail:
        return None
    return text
