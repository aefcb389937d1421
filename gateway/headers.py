"""Header rewriting for both directions of the proxy. Pure functions.

RFC 9110 section 7.6.1: a proxy removes ``Connection``, every header that
``Connection`` nominates, and the hop-by-hop headers a client may send without
nominating them, *before* adding its own. Values are compared
case-insensitively; names arrive lower-cased from the ASGI server and aiohttp's
``raw_headers`` keeps the upstream's case, so both are normalised here.

A request's fields that decide something (Connection, Origin, the request id)
come from its :class:`~gateway.head.RequestHead`, read once while parsing; the
request's header list is walked here once, to build the upstream's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from gateway.errors import HeadersTooLarge
from gateway.head import RequestHead
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


def nominated_by(connection: bytes | None) -> frozenset[bytes]:
    """Hop-by-hop names given a message's Connection lines (joined with commas)."""
    if connection is None:
        return HOP_BY_HOP
    return HOP_BY_HOP | {token.strip().lower() for token in connection.split(b",")}


#: (Connection, ``without``) -> (names dropped, names looked at): clients send
#: one of a few Connection values (none, keep-alive, close), so the sets are
#: made once. Bounded in count and value length, so a spray of made-up values
#: cannot grow it.
_DROPPED: dict[tuple[bytes | None, frozenset[bytes]], tuple[frozenset[bytes], frozenset[bytes]]]
_DROPPED = {}
_DROPPED_SIZE = 256
_DROPPED_VALUE_BYTES = 64


def _dropped(
    connection: bytes | None, without: frozenset[bytes]
) -> tuple[frozenset[bytes], frozenset[bytes]]:
    key = (connection, without)
    sets = _DROPPED.get(key)
    if sets is None:
        drop = nominated_by(connection) | without
        sets = (drop, drop | _REPLACED | _FORWARDED)
        if connection is None or len(connection) <= _DROPPED_VALUE_BYTES:
            if len(_DROPPED) >= _DROPPED_SIZE:
                _DROPPED.clear()
            _DROPPED[key] = sets
    return sets


def check_limits(head: RequestHead, *, max_bytes: int, max_count: int) -> None:
    """The header limits, for a head the gateway's protocol did not hold to them."""
    if head.fields > max_count:
        raise HeadersTooLarge(f"Too many request headers (at most {max_count}).")
    if head.size > max_bytes:
        raise HeadersTooLarge(f"Request headers exceed {max_bytes} bytes.")


def request_id(given: bytes | None) -> bytes:
    """The caller's ``x-request-id`` (``given``) when it is well-formed, else a fresh one."""
    if given is not None and _REQUEST_ID.match(given):
        return given
    # 128 bits from a PRNG seeded from the OS at start-up: unique enough to
    # correlate logs across replicas, and not a secret. os.urandom (as uuid4
    # uses) is a syscall, measured at ~30 us on this VM: 5% of a request.
    return b"%032x" % _ids.getrandbits(128)


#: What a CORS preflight forwarded to the upstream leaves out: credentials and
#: body framing. A browser sends neither with a preflight (Fetch standard,
#: "CORS-preflight request"), so an OPTIONS that carries them is not a
#: browser's, and must not ride the preflight's exemption from admission.
PREFLIGHT_WITHOUT = frozenset(
    {b"authorization", b"cookie", b"content-length", b"transfer-encoding"}
)


def upstream_request_headers(
    headers: Headers,
    *,
    connection: bytes | None,
    client_ip: str | None,
    scheme: str,
    request_id: bytes,
    trust_forwarded: bool,
    forwarded_host: bytes | None = None,
    without: frozenset[bytes] = frozenset(),
    without_prefix: bytes | None = None,
) -> Headers:
    """Headers to send upstream for a client request (names lower-case).

    ``connection`` is the request's Connection lines (its head's), which
    nominate more hop-by-hop headers. ``without`` names more to leave out, and
    so does ``without_prefix`` (also in the ``_`` spelling). ``forwarded_host``
    is stated as X-Forwarded-Host unless a trusted proxy's stands. Host is
    left to the HTTP client, which sets it from the upstream URL.
    """
    drop, special = _dropped(connection, without)
    out: Headers = []
    forwarded_for: list[bytes] = []
    via: list[bytes] = []
    has_proto = has_host = False
    for name, value in headers:
        # One set probe passes the common header; the rest is sorted out here.
        if name in special:
            if name in drop or name in _REPLACED:
                if name == b"via":
                    via.append(value)
            elif trust_forwarded:  # one of _FORWARDED
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                else:
                    has_proto = has_proto or name == b"x-forwarded-proto"
                    has_host = has_host or name == b"x-forwarded-host"
                    out.append((name, value))
            continue
        if b"_" in name and _is_twin(name, drop):
            continue
        if (
            without_prefix is not None
            and name[:1] == without_prefix[:1]  # most names fail here, cheaply
            and name.replace(b"_", b"-").startswith(without_prefix)
        ):
            continue
        out.append((name, value))
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    out.append((b"x-request-id", request_id))
    if client_ip is not None:
        forwarded_for.append(client_ip.encode())
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    # A trusted proxy's X-Forwarded-Proto (and -Host) stands; without one,
    # say what we saw.
    if not has_proto:
        out.append((b"x-forwarded-proto", scheme.encode()))
    if forwarded_host is not None and not has_host:
        out.append((b"x-forwarded-host", forwarded_host))
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


def is_cors_preflight(head: RequestHead) -> bool:
    """A browser's CORS preflight: OPTIONS with Origin and Access-Control-Request-Method.

    The Fetch standard sends preflights without credentials or a body, so a
    genuine one never carries a client secret (see :data:`PREFLIGHT_WITHOUT`).
    """
    return (
        head.method == "OPTIONS" and head.origin is not None and head.preflight_method is not None
    )
