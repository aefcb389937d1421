"""Header rewriting in both directions (gateway/headers.py), as pure functions.

RFC 9110 7.6.1: a proxy removes ``Connection``, every header ``Connection``
nominates, and the well-known hop-by-hop headers before adding its own. The
over-the-wire counterpart is in test_proxy.py.
"""

from __future__ import annotations

import re

import pytest

from gateway.errors import HeadersTooLarge
from gateway.head import head_from_headers
from gateway.headers import (
    HOP_BY_HOP,
    VIA,
    check_limits,
    client_response_headers,
    header_value,
    nominated,
    nominated_by,
    request_id,
    upstream_request_headers,
)
from gateway.identity import PREFIX, strip_client_identity

Headers = list[tuple[bytes, bytes]]
RID = b"req-fixed-1"


def upstream(
    headers: Headers, *, trust: bool = False, client_ip: str | None = "203.0.113.7"
) -> Headers:
    # Connection as the request's head carries it (every line, joined).
    connection = head_from_headers("GET", b"/", headers).connection
    return upstream_request_headers(
        headers,
        connection=connection,
        client_ip=client_ip,
        scheme="https",
        request_id=RID,
        trust_forwarded=trust,
    )


def names(headers: Headers) -> list[bytes]:
    return [name for name, _ in headers]


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


# -- hop-by-hop, both directions ------------------------------------------------

#: The fixed hop-by-hop set, none nominated by Connection: every one goes.
FIXED_HOP_BY_HOP: Headers = [
    (b"keep-alive", b"timeout=5"),
    (b"proxy-connection", b"keep-alive"),
    (b"te", b"trailers"),
    (b"trailer", b"x-checksum"),
    (b"transfer-encoding", b"chunked"),
    (b"upgrade", b"websocket"),
    (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
    (b"proxy-authenticate", b"Basic"),
]

HOP_CASES = [
    # (headers as received, names that must not be forwarded)
    (FIXED_HOP_BY_HOP, {name for name, _ in FIXED_HOP_BY_HOP}),
    # Connection itself, and one header it nominates.
    ([(b"connection", b"x-hop")], {b"connection", b"x-hop"}),
    # Several tokens, odd spacing and case.
    (
        [(b"connection", b"X-One ,  x-TWO,close,Keep-Alive")],
        {b"connection", b"x-one", b"x-two", b"keep-alive"},
    ),
    # Several Connection header lines add up.
    (
        [(b"connection", b"x-one"), (b"connection", b"X-Two")],
        {b"connection", b"x-one", b"x-two"},
    ),
    # A nominated end-to-end-looking header is still dropped (it was nominated).
    ([(b"connection", b"x-api-version")], {b"connection", b"x-api-version"}),
]

END_TO_END: Headers = [
    (b"authorization", b"Bearer ek_secret"),
    (b"content-type", b"application/json"),
    (b"openai-beta", b"chatkit_beta=v1"),
    (b"x-end-to-end", b"kept"),
]


@pytest.mark.parametrize(("hop", "dropped"), HOP_CASES)
def test_request_hop_by_hop_headers_are_not_forwarded(hop: Headers, dropped: set[bytes]) -> None:
    present = [(name, b"v") for name in sorted(dropped) if name not in names(hop)]
    out = upstream([*END_TO_END, *hop, *present])
    assert not dropped & set(names(out))
    for header in END_TO_END:
        assert header in out


@pytest.mark.parametrize(("hop", "dropped"), HOP_CASES)
def test_response_hop_by_hop_headers_are_not_forwarded(hop: Headers, dropped: set[bytes]) -> None:
    present = [(name, b"v") for name in sorted(dropped) if name not in names(hop)]
    # The upstream's own spelling: aiohttp's raw_headers keep the original case.
    raw = [(name.title(), value) for name, value in [*END_TO_END, *hop, *present]]
    out = client_response_headers(raw, request_id=RID)
    assert not dropped & set(names(out))
    for header in END_TO_END:
        assert header in out


def test_connection_nominations_are_case_insensitive_on_the_response() -> None:
    raw = [(b"Connection", b"X-Hop-Secret, keep-alive"), (b"X-HOP-SECRET", b"1"), (b"X-E2E", b"1")]
    out = client_response_headers(raw, request_id=RID)
    assert names(out) == [b"x-e2e", b"via", b"x-request-id"]


def test_nominated_always_includes_the_fixed_set() -> None:
    assert nominated([]) == HOP_BY_HOP
    assert nominated([(b"connection", b"X-A, x-b")]) == HOP_BY_HOP | {b"x-a", b"x-b"}


def test_forwarded_request_keeps_order_and_duplicates() -> None:
    headers = [(b"x-a", b"1"), (b"accept", b"text/event-stream"), (b"x-a", b"2")]
    assert values(upstream(headers), b"x-a") == [b"1", b"2"]


def test_client_cannot_choose_host_or_expect() -> None:
    out = upstream([(b"host", b"evil.example"), (b"expect", b"100-continue")])
    # Host comes from the upstream URL (set by the HTTP client); Expect is answered here.
    assert b"host" not in names(out)
    assert b"expect" not in names(out)


# -- Via, both directions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        ([], VIA),  # no Via: ours alone
        ([(b"via", b"1.0 fred")], b"1.0 fred, " + VIA),  # appended to what came
        ([(b"via", b"1.0 a"), (b"via", b"1.1 b")], b"1.0 a, 1.1 b, " + VIA),
    ],
)
def test_via_is_appended_both_ways(incoming: Headers, expected: bytes) -> None:
    assert values(upstream(incoming), b"via") == [expected]
    raw = [(b"Via", value) for _, value in incoming]
    assert values(client_response_headers(raw, request_id=RID), b"via") == [expected]


# -- x-request-id -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "propagated"),
    [
        ([(b"x-request-id", b"abc-123")], True),
        ([(b"x-request-id", b"req_01HXYZ.trace:span-9")], True),
        ([(b"x-request-id", b"a" * 128)], True),  # longest accepted
        ([], False),  # none sent: generated
        ([(b"x-request-id", b"")], False),  # empty
        ([(b"x-request-id", b"a" * 129)], False),  # too long
        ([(b"x-request-id", b"has space")], False),
        ([(b"x-request-id", b"inject\r\nx: 1")], False),  # header injection attempt
        ([(b"x-request-id", b"caf\xc3\xa9")], False),  # non-ASCII
        ([(b"x-request-id", b"a/b")], False),
    ],
)
def test_request_id_is_propagated_only_when_well_formed(
    incoming: Headers, propagated: bool
) -> None:
    rid = request_id(head_from_headers("GET", b"/", incoming).request_id)
    if propagated:
        assert rid == incoming[0][1]
    else:
        assert re.fullmatch(rb"[0-9a-f]{32}", rid)


def test_generated_request_ids_differ() -> None:
    assert len({request_id(None) for _ in range(100)}) == 100


def test_request_id_replaces_the_clients_upstream() -> None:
    out = upstream([(b"x-request-id", b"client-sent")])
    # The id the gateway chose (the caller's when well-formed) is sent once.
    assert values(out, b"x-request-id") == [RID]


@pytest.mark.parametrize(
    ("upstream_headers", "expected"),
    [
        ([], [RID]),  # the upstream sent none: the client learns ours
        ([(b"X-Request-Id", b"req_upstream")], [b"req_upstream"]),  # the upstream's wins
    ],
)
def test_response_carries_one_request_id(upstream_headers: Headers, expected: list[bytes]) -> None:
    assert values(client_response_headers(upstream_headers, request_id=RID), b"x-request-id") == (
        expected
    )


# -- X-Forwarded-* and Forwarded ---------------------------------------------------

SPOOFED: Headers = [
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"x-forwarded-host", b"admin.internal"),
    (b"x-forwarded-proto", b"http"),
    (b"x-real-ip", b"10.0.0.2"),
    (b"forwarded", b"for=10.0.0.3;proto=http"),
]


def test_client_forwarding_headers_are_replaced_by_default() -> None:
    out = upstream(SPOOFED)
    # Only what the gateway saw itself: the socket peer and the listener's scheme.
    assert values(out, b"x-forwarded-for") == [b"203.0.113.7"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    for name in (b"x-forwarded-host", b"x-real-ip", b"forwarded"):
        assert name not in names(out)


def test_trusted_forwarding_headers_are_extended() -> None:
    out = upstream(SPOOFED, trust=True)
    assert values(out, b"x-forwarded-for") == [b"10.0.0.1, 203.0.113.7"]
    assert values(out, b"x-forwarded-proto") == [b"http"]  # the trusted proxy's view
    assert values(out, b"x-forwarded-host") == [b"admin.internal"]
    assert values(out, b"forwarded") == [b"for=10.0.0.3;proto=http"]


def test_trusted_repeated_forwarded_for_lines_are_joined_in_order() -> None:
    headers = [(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3")]
    out = upstream(headers, trust=True)
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 203.0.113.7"]


def test_trusted_without_a_proto_gets_the_gateways() -> None:
    out = upstream([(b"x-forwarded-for", b"10.0.0.1")], trust=True)
    assert values(out, b"x-forwarded-proto") == [b"https"]


def test_unknown_client_address_adds_no_forwarded_for() -> None:
    out = upstream([(b"x-forwarded-for", b"10.0.0.1")], client_ip=None)
    assert b"x-forwarded-for" not in names(out)


def test_nominated_forwarding_header_is_dropped_even_when_trusted() -> None:
    out = upstream([(b"connection", b"x-forwarded-host"), *SPOOFED], trust=True)
    assert b"x-forwarded-host" not in names(out)


# -- responses: repeated headers ---------------------------------------------------


def test_repeated_set_cookie_lines_are_kept_in_order() -> None:
    raw = [
        (b"Set-Cookie", b"a=1; Path=/; HttpOnly"),
        (b"Content-Type", b"application/json"),
        (b"Set-Cookie", b"b=2, c=3; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
        (b"set-cookie", b"d=4"),
    ]
    out = client_response_headers(raw, request_id=RID)
    assert values(out, b"set-cookie") == [
        b"a=1; Path=/; HttpOnly",
        b"b=2, c=3; Expires=Wed, 21 Oct 2015 07:28:00 GMT",
        b"d=4",
    ]


def test_response_content_length_passes_through() -> None:
    # Bodies are not re-encoded, so the upstream's framing headers stay valid.
    raw = [(b"Content-Length", b"42"), (b"Content-Encoding", b"gzip")]
    out = client_response_headers(raw, request_id=RID)
    assert (b"content-length", b"42") in out
    assert (b"content-encoding", b"gzip") in out


# -- limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "too_large"),
    [
        ([(b"x-%d" % i, b"v") for i in range(10)], False),  # at the count limit
        ([(b"x-%d" % i, b"v") for i in range(11)], True),  # one header too many
        ([(b"x-big", b"v" * (1024 - 4 - 5))], False),  # exactly max_bytes with framing
        ([(b"x-big", b"v" * (1024 - 4 - 5 + 1))], True),  # one byte over
        ([(b"a", b"v" * 300), (b"b", b"v" * 300), (b"c", b"v" * 300), (b"d", b"v" * 300)], True),
    ],
)
def test_header_limits_give_431(headers: Headers, too_large: bool) -> None:
    # For a head the gateway's own protocol did not read (plain uvicorn).
    head = head_from_headers("GET", b"/", headers)
    if not too_large:
        check_limits(head, max_bytes=1024, max_count=10)
        return
    with pytest.raises(HeadersTooLarge) as caught:
        check_limits(head, max_bytes=1024, max_count=10)
    assert caught.value.status == 431


def test_header_value_returns_the_first() -> None:
    headers = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert header_value(headers, b"a") == b"1"
    assert header_value(headers, b"c") is None


# -- underscore twins (pure) ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        b"x_forwarded_for",
        b"x-real_ip",
        b"x_forwarded_host",
        b"x_forwarded_proto",
        b"transfer_encoding",
        b"content_length",
        b"proxy_authorization",
        b"x_request_id",
    ],
)
@pytest.mark.parametrize("trusted", [False, True])
def test_underscore_twins_of_headers_the_gateway_controls_are_dropped(
    name: bytes, trusted: bool
) -> None:
    out = upstream_request_headers(
        [(name, b"1.2.3.4"), (b"x_custom_header", b"kept")],
        connection=None,
        client_ip="10.0.0.1",
        scheme="http",
        request_id=b"rid",
        trust_forwarded=trusted,
    )
    names = [n for n, _ in out]
    assert name not in names
    # An underscore name that shadows nothing is the client's own business.
    assert b"x_custom_header" in names


def test_underscore_twins_of_identity_headers_are_stripped() -> None:
    # The gateway states who the caller is in x-chatkit-*; a server folding
    # "_" into "-" must not see a client's own claim beside it.
    headers = [(b"x_chatkit_user", b"mallory"), (b"x-chatkit_session-id", b"s"), (b"x-kept", b"1")]
    assert strip_client_identity(headers) == [(b"x-kept", b"1")]
    # The same, while building the upstream's headers for an issued route.
    out = upstream_request_headers(
        [*headers, (b"authorization", b"Bearer ek_x")],
        connection=None,
        client_ip=None,
        scheme="http",
        request_id=RID,
        trust_forwarded=False,
        without=frozenset({b"authorization"}),
        without_prefix=PREFIX,
    )
    assert names(out) == [b"x-kept", b"via", b"x-request-id", b"x-forwarded-proto"]


@pytest.mark.parametrize(
    ("connection", "expected"),
    [
        (None, HOP_BY_HOP),
        (b"X-A, x-b", HOP_BY_HOP | {b"x-a", b"x-b"}),
        # Two Connection lines, as the request head joins them.
        (b"close,X-A", HOP_BY_HOP | {b"close", b"x-a"}),
    ],
)
def test_connection_nominates_hop_by_hop_headers(
    connection: bytes | None, expected: frozenset[bytes]
) -> None:
    assert nominated_by(connection) == expected


@pytest.mark.parametrize(
    ("trusted", "incoming", "expected"),
    [
        # Untrusted: the client's X-Forwarded-Host goes, the Host it used is stated.
        (False, [(b"x-forwarded-host", b"evil")], [b"gw.example"]),
        # A trusted proxy's stands.
        (True, [(b"x-forwarded-host", b"front.example")], [b"front.example"]),
        (True, [], [b"gw.example"]),
    ],
)
def test_forwarded_host_is_stated_unless_a_trusted_proxy_did(
    trusted: bool, incoming: Headers, expected: list[bytes]
) -> None:
    out = upstream_request_headers(
        incoming,
        connection=None,
        client_ip=None,
        scheme="http",
        request_id=RID,
        trust_forwarded=trusted,
        forwarded_host=b"gw.example",
    )
    assert values(out, b"x-forwarded-host") == expected


@pytest.mark.parametrize(
    "connection",
    [
        b"x-a",
        # Too long to be remembered between requests: still obeyed.
        b"x-a, " + b", ".join(b"x-pad-%d" % i for i in range(20)),
    ],
)
def test_nominated_headers_are_dropped_request_after_request(connection: bytes) -> None:
    incoming = [(b"connection", connection), (b"x-a", b"1"), (b"x-b", b"2")]
    for _ in range(3):
        assert names(upstream(incoming)) == [
            b"x-b",
            b"via",
            b"x-request-id",
            b"x-forwarded-for",
            b"x-forwarded-proto",
        ]
