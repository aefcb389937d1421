"""Header rewriting for both directions of the proxy. Pure functions.

RFC 9110 section 7.6.1: a proxy removes ``Connection``, every header that
``Connection`` nominates, and the hop-by-hop headers a client may send without
nominating them, *before* adding its own. Values are compared
case-insensitively; names arrive lower-cased from the ASGI server and aiohttp's
``raw_headers`` keeps the upstream's case, so both are normalised here.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from gateway.errors import BadRequest, HeadersTooLarge
from gateway.types import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        # Credentials meant for this proxy, not the next hop (RFC 9110 11.7.2).
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Set by the gateway (Host by the HTTP client, from the upstream URL), never
# copied from the client. Expect: the gateway answers 100-continue itself.
_REPLACED = frozenset({b"host", b"via", b"x-request-id", b"expect"})
_FORWARDED = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"}
)
# Framing the HTTP client sets itself from the body it sends.
_FRAMING = frozenset({b"content-length"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
VIA = b"1.1 chatkit-gateway"
_ids = random.Random()  # noqa: S311 - seeded from os.urandom; request ids, never secrets


def nominated(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Hop-by-hop names for this message: the fixed set plus what Connection names."""
    extra: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            extra.update(token.strip().lower() for token in value.split(b","))
    return HOP_BY_HOP | extra if extra else HOP_BY_HOP


def check_limits(headers: Headers, *, max_bytes: int, max_count: int) -> None:
    if len(headers) > max_count:
        raise HeadersTooLarge(f"Too many request headers (at most {max_count}).")
    if sum(len(n) + len(v) + 4 for n, v in headers) > max_bytes:
        raise HeadersTooLarge(f"Request headers exceed {max_bytes} bytes.")


def request_id(headers: Headers) -> bytes:
    """The caller's ``x-request-id`` when it is well-formed, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            if _REQUEST_ID.match(value):
                return value
            break
    # 128 bits from a PRNG seeded from the OS at start-up: unique enough to
    # correlate logs across replicas, and not a secret. os.urandom (as uuid4
    # uses) is a syscall, measured at ~30 us on this VM: 5% of a request.
    return b"%032x" % _ids.getrandbits(128)


def upstream_request_headers(
    headers: Headers,
    *,
    client_ip: str | None,
    scheme: str,
    request_id: bytes,
    trust_forwarded: bool,
) -> Headers:
    """Headers to send upstream for a client request (names lower-case).

    Host is left to the HTTP client, which sets it from the upstream URL.
    """
    drop = nominated(headers)
    out: Headers = []
    forwarded_for: list[bytes] = []
    via: list[bytes] = []
    for name, value in headers:
        if b"_" in name and _is_twin(name, drop):
            continue
        if name in drop or name in _REPLACED:
            if name == b"via":
                via.append(value)
            continue
        if name in _FORWARDED:
            if trust_forwarded:
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                else:
                    out.append((name, value))
            continue
        out.append((name, value))
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    out.append((b"x-request-id", request_id))
    if client_ip is not None:
        forwarded_for.append(client_ip.encode())
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    # A trusted proxy's X-Forwarded-Proto stands; without one, say what we saw.
    if not trust_forwarded or header_value(out, b"x-forwarded-proto") is None:
        out.append((b"x-forwarded-proto", scheme.encode()))
    return out


#: An upstream's own rate-limit headers, dropped where the gateway states its
#: limiter's: one authoritative set per response, never two that disagree.
RATE_LIMIT_HEADERS = frozenset(
    {
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
        b"x-ratelimit-reset-requests",
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
        b"ratelimit",
        b"ratelimit-policy",
    }
)
#: An upstream's CORS answer headers, dropped where the gateway owns CORS.
CORS_HEADERS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)


def _is_twin(name: bytes, drop: frozenset[bytes]) -> bool:
    """``X_Forwarded_For`` and the like: a name that servers folding ``_`` into
    ``-`` (as CGI-style frameworks do) would read as a header the gateway
    drops or sets itself. It goes with its dashed form, never trusted."""
    folded = name.replace(b"_", b"-")
    return folded in drop or folded in _REPLACED or folded in _FORWARDED or folded in _FRAMING


def client_response_headers(
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    request_id: bytes,
    drop: frozenset[bytes] = frozenset(),
) -> Headers:
    """Headers to send the client for an upstream response (names lower-case).

    Repeated headers such as Set-Cookie stay as separate lines, in order.
    ``drop`` names headers the gateway states itself instead.
    """
    lowered = [(name.lower(), value) for name, value in raw_headers]
    drop = nominated(lowered) | drop if drop else nominated(lowered)
    out: Headers = []
    via: list[bytes] = []
    has_request_id = False
    for name, value in lowered:
        if name in drop:
            continue
        if name == b"via":
            via.append(value)
            continue
        if name == b"x-request-id":
            has_request_id = True
        out.append((name, value))
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    if not has_request_id:
        out.append((b"x-request-id", request_id))
    return out


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def content_length(headers: Headers) -> int | None:
    """The declared body length; conflicting or malformed values are refused (RFC 9112 6.3)."""
    found: int | None = None
    for name, value in headers:
        if name != b"content-length":
            continue
        if not value.isdigit() or len(value) > 19:
            raise BadRequest("Malformed Content-Length header.")
        parsed = int(value)
        if found is not None and found != parsed:
            raise BadRequest("Conflicting Content-Length headers.")
        found = parsed
    return found


def is_cors_preflight(method: str, headers: Headers) -> bool:
    """A browser's CORS preflight: OPTIONS with Origin and Access-Control-Request-Method.

    The Fetch standard sends preflights without credentials or a body, so a
    genuine one never carries a client secret (see :func:`preflight_headers`).
    """
    if method != "OPTIONS":
        return False
    names = {name for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names


def preflight_headers(headers: Headers) -> Headers:
    """A preflight's headers as forwarded: no credentials, and no body framing.

    A browser sends neither with a preflight (Fetch standard, "CORS-preflight
    request"), so an OPTIONS that carries them is not a browser's, and must
    not ride the preflight's exemption from admission to the upstream.
    """
    return [
        (name, value)
        for name, value in headers
        if name not in (b"authorization", b"cookie", b"content-length", b"transfer-encoding")
    ]
