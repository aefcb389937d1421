"""Who an admitted request acts as, told to the ChatKit server behind the gateway.

A self-hosted ChatKit server authenticates nobody itself (the SDK leaves it to
the app). In issuer mode the gateway has verified the client secret, so it
removes the client's credentials and any ``X-ChatKit-*`` header the client
sent, and states the session's identity in headers of its own. Servers that
can also be reached without the gateway verify ``X-ChatKit-Assertion``, a
short-lived HS256 JWT (RFC 7519) over the same facts.
"""

from __future__ import annotations

import functools
import json
import random
import time
from types import ModuleType
from typing import Any
from urllib.parse import quote

from gateway.ratelimit import Identity
from gateway.types import Headers

#: Identity header names, lower-case; strings, as the HTTP client takes them.
USER = "x-chatkit-user"
SESSION_ID = "x-chatkit-session-id"
WORKFLOW_ID = "x-chatkit-workflow-id"
WORKFLOW_VERSION = "x-chatkit-workflow-version"
EXPIRES_AT = "x-chatkit-expires-at"
ASSERTION = "x-chatkit-assertion"
#: The session's chatkit_configuration, so the server honours what the
#: gateway cannot see (history.recent_threads, automatic thread titling).
CONFIGURATION = "x-chatkit-configuration"
#: What the client's headers must not start with (ASGI carries bytes).
PREFIX = b"x-chatkit-"

#: Seeded from the OS once: assertion ids must be unique, not unpredictable
#: (the signature is what cannot be forged), and a syscall per request is not free.
_jti = random.Random()  # noqa: S311 - uniqueness, not secrecy


def strip_client_identity(headers: Headers) -> Headers:
    """The client's headers without its credentials or any claim to an identity."""
    return [
        (name, value)
        for name, value in headers
        # X_Chatkit_User too: WSGI and other servers that fold "_" into "-"
        # would read it as the identity header the gateway sets.
        if name != b"authorization" and not name.replace(b"_", b"-").startswith(PREFIX)
    ]


@functools.lru_cache(maxsize=1024)
def _configuration(document: str) -> Any:
    # A workflow's sessions share a few configurations: parsed once each.
    return json.loads(document)


class IdentityHeaders:
    """Builds the identity headers; signs an assertion when a key is configured."""

    __slots__ = ("_issuer", "_jwt", "_key", "_ttl")

    def __init__(self, *, signing_key: bytes | None, issuer: str, ttl_seconds: int) -> None:
        self._key = signing_key
        self._issuer = issuer
        self._ttl = ttl_seconds
        self._jwt: ModuleType | None = None
        if signing_key is not None:
            # Imported only when assertions are signed: PyJWT brings in
            # cryptography, ~8 MB of resident memory per worker otherwise.
            import jwt

            self._jwt = jwt

    def __call__(
        self, identity: Identity, *, request_id: bytes, now: int | None = None
    ) -> list[tuple[str, str]]:
        """The headers, as the HTTP client takes them (strings); ``now``
        (unix seconds, the clock by default) dates a signed assertion."""
        out = list(_plain(identity))
        if self._key is not None and self._jwt is not None:
            if now is None:
                now = int(time.time())
            claims = {
                "iss": self._issuer,
                "aud": identity.workflow_id,
                "sub": identity.user,
                "sid": identity.session_id,
                "iat": now,
                # Never outlives the session it speaks for.
                "exp": min(now + self._ttl, identity.expires_at),
                # The gateway's own, unique per assertion: the request id can
                # be the client's (X-Request-Id), so two assertions could share
                # it, and a server that refuses a jti it has seen (RFC 7519
                # 4.1.7) would refuse the second. The request id rides in rid.
                "jti": f"{_jti.getrandbits(128):032x}",
                "rid": request_id.decode("latin-1"),
            }
            if identity.workflow_version:
                claims["wfv"] = identity.workflow_version
            if identity.configuration:
                claims["cfg"] = _configuration(identity.configuration)
            token: str = self._jwt.encode(claims, self._key, algorithm="HS256")
            out.append((ASSERTION, token))
        return out


@functools.lru_cache(maxsize=4096)
def _plain(identity: Identity) -> tuple[tuple[str, str], ...]:
    """The unsigned headers of one session: the same for each of its requests,
    so built once (percent-encoding and formatting were ~3% of an issued
    request's CPU). Bounded; an evicted session's are built again."""
    # The user id is the app's own string (any UTF-8): percent-encoded so
    # it survives as a header value (RFC 9110 5.5 allows visible ASCII).
    out = [
        (USER, quote(identity.user, safe="")),
        (SESSION_ID, identity.session_id),
        (WORKFLOW_ID, identity.workflow_id),
        (EXPIRES_AT, str(identity.expires_at)),
    ]
    if identity.workflow_version:
        out.append((WORKFLOW_VERSION, quote(identity.workflow_version, safe="")))
    if identity.configuration:
        # Compact JSON of ASCII (json.dumps escapes the rest): a valid value.
        out.append((CONFIGURATION, identity.configuration))
    return tuple(out)
