"""Hostile bytes where the gateway reads JSON, and routes it does not serve.

Each test sends, over a raw socket, the bytes a fuzzing run found to break the
gateway: JSON nested a thousand deep (a ``RecursionError`` inside
``json.loads``), JSON strings holding a lone surrogate (valid JSON, text that
cannot be encoded), repeated keys, and methods or paths the gateway's own
endpoints do not serve. The answer must be the gateway's OpenAI-style error,
and nothing may reach the log as an error or a traceback.

Three gateways for the module: ``mixed`` issues sessions for ``wf_a`` and
forwards every other workflow to the fake hosted API (learning those
sessions), on a real Redis, with the admin API on; ``issuing`` has no hosted
API at all; ``learning`` has no issuer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisServer, free_port, raw_http, running

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_hostile-bodies-key-0123456789"
HOSTED_KEY = "sk-hosted-hostile"
ADMIN_TOKEN = "admin-token-hostile-0123456789"
DEEP = b"[" * 990 + b"]" * 990


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str | None:
        """The code of an OpenAI-style error body; fails unless it is one."""
        error = self.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str)
        assert self.headers["content-type"].startswith("application/json")
        code: str | None = error["code"]
        return code


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


async def send(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    authorization: str | None = None,
    extra: str = "",
) -> Reply:
    """One request written verbatim on a fresh connection."""
    auth = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: gateway\r\n{auth}{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return parse_reply(await raw_http("127.0.0.1", port, head.encode() + body))


async def create_session(port: int, body: bytes, *, key: str) -> Reply:
    """POST /v1/chatkit/sessions with ``key`` as the bearer."""
    return await send(port, "POST", "/v1/chatkit/sessions", body, authorization=f"Bearer {key}")


# -- fixtures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateways:
    mixed: GatewayProcess
    issuing: GatewayProcess
    learning: GatewayProcess  # no issuer at all: every create goes to the hosted API
    admin_port: int


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateways(module_redis: RedisServer, fake: FakeUpstream) -> AsyncIterator[Gateways]:
    admin_port = free_port()
    keys = "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()
    workflows = json.dumps({"wf_a": {"upstream": f"{fake.url}/v1/chatkit/server-a"}})
    mixed = GatewayProcess(
        fake.url,
        redis_url=module_redis.url,
        env={
            "GATEWAY_WORKFLOWS": workflows,
            "GATEWAY_ISSUER_API_KEYS": keys,
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "GATEWAY_ADMIN_PORT": str(admin_port),
        },
    )
    issuing = GatewayProcess(
        "none", env={"GATEWAY_WORKFLOWS": workflows, "GATEWAY_ISSUER_API_KEYS": keys}
    )
    learning = GatewayProcess(fake.url, redis_url=module_redis.url)
    async with running((mixed, issuing, learning)):
        yield Gateways(mixed, issuing, learning, admin_port)


@pytest.fixture(autouse=True)
def nothing_logged_as_an_error(gateways: Gateways) -> Iterator[None]:
    """Hostile input is the client's mistake: answered, never logged as the gateway's."""
    before = {g: len(g.output()) for g in (gateways.mixed, gateways.issuing, gateways.learning)}
    yield
    for gateway, offset in before.items():
        new = gateway.output()[offset:]
        assert "Traceback" not in new, new
        assert " ERROR " not in new, new
        assert " CRITICAL " not in new, new


# -- JSON nested too deeply -------------------------------------------------------------


async def test_deep_json_on_a_mixed_mode_create_is_400_before_any_key(gateways: Gateways) -> None:
    # Mixed mode routes a create by its workflow.id: a body it cannot read
    # cannot be routed, so it is refused rather than forwarded.
    reply = await send(gateways.mixed.port, "POST", "/v1/chatkit/sessions", DEEP)
    assert reply.status == 400
    assert reply.error_code() == "invalid_json"


async def test_deep_json_on_an_issuer_create_is_400_for_a_keyholder_401_for_others(
    gateways: Gateways,
) -> None:
    port = gateways.issuing.port
    with_key = await create_session(port, DEEP, key=API_KEY)
    assert (with_key.status, with_key.error_code()) == (400, "invalid_json")
    # Nothing but the key is looked at until the key is right.
    without = await send(port, "POST", "/v1/chatkit/sessions", DEEP)
    assert (without.status, without.error_code()) == (401, "invalid_api_key")


async def test_deep_json_on_admin_revoke_is_400(gateways: Gateways) -> None:
    reply = await send(
        gateways.admin_port, "POST", "/admin/revoke", DEEP, authorization=f"Bearer {ADMIN_TOKEN}"
    )
    assert (reply.status, reply.error_code()) == (400, "invalid_json")


async def test_deep_json_on_a_hosted_create_is_not_a_5xx(
    gateways: Gateways, fake: FakeUpstream
) -> None:
    # An object whose workflow is the hosted API's, nested deep below it: the
    # gateway reads workflow.id or refuses; it never fails.
    body = b'{"user": "u", "workflow": {"id": "wf_hosted"}, "x": ' + DEEP + b"}"
    reply = await create_session(gateways.mixed.port, body, key=HOSTED_KEY)
    assert (reply.status, reply.error_code()) == (400, "invalid_json")


async def test_deep_json_in_learned_mode_is_forwarded_untouched_never_a_5xx(
    gateways: Gateways, fake: FakeUpstream
) -> None:
    # Without an issuer the gateway does not read a create body: the hosted
    # API answers it (here: its 401 for the missing key), the gateway passes it on.
    fake.reset_records()
    reply = await send(gateways.learning.port, "POST", "/v1/chatkit/sessions", DEEP)
    assert reply.status == 401
    assert "via" in reply.headers  # the upstream's answer
    assert reply.error_code() is None  # OpenAI's own body for a missing key has no code
    assert fake.count("/v1/chatkit/sessions") == 1


# -- lone surrogates ----------------------------------------------------------------------


async def test_a_hosted_session_whose_user_is_a_lone_surrogate_is_learned(
    gateways: Gateways, fake: FakeUpstream
) -> None:
    body = b'{"user": "\\ud800", "workflow": {"id": "wf_hosted"}}'
    reply = await create_session(gateways.mixed.port, body, key=HOSTED_KEY)
    assert reply.status == 200, reply.body
    session = reply.json()
    assert session["user"] == "\ud800"  # the upstream's answer, passed on untouched
    secret = session["client_secret"]

    traffic = await send(
        gateways.mixed.port,
        "POST",
        "/v1/chatkit/conversation",
        b'{"type": "threads.list", "params": {}}',
        authorization=f"Bearer {secret}",
    )
    assert traffic.status == 200, traffic.body
    # Learned with the user kept as its escape: distinct, storable, shown.
    lookup = await send(
        gateways.admin_port,
        "GET",
        f"/admin/sessions/{session['id']}",
        authorization=f"Bearer {ADMIN_TOKEN}",
    )
    assert lookup.status == 200, lookup.body
    assert lookup.json()["user"] == "\\ud800"


async def test_admin_revoke_of_a_lone_surrogate_secret_is_400(gateways: Gateways) -> None:
    reply = await send(
        gateways.admin_port,
        "POST",
        "/admin/revoke",
        b'{"client_secret": "\\udc00"}',
        authorization=f"Bearer {ADMIN_TOKEN}",
    )
    assert reply.status == 400
    assert reply.error_code() == "invalid_request"
    assert reply.json()["error"]["param"] == "client_secret"


@pytest.mark.parametrize("user", [b'"\\ud800"', b'"a\\udfffb"', b'"\\ud83d"'])
async def test_an_issued_session_for_a_lone_surrogate_user_is_400_naming_user(
    gateways: Gateways, user: bytes
) -> None:
    body = b'{"user": ' + user + b', "workflow": {"id": "wf_a"}}'
    reply = await create_session(gateways.issuing.port, body, key=API_KEY)
    assert (reply.status, reply.error_code()) == (400, "invalid_value")
    assert reply.json()["error"]["param"] == "user"


async def test_a_surrogate_pair_is_a_user_like_any_other(gateways: Gateways) -> None:
    body = b'{"user": "\\ud83d\\ude00", "workflow": {"id": "wf_a"}}'
    reply = await create_session(gateways.issuing.port, body, key=API_KEY)
    assert reply.status == 200, reply.body
    assert reply.json()["user"] == "\N{GRINNING FACE}"


# -- repeated keys: a document that reads two ways ----------------------------------------


@pytest.mark.parametrize(
    ("where", "body"),
    [
        ("create", b'{"user": "u", "workflow": {"id": "wf_a"}, "workflow": {"id": "wf_hosted"}}'),
        ("create", b'{"user": "u", "workflow": {"id": "wf_a", "id": "wf_hosted"}}'),
        ("admin", b'{"session_id": "cksess_a", "session_id": "cksess_b"}'),
    ],
)
async def test_a_repeated_key_is_refused_not_guessed_at(
    gateways: Gateways, fake: FakeUpstream, where: str, body: bytes
) -> None:
    fake.reset_records()
    if where == "create":
        reply = await create_session(gateways.mixed.port, body, key=API_KEY)
    else:
        reply = await send(
            gateways.admin_port,
            "POST",
            "/admin/revoke",
            body,
            authorization=f"Bearer {ADMIN_TOKEN}",
        )
    assert (reply.status, reply.error_code()) == (400, "invalid_json")
    assert fake.requests == []


# -- the gateway's own endpoints answer in the gateway's shape -----------------------------


@pytest.mark.parametrize(
    ("listener", "method", "path", "status", "code", "allow"),
    [
        ("client", "TRACE", "/healthz", 405, "method_not_allowed", "GET, HEAD"),
        ("client", "POST", "/metrics", 405, "method_not_allowed", "GET, HEAD"),
        ("client", "DELETE", "/readyz", 405, "method_not_allowed", "GET, HEAD"),
        ("admin", "GET", "/admin/x", 404, "unknown_route", None),
        ("admin", "GET", "/", 404, "unknown_route", None),
        ("admin", "GET", "/admin/sessions/cksess_x/", 404, "unknown_route", None),  # no redirect
        ("admin", "GET", "/admin/revoke", 405, "method_not_allowed", "POST"),
        ("admin", "TRACE", "/admin/revocations", 405, "method_not_allowed", "GET, HEAD"),
    ],
)
async def test_the_gateways_own_endpoints_refuse_in_openai_shape(
    gateways: Gateways,
    listener: str,
    method: str,
    path: str,
    status: int,
    code: str,
    allow: str | None,
) -> None:
    port = gateways.mixed.port if listener == "client" else gateways.admin_port
    reply = await send(port, method, path, authorization=f"Bearer {ADMIN_TOKEN}")
    assert reply.status == status
    assert reply.error_code() == code
    # Allow keeps starlette's list (its order is a set's).
    listed = reply.headers.get("allow")
    assert (set(listed.split(", ")) if listed else None) == (
        set(allow.split(", ")) if allow else None
    )


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"XXXX\r\n\r\n",
        b"GET /admin/revocations HTTP/1.1\r\nHost: x\r\nX: \x00\r\n\r\n",
        b"POST /admin/revoke HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    ],
)
async def test_the_admin_listener_refuses_what_it_cannot_parse_in_openai_shape(
    gateways: Gateways, request_bytes: bytes
) -> None:
    reply = parse_reply(await raw_http("127.0.0.1", gateways.admin_port, request_bytes))
    assert reply.status == 400
    assert reply.error_code() is not None


@pytest.mark.parametrize(
    "request_bytes",
    [
        # httptools 0.6 (the lowest supported) refuses obs-text in a target
        # inside uvicorn's on_headers_complete: that must still be answered.
        b"GET /(\xb4 HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
        b"HEAD /\xe9 HTTP/1.1\r\nHost: gateway\r\nContent-Length: 3\r\n\r\nabc",
    ],
)
async def test_a_target_with_obs_text_is_answered_on_every_httptools(
    gateways: Gateways, request_bytes: bytes
) -> None:
    raw = await raw_http("127.0.0.1", gateways.mixed.port, request_bytes, timeout=5)
    reply = parse_reply(raw)
    assert 400 <= reply.status < 500, raw
    if not request_bytes.startswith(b"HEAD"):
        assert reply.error_code() is not None


# -- the admin API's Authorization, read like every other bearer token ---------------------


@pytest.mark.parametrize(
    ("authorization", "extra", "status"),
    [
        (f"Bearer {ADMIN_TOKEN}", "", 200),
        (f"bearer {ADMIN_TOKEN}", "", 200),  # the scheme is case-insensitive (RFC 9110 11.1)
        (f"Bearer {ADMIN_TOKEN}x", "", 401),
        (f"Bearer {ADMIN_TOKEN[:-1]}", "", 401),
        (f"Basic {ADMIN_TOKEN}", "", 401),
        (None, "", 401),
        # Two Authorization headers: which one counts would be a guess.
        (f"Bearer {ADMIN_TOKEN}", f"Authorization: Bearer {ADMIN_TOKEN}\r\n", 401),
    ],
)
async def test_admin_tokens_are_read_as_bearer_tokens(
    gateways: Gateways, authorization: str | None, extra: str, status: int
) -> None:
    reply = await send(
        gateways.admin_port,
        "GET",
        "/admin/revocations?tail=1",
        authorization=authorization,
        extra=extra,
    )
    assert reply.status == status
    if status == 401:
        assert reply.error_code() == "invalid_admin_token"
        assert ADMIN_TOKEN not in reply.body.decode()


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/revocations?tail=x", "tail"),
        ("/admin/revocations?tail=0", "tail"),
        ("/admin/sessions/%7Bbad%7D", "session_id"),
    ],
)
async def test_admin_bad_parameters_are_400_naming_them(
    gateways: Gateways, path: str, param: str
) -> None:
    reply = await send(gateways.admin_port, "GET", path, authorization=f"Bearer {ADMIN_TOKEN}")
    assert (reply.status, reply.error_code()) == (400, "invalid_request")
    assert reply.json()["error"]["param"] == param
