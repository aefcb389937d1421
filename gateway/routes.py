"""The route table (data, not branches) and the raw-path checks in front of it.

Deny by default: a request is forwarded only if its raw path passes
:func:`check_raw_path` and matches a :class:`Route`. Matching is on the raw
bytes of the target, never on a decoded form, so ``/v1/chatkit/%2e%2e/x`` can
not be made to mean something the table did not allow (the upstream may decode
differently from us; RFC 3986 section 6 leaves that open).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.errors import BadRequest, MethodNotAllowed, NotFound


class Kind(enum.Enum):
    """Who calls a route, and so what the gateway does around it."""

    #: Server-to-server call with an API key: credentials pass through.
    SERVER = "server"
    #: Session create: pass through, learn the session from the response.
    SESSION_CREATE = "session_create"
    #: Session cancel: pass through, revoke the secret on upstream success.
    SESSION_CANCEL = "session_cancel"
    #: Browser/client traffic carrying a ChatKit client secret.
    CLIENT = "client"
    #: Client traffic for a self-hosted ChatKit server whose sessions the
    #: gateway issues: the session's workflow picks the upstream.
    ISSUED = "issued"
    #: A ChatKit server's model call with a model token: forwarded to the
    #: model upstream with the gateway's own key.
    MODEL = "model"


#: The kinds a configured route may name (GATEWAY_ROUTES); ISSUED routes are
#: the gateway's own, present only in issuer mode.
CONFIGURABLE_KINDS: tuple[Kind, ...] = (
    Kind.SERVER,
    Kind.CLIENT,
    Kind.SESSION_CREATE,
    Kind.SESSION_CANCEL,
)

#: Every method a route may take; client traffic may use them all.
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Route:
    """One allowed family of requests.

    ``pattern`` is a path whose ``{name}`` segments match one non-empty
    segment, and whose trailing ``/**`` matches one or more further segments.
    """

    pattern: str
    methods: frozenset[str]
    kind: Kind
    upstream: str = "default"
    #: An exclusive route claims its path for every method: a method it does
    #: not take is a 405 rather than a match for a broader route below it.
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: dict[str, str]


# A parameter is one whole segment; check_raw_path has already vetted its bytes.
_ID = r"[^/]{1,256}"

#: The ChatKit API as OpenAI's published spec and official SDKs call it.
DEFAULT_ROUTES: tuple[Route, ...] = (
    Route("/v1/chatkit/sessions", frozenset({"POST"}), Kind.SESSION_CREATE, exclusive=True),
    Route(
        "/v1/chatkit/sessions/{session_id}/cancel",
        frozenset({"POST"}),
        Kind.SESSION_CANCEL,
        exclusive=True,
    ),
    Route("/v1/chatkit/threads", frozenset({"GET"}), Kind.SERVER),
    Route("/v1/chatkit/threads/{thread_id}", frozenset({"GET", "DELETE"}), Kind.SERVER),
    Route("/v1/chatkit/threads/{thread_id}/items", frozenset({"GET"}), Kind.SERVER),
    # Nothing else under sessions/ exists (no retrieve, no list): the
    # namespace is the server's, and a browser must not reach it as traffic.
    Route("/v1/chatkit/sessions/**", frozenset(), Kind.SERVER, exclusive=True),
    # Everything else under /v1/chatkit/ is client traffic: the hosted widget's
    # /conversation, uploads, and whatever the API adds next.
    Route("/v1/chatkit/**", METHODS, Kind.CLIENT),
)

#: Issuer mode's client routes: ChatKit JS custom mode posts every call to one
#: URL (``api.url``); uploads may go to paths below it.
ISSUED_PREFIX = "/chatkit"
ISSUED_ROUTES: tuple[Route, ...] = (
    Route(ISSUED_PREFIX, frozenset({"POST", "OPTIONS"}), Kind.ISSUED, upstream="workflow"),
    Route(ISSUED_PREFIX + "/**", METHODS, Kind.ISSUED, upstream="workflow"),
)
#: With no hosted upstream only the session API remains of the built-in table.
SESSION_ROUTES: tuple[Route, ...] = tuple(
    r for r in DEFAULT_ROUTES if r.pattern.startswith("/v1/chatkit/sessions")
)

# Bytes allowed in a raw path: RFC 3986 pchar and "/", minus the backslash.
_PATH_BYTES = re.compile(rb"^/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*$")
_PCT = re.compile(rb"%(?![0-9A-Fa-f]{2})|%(2[eEfF]|5[cC]|00)")
_PCT_TRIPLET = re.compile(rb"%([0-9A-Fa-f]{2})")


def check_raw_path(raw_path: bytes) -> None:
    """Reject a target that could be read two ways. Raises :class:`BadRequest`."""
    if not _PATH_BYTES.match(raw_path):
        raise BadRequest("The request path contains characters that are not allowed.")
    if _PCT.search(raw_path):
        raise BadRequest("The request path contains a forbidden or malformed percent-encoding.")
    if b"//" in raw_path:
        raise BadRequest("The request path contains an empty segment.")
    for segment in raw_path.split(b"/"):
        if segment in (b".", b".."):
            raise BadRequest("The request path contains a dot segment.")
    # A percent-encoded byte outside ASCII, or a control byte, is refused too:
    # the upstream has no reason to see one and decoders disagree about them.
    for octet in _PCT_TRIPLET.findall(raw_path):
        value = int(octet, 16)
        if value < 0x20 or value >= 0x7F:
            raise BadRequest("The request path contains an encoded control or non-ASCII byte.")


class RouteTable:
    """Matches ``(method, raw path)`` against routes in order; first match wins."""

    def __init__(self, routes: Iterable[Route] = DEFAULT_ROUTES) -> None:
        self._routes: list[tuple[re.Pattern[str], Route]] = [
            (_compile(route.pattern), route) for route in routes
        ]

    @property
    def routes(self) -> Sequence[Route]:
        return [route for _, route in self._routes]

    def match(self, method: str, path: str) -> Match:
        """Return the match or raise :class:`NotFound`/:class:`MethodNotAllowed`."""
        path_known = False
        claimed: str | None = None
        for regex, route in self._routes:
            # Once an exclusive route claims the path, only routes of the same
            # pattern (other methods on it) may still take it: GET on the
            # session-create path is a 405, not client traffic.
            if claimed is not None and route.pattern != claimed:
                continue
            found = regex.match(path)
            if found is None:
                continue
            if method not in route.methods:
                path_known = True
                if route.exclusive:
                    claimed = route.pattern
                continue
            return Match(route, found.groupdict())
        if path_known:
            raise MethodNotAllowed(f"Method {method} is not allowed on this path.")
        raise NotFound("Unknown route: this gateway only serves the ChatKit API.")


#: The model routes, served only with a model key: exactly these two paths,
#: so nothing else (``/v1/models``, ``/v1/responses/{id}``, files) is ever
#: sent with it.
MODEL_ROUTES: tuple[Route, ...] = (
    Route("/v1/responses", frozenset({"POST"}), Kind.MODEL, exclusive=True),
    Route("/v1/chat/completions", frozenset({"POST"}), Kind.MODEL, exclusive=True),
)


def table_with(
    configured: Iterable[Route], *, issued: bool = False, hosted: bool = True, model: bool = False
) -> RouteTable:
    """The built-in ChatKit table, after the routes configuration adds.

    ``issued`` adds issuer mode's client routes; without a ``hosted``
    upstream only the session API is kept of the OpenAI paths; ``model``
    puts the model routes first, where no configured route can shadow them.
    """
    builtin = DEFAULT_ROUTES if hosted else SESSION_ROUTES
    return RouteTable(
        [
            *(MODEL_ROUTES if model else ()),
            *configured,
            *(ISSUED_ROUTES if issued else ()),
            *builtin,
        ]
    )


def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    for segment in pattern.strip("/").split("/"):
        if segment == "**":
            out.append(r"[^/]+(?:/[^/]+)*")
        elif segment.startswith("{") and segment.endswith("}"):
            out.append(f"(?P<{segment[1:-1]}>{_ID})")
        else:
            out.append(re.escape(segment))
    return re.compile("^/" + "/".join(out) + "$")
