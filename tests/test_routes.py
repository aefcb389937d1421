"""The route table and the raw-path checks in front of it (gateway/routes.py).

Deny by default: a target is forwarded only if its raw bytes pass
``check_raw_path`` and ``RouteTable.match`` finds an allowed (method, path).
The end-to-end counterpart, with the fake upstream counting what reached it,
is in test_proxy.py.
"""

from __future__ import annotations

import json

import pytest

from gateway.errors import BadRequest, MethodNotAllowed, NotFound
from gateway.routes import DEFAULT_ROUTES, Kind, Route, RouteTable, check_raw_path

TABLE = RouteTable()


def classify(method: str, raw_path: bytes) -> Kind:
    """What the proxy does first: vet the raw bytes, then match the table."""
    check_raw_path(raw_path)
    return TABLE.match(method, raw_path.decode("ascii")).route.kind


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        # The server calls of the official SDKs, each with its own kind.
        ("POST", "/v1/chatkit/sessions", Kind.SESSION_CREATE),
        ("POST", "/v1/chatkit/sessions/cksess_123/cancel", Kind.SESSION_CANCEL),
        ("GET", "/v1/chatkit/threads", Kind.SERVER),
        ("GET", "/v1/chatkit/threads/cthr_1", Kind.SERVER),
        ("DELETE", "/v1/chatkit/threads/cthr_1", Kind.SERVER),
        ("GET", "/v1/chatkit/threads/cthr_1/items", Kind.SERVER),
        # Everything else under /v1/chatkit/ is client traffic (needs a client secret).
        ("POST", "/v1/chatkit/conversation", Kind.CLIENT),
        ("POST", "/v1/chatkit/domain_keys/verify_hosted", Kind.CLIENT),
        ("GET", "/v1/chatkit/files/file_1/content", Kind.CLIENT),
        ("PUT", "/v1/chatkit/uploads/u_1", Kind.CLIENT),
        ("PATCH", "/v1/chatkit/anything", Kind.CLIENT),
        ("OPTIONS", "/v1/chatkit/conversation", Kind.CLIENT),
        # Other methods on the thread paths may be client traffic (CHATKIT.md:
        # every path but the session endpoints), so they need a client secret.
        ("POST", "/v1/chatkit/threads/cthr_1", Kind.CLIENT),
        # Unreserved, sub-delims and ":"/"@" are ordinary path bytes (RFC 3986 pchar).
        ("GET", "/v1/chatkit/threads/a-b_c.d~e", Kind.SERVER),
        ("POST", "/v1/chatkit/x:y@z!$&'()*+,;=", Kind.CLIENT),
        # Percent-encoding of ordinary printable ASCII is left alone (upstream decodes).
        ("GET", "/v1/chatkit/threads/cthr%201", Kind.SERVER),
        ("GET", "/v1/chatkit/threads/%41%7e", Kind.SERVER),
        # A dot inside a segment is not a dot segment.
        ("GET", "/v1/chatkit/threads/cthr..1", Kind.SERVER),
        ("POST", "/v1/chatkit/.well-known", Kind.CLIENT),
        ("POST", "/v1/chatkit/...", Kind.CLIENT),
    ],
)
def test_allowed_routes_are_classified(method: str, path: str, kind: Kind) -> None:
    assert classify(method, path.encode()) is kind


def test_route_parameters_are_captured() -> None:
    match = TABLE.match("POST", "/v1/chatkit/sessions/cksess_abc/cancel")
    assert match.params == {"session_id": "cksess_abc"}
    assert TABLE.match("GET", "/v1/chatkit/threads/cthr_9/items").params == {"thread_id": "cthr_9"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/chatkit"),  # the prefix itself is not a route
        ("POST", "/v1/chatkit/"),  # nor the prefix with an empty last segment
        ("GET", "/v1/chatkit/threads/"),  # trailing slash: an empty segment
        ("POST", "/v1/chat/completions"),  # the rest of the OpenAI API is not served
        ("POST", "/v1/responses"),
        ("GET", "/v1/models"),
        ("POST", "/v2/chatkit/sessions"),
        ("POST", "/V1/chatkit/sessions"),  # paths are case-sensitive
        ("POST", "/v1/ChatKit/sessions"),
        ("POST", "/chatkit/sessions"),  # base URL without /v1
        ("GET", "/admin"),
        ("GET", "/v1/chatkitx/sessions"),  # a prefix match on bytes is not a segment match
    ],
)
def test_unknown_routes_are_not_found(method: str, path: str) -> None:
    check_raw_path(path.encode())  # well-formed: it is the table that says no
    with pytest.raises(NotFound) as caught:
        TABLE.match(method, path)
    assert caught.value.status == 404
    assert caught.value.code == "unknown_route"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # Methods no route lists, on paths some route knows.
        ("HEAD", "/v1/chatkit/threads"),
        ("TRACE", "/v1/chatkit/conversation"),
        ("CONNECT", "/v1/chatkit/sessions"),
        ("HEAD", "/v1/chatkit/threads/cthr_1/items"),
        # Method names are case-sensitive (RFC 9110 9.1).
        ("post", "/v1/chatkit/sessions"),
        # The session endpoints claim their paths and the whole sessions
        # namespace (no other session endpoint exists): never client traffic.
        ("GET", "/v1/chatkit/sessions"),
        ("GET", "/v1/chatkit/sessions/cksess_123/cancel"),
        ("GET", "/v1/chatkit/sessions/cksess_123"),
        ("POST", "/v1/chatkit/sessions/cksess_123/other"),
    ],
)
def test_known_path_with_wrong_method_is_405(method: str, path: str) -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        TABLE.match(method, path)
    assert caught.value.status == 405


@pytest.mark.parametrize(
    "raw_path",
    [
        # Dot segments, literal.
        b"/v1/chatkit/../admin",
        b"/v1/chatkit/./sessions",
        b"/v1/chatkit/threads/..",
        b"/v1/chatkit/threads/.",
        b"/v1/chatkit/sessions/x/../../../admin",
        # Dot segments, percent-encoded in either case, whole or partly.
        b"/v1/chatkit/%2e%2e/admin",
        b"/v1/chatkit/%2E%2E/admin",
        b"/v1/chatkit/.%2e/admin",
        b"/v1/chatkit/%2e./admin",
        b"/v1/chatkit/%2e/sessions",
        # Any encoded dot is refused, even one that is not a whole segment.
        b"/v1/chatkit/threads/cthr%2e1",
        # Encoded slashes and backslashes: one segment to us, two to someone else.
        b"/v1/chatkit/threads%2fcthr_1",
        b"/v1/chatkit/threads%2Fcthr_1",
        b"/v1/chatkit/x%5c..%5cadmin",
        b"/v1/chatkit/x%5C..%5Cadmin",
        # Raw backslashes.
        b"/v1/chatkit\\..\\admin",
        b"/v1/chatkit/threads\\cthr_1",
        # Double slashes (empty segments), anywhere.
        b"//v1/chatkit/sessions",
        b"/v1//chatkit/sessions",
        b"/v1/chatkit//sessions",
        b"/v1/chatkit/threads//items",
        # Control bytes, raw.
        b"/v1/chatkit/sessions\x00",
        b"/v1/chatkit/con\tversation",
        b"/v1/chatkit/con\x7fversation",
        b"/v1/chatkit/\r\nX-Injected: 1",
        # Non-ASCII, raw (UTF-8 and Latin-1 bytes).
        "/v1/chatkit/caf\u00e9".encode(),
        b"/v1/chatkit/caf\xe9",
        "/v1/chatkit/\u2025/admin".encode(),  # TWO DOT LEADER
        # Characters outside pchar.
        b"/v1/chatkit/a b",
        b"/v1/chatkit/<script>",
        b'/v1/chatkit/"x"',
        b"/v1/chatkit/a|b",
        b"/v1/chatkit/a^b",
        b"/v1/chatkit/a`b",
        b"/v1/chatkit/{id}",
        # Malformed percent-encodings.
        b"/v1/chatkit/threads/%",
        b"/v1/chatkit/threads/%4",
        b"/v1/chatkit/threads/%zz",
        b"/v1/chatkit/threads/%g0",
        b"/v1/chatkit/threads/100%",
        # Encoded control bytes, NUL and DEL.
        b"/v1/chatkit/threads/%00",
        b"/v1/chatkit/threads/cthr%0d%0aX-Injected:%201",
        b"/v1/chatkit/threads/%09",
        b"/v1/chatkit/threads/%1f",
        b"/v1/chatkit/threads/%7f",
        b"/v1/chatkit/threads/%7F",
        # Encoded non-ASCII bytes (overlong UTF-8 dots among them).
        b"/v1/chatkit/threads/caf%c3%a9",
        b"/v1/chatkit/%c0%ae%c0%ae/admin",
        b"/v1/chatkit/%C0%AE%C0%AE/admin",
        b"/v1/chatkit/threads/%ff",
        b"/v1/chatkit/threads/%80",
        # Not an origin-form path at all.
        b"",
        b"v1/chatkit/sessions",
        b"*",
        b"http://evil/v1/chatkit/sessions",
    ],
)
def test_hostile_raw_paths_are_bad_requests(raw_path: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        check_raw_path(raw_path)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"


def test_error_bodies_are_openai_shaped() -> None:
    with pytest.raises(BadRequest) as caught:
        check_raw_path(b"/v1/chatkit/%2e%2e/admin")
    body = caught.value.body()
    assert body.startswith(b'{"error":{')
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_an_unconfigured_table_is_the_chatkit_api_on_the_default_upstream() -> None:
    # Other upstreams exist only where configuration adds routes for them.
    assert [route.upstream for route in DEFAULT_ROUTES] == ["default"] * len(DEFAULT_ROUTES)
    assert list(TABLE.routes) == list(DEFAULT_ROUTES)


def test_first_matching_route_wins_and_exclusive_routes_claim_their_path() -> None:
    table = RouteTable(
        [
            Route("/v1/selfhosted/chatkit", frozenset({"POST"}), Kind.CLIENT, upstream="self"),
            Route("/v1/selfhosted/admin", frozenset({"POST"}), Kind.SERVER, exclusive=True),
            Route("/v1/selfhosted/**", frozenset({"GET"}), Kind.SERVER),
        ]
    )
    match = table.match("POST", "/v1/selfhosted/chatkit")
    assert (match.route.kind, match.route.upstream) == (Kind.CLIENT, "self")
    # A non-exclusive route lets other methods fall through to broader ones...
    assert table.match("GET", "/v1/selfhosted/chatkit").route.kind is Kind.SERVER
    assert table.match("GET", "/v1/selfhosted/a/b/c").route.kind is Kind.SERVER
    # ...an exclusive one does not.
    with pytest.raises(MethodNotAllowed):
        table.match("GET", "/v1/selfhosted/admin")
    with pytest.raises(NotFound):
        table.match("POST", "/v1/chatkit/sessions")
    with pytest.raises(MethodNotAllowed):
        table.match("DELETE", "/v1/selfhosted/chatkit")


def test_parameters_are_one_bounded_segment() -> None:
    # An id is exactly one segment of at most 256 bytes; longer ones are not the
    # thread route (they fall through to client traffic, which needs a secret).
    assert TABLE.match("GET", "/v1/chatkit/threads/" + "a" * 256).route.kind is Kind.SERVER
    assert TABLE.match("GET", "/v1/chatkit/threads/" + "a" * 257).route.kind is Kind.CLIENT
    assert TABLE.match("GET", "/v1/chatkit/threads/a/b").route.kind is Kind.CLIENT
