"""The request head as read once: what the gateway acts on, found while parsing.

The HTTP/1.1 connection (gateway/protocol.py) fills this in as llhttp reports
each header field, and puts it in the ASGI scope's ``extensions`` under
:data:`EXTENSION`. Everything downstream (routing, admission, CORS, the
forwarded headers) reads it instead of scanning the header list again; the
list itself is walked once more, to build the upstream's headers.

Served by plain uvicorn (tests, ``--http`` left at its default), the scope has
no such extension: :func:`request_head` builds the value from the scope's
headers in one walk, finding also what the gateway's protocol would have
refused (a malformed or conflicting Content-Length, too many header bytes).
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.types import Headers, Scope

#: The key of the head in ``scope["extensions"]``.
EXTENSION = "gateway.head"


class RequestHead(NamedTuple):
    """One request's head: framing, and the fields the gateway acts on.

    A field's value is its first occurrence, except ``connection`` (every
    Connection line, joined with commas: each one nominates hop-by-hop
    headers) and ``authorizations`` (counted: more than one is refused).
    A NamedTuple: one is made per request, and that is the cheapest way
    to make an immutable value in CPython.
    """

    method: str
    #: The request target as received (the protocol) or rebuilt from the scope.
    target: bytes
    host: bytes | None = None
    #: The declared body length; None when absent (or for ``chunked``).
    content_length: int | None = None
    #: A Transfer-Encoding was present (the protocol admits only ``chunked``).
    chunked: bool = False
    authorization: bytes | None = None
    authorizations: int = 0
    origin: bytes | None = None
    #: The CORS preflight markers (Fetch standard): Access-Control-Request-*.
    preflight_method: bytes | None = None
    preflight_headers: bytes | None = None
    connection: bytes | None = None
    upgrade: bytes | None = None
    request_id: bytes | None = None
    traceparent: bytes | None = None
    tracestate: bytes | None = None
    #: Header fields and their bytes (name + value + 4, as on the wire).
    fields: int = 0
    size: int = 0
    #: Why the framing cannot be trusted, as found without the gateway's
    #: protocol (which refuses such a request before the app sees it).
    problem: str | None = None
    #: Whether the gateway's protocol made this (and enforced its limits).
    checked: bool = False


#: Names of the fields the head keeps, and the slot each goes to. Looked up
#: once per header field, so one dict probe decides "not ours" for the rest.
HOST = 1
CONTENT_LENGTH = 2
TRANSFER_ENCODING = 3
AUTHORIZATION = 4
ORIGIN = 5
PREFLIGHT_METHOD = 6
PREFLIGHT_HEADERS = 7
CONNECTION = 8
UPGRADE = 9
REQUEST_ID = 10
TRACEPARENT = 11
TRACESTATE = 12
EXPECT = 13
ACTED_ON: dict[bytes, int] = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"authorization": AUTHORIZATION,
    b"origin": ORIGIN,
    b"access-control-request-method": PREFLIGHT_METHOD,
    b"access-control-request-headers": PREFLIGHT_HEADERS,
    b"connection": CONNECTION,
    b"upgrade": UPGRADE,
    b"x-request-id": REQUEST_ID,
    b"traceparent": TRACEPARENT,
    b"tracestate": TRACESTATE,
    b"expect": EXPECT,
}


def request_head(scope: Scope) -> RequestHead:
    """The head the protocol put in ``scope``, or one built from its headers."""
    extensions = scope.get("extensions")
    if extensions:
        head: RequestHead | None = extensions.get(EXTENSION)
        if head is not None:
            return head
    return head_from_headers(scope["method"], _target(scope), scope["headers"])


def _target(scope: Scope) -> bytes:
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


def head_from_headers(method: str, target: bytes, headers: Headers) -> RequestHead:
    """The head of a request whose header list is all there is: one walk.

    Names are lower-case, as ASGI servers hand them over.
    """
    found: dict[int, bytes] = {}
    authorizations = 0
    connection: list[bytes] = []
    lengths: set[bytes] = set()
    chunked = False
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        slot = ACTED_ON.get(name)
        if slot is None:
            continue
        if slot == AUTHORIZATION:
            authorizations += 1
        elif slot == CONNECTION:
            connection.append(value)
        elif slot == CONTENT_LENGTH:
            lengths.add(value)
        elif slot == TRANSFER_ENCODING:
            chunked = True
        found.setdefault(slot, value)
    problem = None
    content_length = None
    if lengths:
        # RFC 9112 6.3: a malformed length, or lengths that disagree, are an
        # unrecoverable framing error.
        if any(not v.isdigit() or len(v) > 19 for v in lengths):
            problem = "Malformed Content-Length header."
        elif len({int(v) for v in lengths}) > 1:
            problem = "Conflicting Content-Length headers."
        else:
            content_length = int(next(iter(lengths)))
    get = found.get
    return RequestHead(
        method,
        target,
        host=get(HOST),
        content_length=content_length,
        chunked=chunked,
        authorization=get(AUTHORIZATION),
        authorizations=authorizations,
        origin=get(ORIGIN),
        preflight_method=get(PREFLIGHT_METHOD),
        preflight_headers=get(PREFLIGHT_HEADERS),
        connection=b",".join(connection) if connection else None,
        upgrade=get(UPGRADE),
        request_id=get(REQUEST_ID),
        traceparent=get(TRACEPARENT),
        tracestate=get(TRACESTATE),
        fields=len(headers),
        size=size,
        problem=problem,
    )
