"""Client-secret authentication: parsing the bearer token and hashing it.

The raw secret lives only in the request being handled. Everything stored,
logged or compared is its HMAC-SHA-256 under an optional pepper, so a leaked
Redis dump does not leak usable secrets, and lookups by hash never compare
secret bytes against attacker-chosen input.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from gateway.errors import AuthError
from gateway.head import RequestHead
from gateway.logs import Throttled
from gateway.types import Headers

_BEARER = b"bearer "
# RFC 6750 b64token, which covers every client-secret format seen (ek_..., etc.).
_TOKEN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
MAX_SECRET_BYTES = 1024


def bearer_secret(source: RequestHead | Headers) -> bytes:
    """The client secret from ``Authorization: Bearer <secret>``.

    ``source`` is the request's head as the protocol read it, or a header
    list where that is all there is (the gateway's own endpoints).

    Raises :class:`AuthError` with code ``missing_client_secret`` when there is
    no Authorization header, ``invalid_authorization`` when it is not exactly
    one well-formed bearer token.
    """
    if isinstance(source, list):
        values = [value for name, value in source if name == b"authorization"]
        found, count = (values[0] if values else None), len(values)
    else:
        found, count = source.authorization, source.authorizations
    if count > 1:
        raise AuthError("Send exactly one Authorization header.", code="invalid_authorization")
    if found is None:
        raise AuthError(
            "Missing client secret: send 'Authorization: Bearer <client_secret>'.",
            code="missing_client_secret",
        )
    if found[:7].lower() != _BEARER:
        raise AuthError(
            "The Authorization header must use the Bearer scheme.", code="invalid_authorization"
        )
    token = found[7:].strip(b" ")
    if not token or len(token) > MAX_SECRET_BYTES or not _TOKEN_BYTES.issuperset(token):
        raise AuthError("The bearer token is malformed.", code="invalid_authorization")
    return token


#: Hex digits of the user slot tag in a minted secret (``ek_<tag>_<random>``):
#: 65536 tags spread users over every Cluster slot.
TAG_LENGTH = 4
_TAG = re.compile(rb"[0-9a-f]{4}")


def split_tag(secret_hash: str) -> tuple[str, str]:
    """``(tag, digest)`` of a secret hash; the tag is empty for untagged secrets."""
    if len(secret_hash) > TAG_LENGTH and secret_hash[TAG_LENGTH] == "_":
        return secret_hash[:TAG_LENGTH], secret_hash[TAG_LENGTH + 1 :]
    return "", secret_hash


class SecretHasher:
    """Keyed hash of a client secret: the only form in which secrets are kept."""

    __slots__ = ("_key",)

    def __init__(self, pepper: bytes | None) -> None:
        # A fixed key without a pepper still separates these hashes from plain
        # SHA-256 of the secret; a pepper keeps them unguessable from a dump.
        self._key = pepper or b"chatkit-gateway/v1"

    def __call__(self, secret: bytes) -> str:
        digest = hmac.new(self._key, secret, hashlib.sha256).hexdigest()
        # A secret the gateway minted names its user's slot tag; the hash keeps
        # it, so the secret's state is stored beside its user's windows (one
        # Redis Cluster slot). A forged tag only points at a slot where this
        # secret is unknown.
        if secret.startswith(b"ek_") and secret[3 + TAG_LENGTH : 4 + TAG_LENGTH] == b"_":
            tag = secret[3 : 3 + TAG_LENGTH]
            if _TAG.fullmatch(tag):
                return f"{tag.decode()}_{digest}"
        # A model token given to a tagged secret's turn carries the same tag
        # (``ckmt_<tag>_<random>``): its grant lives in the session's slot.
        elif secret.startswith(b"ckmt_") and secret[5 + TAG_LENGTH : 6 + TAG_LENGTH] == b"_":
            tag = secret[5 : 5 + TAG_LENGTH]
            if _TAG.fullmatch(tag):
                return f"{tag.decode()}_{digest}"
        return digest

    def user_tag(self, user: str) -> str:
        """The slot tag of a user's issued secrets: keyed, so it names no user."""
        mac = hmac.new(self._key, b"user-tag\x00" + user.encode(), hashlib.sha256)
        return mac.hexdigest()[:TAG_LENGTH]


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare credentials without leaking the position of the first difference."""
    a_bytes = a.encode() if isinstance(a, str) else a
    b_bytes = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


def new_api_key() -> tuple[str, str]:
    """A fresh random issuer key and the ``sha256:`` entry to configure for it."""
    key = "ckgk_" + secrets.token_urlsafe(32)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


#: Seconds between two log lines about refused keys, however many are refused.
FAILURE_LOG_INTERVAL = 60.0


class _Counter(Protocol):
    def inc(self) -> None: ...


class FailedAttempts:
    """Refused operator credentials (issuer API keys, the admin token).

    Guessing a key costs the guesser a request and the gateway one SHA-256
    and a constant-time compare per configured key: nothing the guesser can
    make more expensive. Each refusal is counted; the log gets one line per
    ``interval`` with the count, so a brute force cannot flood it. Neither
    says anything about the key presented.
    """

    __slots__ = ("_counter", "_log", "_what")

    def __init__(
        self,
        counter: _Counter,
        logger: logging.Logger,
        what: str,
        *,
        interval: float = FAILURE_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counter = counter
        self._what = what
        self._log = Throttled(logger, interval, clock=clock)

    def record(self) -> None:
        self._counter.inc()
        self._log.warning("Refused a request with a missing or wrong %s", self._what)
