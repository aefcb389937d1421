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
from types import ModuleType
from typing import Any
from urllib.parse import quote

from gateway.ratelimit import Identity
from gateway.types import Headers

#: Identity header names, lower-case as ASGI and aiohttp carry them.
USER = b"x-chatkit-user"
SESSION_ID = b"x-chatkit-session-id"
WORKFLOW_ID = b"x-chatkit-workflow-id"
WORKFLOW_VERSION = b"x-chatkit-workflow-version"
EXPIRES_AT = b"x-chatkit-expires-at"
ASSERTION = b"x-chatkit-assertion"
#: The session's chatkit_configuration, so the server honours what the
#: gateway cannot see (history.recent_threads, automatic thread titling).
CONFIGURATION = b"x-chatkit-configuration"
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

    def __call__(self, identity: Identity, *, request_id: bytes, now: int) -> Headers:
        # The user id is the app's own string (any UTF-8): percent-encoded so
        # it survives as a header value (RFC 9110 5.5 allows visible ASCII).
        out = [
            (USER, quote(identity.user, safe="").encode()),
            (SESSION_ID, identity.session_id.encode()),
            (WORKFLOW_ID, identity.workflow_id.encode()),
            (EXPIRES_AT, str(identity.expires_at).encode()),
        ]
        if identity.workflow_version:
            out.append((WORKFLOW_VERSION, quote(identity.workflow_version, safe="").encode()))
        if identity.configuration:
            # Compact JSON of ASCII (json.dumps escapes the rest): a valid value.
            out.append((CONFIGURATION, identity.configuration.encode()))
        if self._key is not None and self._jwt is not None:
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
            out.append((ASSERTION, token.encode()))
        return out
