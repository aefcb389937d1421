"""CORS on client routes, owned by the gateway when origins are configured.

A page on another origin calls the gateway with ``Authorization``, so every
call is preflighted (Fetch standard, "CORS-preflight request"), and the page
can read an answer, a 429's ``Retry-After`` included, only if that answer
carries ``Access-Control-Allow-Origin`` and exposes the header. The gateway's
own rejections never reach the upstream, so the upstream cannot add these
headers: the gateway must, on every answer, and drop the upstream's so a
browser never sees two (it refuses a response with two).
"""

from __future__ import annotations

import re
from email.utils import formatdate

from gateway.types import Headers

#: Response headers a page may read: the limiter's, and the id to report.
EXPOSED = (
    b"retry-after, retry-after-ms, x-ratelimit-limit-requests, "
    b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, ratelimit, "
    b"ratelimit-policy, x-request-id"
)
_TOKEN_LIST = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*$")
_MAX_AGE = b"600"


class CorsPolicy:
    """Which origins may call client routes, and the headers that say so."""

    __slots__ = ("_any", "_origins")

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.encode() for o in origins if o != "*")

    def allowed(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for this request's Origin, if any."""
        if origin is None:
            return None
        if self._any:
            # No credentials mode is used (the secret is a header the page
            # sets), so "*" is enough and caches better than an echo.
            return b"*"
        return origin if origin in self._origins else None

    def response_headers(self, origin: bytes | None) -> Headers:
        """Added to every answer on a client route, the gateway's errors included."""
        allow = self.allowed(origin)
        headers: Headers = [(b"vary", b"Origin")]
        if allow is not None:
            headers.append((b"access-control-allow-origin", allow))
            headers.append((b"access-control-expose-headers", EXPOSED))
        return headers

    def preflight(
        self, origin: bytes | None, methods: frozenset[str], requested_headers: bytes | None
    ) -> tuple[int, Headers]:
        """The gateway's own answer to a preflight: 204, or 403 for a foreign origin."""
        allow = self.allowed(origin)
        headers: Headers = [
            (b"date", formatdate(usegmt=True).encode()),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            (b"content-length", b"0"),
        ]
        if allow is None:
            return 403, headers
        headers += [
            (b"access-control-allow-origin", allow),
            (
                b"access-control-allow-methods",
                ", ".join(sorted(methods - {"OPTIONS"})).encode(),
            ),
            (b"access-control-max-age", _MAX_AGE),
        ]
        # Echo what the page asked for when it is a well-formed list: the
        # page's custom fetch decides its headers (Authorization, Content-Type,
        # OpenAI-Beta, traceparent...), and none of them is trusted for it.
        if requested_headers and _TOKEN_LIST.match(requested_headers.strip()):
            headers.append((b"access-control-allow-headers", requested_headers.strip()))
        return 204, headers
