"""Browsers' CORS preflights on client routes carry no secret, by the Fetch
standard, so they are forwarded for the upstream to answer; any other OPTIONS
still needs a client secret."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.cors import CorsPolicy
from gateway.head import head_from_headers
from gateway.headers import is_cors_preflight
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("OPTIONS", [(b"origin", b"https://a"), (b"access-control-request-method", b"POST")], True),
        ("OPTIONS", [(b"origin", b"https://a")], False),  # a plain OPTIONS from a page
        ("OPTIONS", [(b"access-control-request-method", b"POST")], False),  # no Origin
        ("POST", [(b"origin", b"https://a"), (b"access-control-request-method", b"POST")], False),
    ],
)
def test_preflight_detection(
    method: str, headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    assert is_cors_preflight(head_from_headers(method, b"/v1/chatkit/x", headers)) is expected


async def test_preflight_is_forwarded_without_a_secret_and_plain_options_is_not(
    upstream: FakeUpstream,
) -> None:
    async with GatewayProcess(upstream.url) as gateway, aiohttp.ClientSession() as http:
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with http.options(f"{gateway.url}/v1/chatkit/conversation", headers=preflight) as r:
            assert r.status == 200
        assert upstream.count("/v1/chatkit/conversation", method="OPTIONS") == 1
        # Without the preflight headers an OPTIONS is ordinary client traffic.
        async with http.options(
            f"{gateway.url}/v1/chatkit/conversation", headers={"Origin": "https://app.example"}
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "missing_client_secret"
        assert upstream.count("/v1/chatkit/conversation", method="OPTIONS") == 1


async def test_a_preflight_forwards_neither_credentials_nor_a_body(
    upstream: FakeUpstream,
) -> None:
    # An OPTIONS dressed as a preflight must not carry a secret or a body past
    # admission: a browser never sends either with one.
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Authorization": "Bearer ek_revoked_or_not",
        "Cookie": "session=1",
    }
    async with (
        GatewayProcess(upstream.url) as gateway,
        aiohttp.ClientSession() as http,
        http.options(
            f"{gateway.url}/v1/chatkit/conversation", data=b"x" * (1024 * 1024), headers=headers
        ) as r,
    ):
        assert r.status == 200
    [seen] = [s for s in upstream.requests if s.method == "OPTIONS"]
    assert seen.authorization is None
    assert seen.header("cookie") is None
    assert seen.body_bytes == 0


@pytest.mark.parametrize("origins", [("*",), ("*", "https://a.example")])
@pytest.mark.parametrize("origin", [b"https://a.example", b"null", b"https://evil.example"])
def test_any_origin_is_star_and_never_with_credentials(
    origins: tuple[str, ...], origin: bytes
) -> None:
    # "*" with Access-Control-Allow-Credentials is refused by browsers (Fetch
    # standard, CORS check); echoing the origin with credentials would let any
    # site read answers made with the page's cookies. The secret is a header
    # the page sets, so no credentials mode is ever needed.
    policy = CorsPolicy(origins)
    answers = [
        policy.response_headers(origin),
        policy.preflight(origin, frozenset({"POST", "OPTIONS"}), b"authorization")[1],
    ]
    for headers in answers:
        assert (b"access-control-allow-origin", b"*") in headers
        assert all(name != b"access-control-allow-credentials" for name, _ in headers)
