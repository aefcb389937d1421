"""The issuer surface under attack: what issuer mode added, probed as an attacker would.

One gateway for the module, in mixed mode (issuing for ``wf_a`` and ``wf_b``,
whose "ChatKit servers" are paths on the fake upstream that echo what reached
them; forwarding other workflows to the fake hosted API), signing identity
assertions, with ``GATEWAY_CORS_ORIGINS=*`` and the admin API on.

- a session-create body of 256 MB is refused 413 long before it has been
  sent, declared or chunked;
- nesting in metadata or state variables is refused naming the parameter;
- a ``user`` holding control characters, bidi controls or anything else still
  reaches the ChatKit server as one well-formed ``X-ChatKit-User`` header
  that decodes to exactly that user, and overlong UTF-8 is refused;
- an assertion made for one workflow never verifies for another;
- every wrong key is counted, and logged once per interval, not per attempt;
- ``*`` as the allowed origin never comes with credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
import jwt
import pytest
import pytest_asyncio

from gateway.auth import FailedAttempts
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    assert_never_logged,
    free_port,
    metric_value,
    raw_http,
    raw_upload,
    scrape,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_attacks-issuer-key-0123456789"
HOSTED_KEY = "sk-attacks-hosted"
ADMIN_TOKEN = "admin-token-attacks-0123456789"
SIGNING_KEY = "k" * 40
MB = 1024 * 1024
#: Visible ASCII only (RFC 9110 5.5 field-vchar, no obs-text): one clean header value.
VISIBLE_ASCII = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class Gateway:
    process: GatewayProcess
    admin_port: int

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fake: FakeUpstream) -> AsyncIterator[Gateway]:
    admin_port = free_port()
    process = GatewayProcess(
        fake.url,
        env={
            "GATEWAY_WORKFLOWS": json.dumps(
                {
                    "wf_a": {"upstream": f"{fake.url}/v1/chatkit/server-a"},
                    "wf_b": {"upstream": f"{fake.url}/v1/chatkit/server-b"},
                }
            ),
            "GATEWAY_ISSUER_API_KEYS": "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest(),
            "GATEWAY_IDENTITY_SIGNING_KEY": SIGNING_KEY,
            "GATEWAY_CORS_ORIGINS": "*",
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "GATEWAY_ADMIN_PORT": str(admin_port),
        },
    )
    async with process:
        yield Gateway(process, admin_port)
    assert_never_logged([process], [API_KEY, ADMIN_TOKEN, SIGNING_KEY], "a key or token")


async def create(
    http: aiohttp.ClientSession, gateway: Gateway, body: dict[str, Any], *, key: str = API_KEY
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json()


async def issue(
    http: aiohttp.ClientSession, gateway: Gateway, user: str, workflow: str = "wf_a"
) -> dict[str, Any]:
    status, session = await create(http, gateway, {"user": user, "workflow": {"id": workflow}})
    assert status == 200, session
    return session


async def server_sees(
    http: aiohttp.ClientSession, gateway: Gateway, secret: str
) -> list[tuple[str, str]]:
    """The headers a request with ``secret`` brought to its workflow's server, in order."""
    async with http.post(
        f"{gateway.url}/chatkit",
        json={"type": "threads.list", "params": {}},
        headers={"Authorization": f"Bearer {secret}"},
    ) as response:
        assert response.status == 200
        echo = await response.json()
    seen: list[tuple[str, str]] = []
    for name, value in echo["headers"].items():
        for one in value if isinstance(value, list) else [value]:
            seen.append((name, one))
    return seen


# -- a body of many megabytes ----------------------------------------------------------


def _create_head(framing: str, *, authorization: str = "") -> bytes:
    return (
        f"POST /v1/chatkit/sessions HTTP/1.1\r\nHost: gateway\r\n{authorization}"
        f"Content-Type: application/json\r\n{framing}\r\n"
    ).encode()


async def assert_keyed_create_is_invalid_json(gateway: Gateway, body: bytes) -> None:
    """A create with the right key and ``body`` written raw is 400 invalid_json."""
    head = _create_head(
        f"Content-Length: {len(body)}\r\nConnection: close\r\n",
        authorization=f"Authorization: Bearer {API_KEY}\r\n",
    )
    reply = await raw_http("127.0.0.1", gateway.port, head + body)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b'"code":"invalid_json"' in reply


@pytest.mark.parametrize("keyed", [True, False])
@pytest.mark.parametrize("framing", ["declared", "chunked"])
async def test_a_create_body_of_many_megabytes_is_413_before_it_is_sent(
    gateway: Gateway, framing: str, keyed: bool
) -> None:
    total = 256 * MB
    piece = b"x" * (64 * 1024)
    if framing == "declared":
        head = _create_head(f"Content-Length: {total}\r\n")
        chunks = [piece] * (total // len(piece))
    else:
        head = _create_head("Transfer-Encoding: chunked\r\n")
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (total // len(piece))
    if keyed:
        head = head.replace(b"Host:", f"Authorization: Bearer {API_KEY}\r\nHost:".encode())
    started = time.monotonic()

    reply, written = await raw_upload("127.0.0.1", gateway.port, head, chunks, timeout=30)

    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b'"code":"request_too_large"' in reply
    # Refused after the first megabyte (the session body cap) at most, plus
    # what the sockets' buffers took in meanwhile (a few MB here; loopback
    # buffers may grow to tens of MB): never the 256 MB.
    assert written < 48 * MB, written
    assert time.monotonic() - started < 10


# -- nesting ----------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {"user": "u", "workflow": {"id": "wf_a", "state_variables": {"v": _nested(200)}}},
            "workflow.state_variables",
            "invalid_value",
        ),
        (
            {"user": "u", "workflow": {"id": "wf_a"}, "metadata": _nested(200)},
            "metadata",
            "unknown_parameter",
        ),
        (
            {"user": "u", "workflow": {"id": "wf_a", "tracing": _nested(200)}},
            "workflow.tracing.a",
            "unknown_parameter",
        ),
    ],
)
async def test_deep_nesting_in_a_create_is_400_naming_the_parameter(
    http: aiohttp.ClientSession, gateway: Gateway, body: dict[str, Any], param: str, code: str
) -> None:
    status, answer = await create(http, gateway, body)
    assert status == 400
    assert answer["error"]["param"] == param
    assert answer["error"]["code"] == code


async def test_nesting_past_what_json_can_be_read_at_is_400_invalid_json(
    gateway: Gateway,
) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"user": "u", "workflow": {"id": "wf_a", "state_variables": {"v": ' + deep + b"}}}"
    await assert_keyed_create_is_invalid_json(gateway, body)


# -- hostile user values ------------------------------------------------------------------

HOSTILE_USERS = [
    "alice\r\nX-Injected: yes",  # CRLF: a second header, if written raw
    "alice\nX-ChatKit-Session-Id: cksess_other",
    "\x00\x01\x1b[31m\x7f",  # NUL, control, an ANSI escape, DEL
    "\u202eevil\u202c\u2066x\u2069",  # bidi overrides and isolates
    "\u200b\ufeff\u2028\u2029",  # zero-width, BOM, line and paragraph separators
    "e\u0301 \N{GRINNING FACE} \U0010ffff",  # combining mark, astral, last code point
    "%0d%0aX-Injected: yes",  # already percent-encoded text stays text
    " padded ",
    "x" * 512,  # the longest user accepted
]


@pytest.mark.parametrize("user", HOSTILE_USERS)
async def test_any_user_reaches_the_server_as_one_well_formed_identity_header(
    http: aiohttp.ClientSession, gateway: Gateway, user: str
) -> None:
    session = await issue(http, gateway, user)
    assert session["user"] == user

    seen = await server_sees(http, gateway, session["client_secret"])

    users = [value for name, value in seen if name == "x-chatkit-user"]
    assert len(users) == 1, seen
    assert VISIBLE_ASCII.fullmatch(users[0]), users[0]
    assert unquote(users[0], errors="strict") == user
    assert not any(name == "x-injected" for name, _ in seen)
    assert [v for n, v in seen if n == "x-chatkit-session-id"] == [session["id"]]
    (assertion,) = [v for n, v in seen if n == "x-chatkit-assertion"]
    claims = jwt.decode(assertion, SIGNING_KEY, algorithms=["HS256"], audience="wf_a")
    assert claims["sub"] == user


@pytest.mark.parametrize(
    "user_bytes",
    [
        b"\xc0\xaf",  # overlong "/"
        b"\xe0\x80\xaf",  # overlong "/", three bytes
        b"\xed\xa0\x80",  # a UTF-16 surrogate written as UTF-8 (CESU-8)
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xff",
    ],
)
async def test_a_user_in_malformed_utf8_is_400_invalid_json(
    gateway: Gateway, user_bytes: bytes
) -> None:
    body = b'{"user": "' + user_bytes + b'", "workflow": {"id": "wf_a"}}'
    await assert_keyed_create_is_invalid_json(gateway, body)


# -- assertions across workflows ------------------------------------------------------------


async def test_an_assertion_for_one_workflow_never_verifies_for_another(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    # The same user in two workflows: everything but the workflow is alike.
    a = await issue(http, gateway, "same-user", "wf_a")
    b = await issue(http, gateway, "same-user", "wf_b")
    assertions = {}
    for workflow, session in (("wf_a", a), ("wf_b", b)):
        seen = await server_sees(http, gateway, session["client_secret"])
        assert [v for n, v in seen if n == "x-chatkit-workflow-id"] == [workflow]
        (assertions[workflow],) = [v for n, v in seen if n == "x-chatkit-assertion"]

    for mine, other in (("wf_a", "wf_b"), ("wf_b", "wf_a")):
        token = assertions[mine]
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(token, SIGNING_KEY, algorithms=["HS256"], audience=other)
        claims = jwt.decode(
            token, SIGNING_KEY, algorithms=["HS256"], audience=mine, issuer="chatkit-gateway"
        )
        assert claims["aud"] == mine
        assert claims["sid"] == (a if mine == "wf_a" else b)["id"]
    assert assertions["wf_a"] != assertions["wf_b"]


async def test_assertion_ids_are_unique_even_when_the_client_picks_the_request_id(
    http: aiohttp.ClientSession, gateway: Gateway, fake: FakeUpstream
) -> None:
    session = await issue(http, gateway, "replayer")
    ids = set()
    for _ in range(3):
        async with http.post(
            f"{gateway.url}/chatkit",
            json={"type": "threads.list", "params": {}},
            headers={
                "Authorization": f"Bearer {session['client_secret']}",
                "X-Request-Id": "chosen-by-the-client-0001",
            },
        ) as response:
            echo = await response.json()
        claims = jwt.decode(
            echo["headers"]["x-chatkit-assertion"],
            SIGNING_KEY,
            algorithms=["HS256"],
            audience="wf_a",
        )
        assert claims["rid"] == "chosen-by-the-client-0001"
        ids.add(claims["jti"])
    assert len(ids) == 3


# -- guessing keys ---------------------------------------------------------------------------


def _failures(samples: dict[Any, float], credential: str) -> float:
    return metric_value(samples, "chatkit_gateway_auth_failures_total", credential=credential) or 0


WRONG_KEYS = [
    None,
    "",
    API_KEY[:-1] + "x",  # one character off
    API_KEY + "x",
    "ckgk_" + "a" * 1000,  # as long as a bearer token may be
    "ckgk_" + "a" * 5000,  # longer: refused while parsing, before any hashing
    "not a token at all",
    HOSTED_KEY,
]


async def test_wrong_issuer_keys_are_counted_and_logged_once_per_interval(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    before = _failures(await scrape(http, gateway.url), "issuer_key")
    log_offset = len(gateway.process.output())
    attempts = 0
    for _ in range(5):
        for key in WRONG_KEYS:
            headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
            async with http.post(
                f"{gateway.url}/v1/chatkit/sessions",
                json={"user": "u", "workflow": {"id": "wf_a"}},
                headers=headers,
            ) as response:
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_api_key"
            attempts += 1

    after = _failures(await scrape(http, gateway.url), "issuer_key")
    assert after - before == attempts
    logged = gateway.process.output()[log_offset:]
    # 40 refusals, at most one line (none if one was logged within the minute).
    assert logged.count("missing or wrong issuer API key") <= 1
    assert gateway.process.output().count("missing or wrong issuer API key") >= 1
    for key in WRONG_KEYS:
        if key:
            assert key not in gateway.process.output()


async def test_wrong_admin_tokens_are_counted_too(
    http: aiohttp.ClientSession, gateway: Gateway
) -> None:
    before = _failures(await scrape(http, gateway.url), "admin_token")
    for token in ("", ADMIN_TOKEN[:-1], ADMIN_TOKEN + "0", "x" * 2000):
        async with http.get(
            f"http://127.0.0.1:{gateway.admin_port}/admin/revocations",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 401
    assert _failures(await scrape(http, gateway.url), "admin_token") - before == 4


class _Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


async def test_refusals_are_logged_once_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    counter = _Count()
    failures = FailedAttempts(
        counter,
        logging.getLogger("test.failures"),
        "issuer API key",
        interval=60,
        clock=lambda: now[0],
    )
    with caplog.at_level(logging.WARNING, logger="test.failures"):
        for _ in range(100):  # a burst: one line
            failures.record()
        now[0] += 59
        failures.record()  # still within the minute
        now[0] += 2
        failures.record()  # the next line, counting what it stood for
    assert counter.value == 102
    assert [r.getMessage() for r in caplog.records] == [
        "Refused a request with a missing or wrong issuer API key",
        "Refused a request with a missing or wrong issuer API key (and 100 more times "
        "in the last 61s)",
    ]


# -- CORS: any origin, never credentials ----------------------------------------------------


def _cors(headers: aiohttp.typedefs.LooseHeaders) -> list[tuple[str, str]]:
    return [
        (k.lower(), v)
        for k, v in headers.items()  # type: ignore[union-attr]
        if k.lower().startswith("access-control-")
    ]


async def test_any_origin_never_comes_with_credentials(
    http: aiohttp.ClientSession, gateway: Gateway, fake: FakeUpstream
) -> None:
    origin = {"Origin": "https://evil.example"}
    async with http.options(
        f"{gateway.url}/chatkit",
        headers={**origin, "Access-Control-Request-Method": "POST"},
    ) as preflight:
        assert preflight.status == 204
        cors = _cors(preflight.headers)
    assert ("access-control-allow-origin", "*") in cors
    assert not any(name == "access-control-allow-credentials" for name, _ in cors)

    # An upstream that would allow credentials for the caller's origin: its
    # CORS headers are dropped, the gateway's "*" stands alone.
    status, hosted = await create(
        http, gateway, {"user": "u", "workflow": {"id": "wf_hosted"}}, key=HOSTED_KEY
    )
    assert status == 200
    fake.inject(
        "status",
        path_prefix="/v1/chatkit/conversation",
        status=200,
        headers={
            "Access-Control-Allow-Origin": "https://evil.example",
            "Access-Control-Allow-Credentials": "true",
        },
    )
    for secret in (hosted["client_secret"], "ek_not-a-session"):  # answered, and refused
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation",
            json={"type": "threads.list", "params": {}},
            headers={**origin, "Authorization": f"Bearer {secret}"},
        ) as response:
            cors = _cors(response.headers)
            assert response.status in (200, 401)
        assert [v for n, v in cors if n == "access-control-allow-origin"] == ["*"]
        assert not any(name == "access-control-allow-credentials" for name, _ in cors)
    fake.clear_faults()
