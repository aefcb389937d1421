"""Issuer mode's pure parts: settings, keys, ids, the create body, CORS, identity."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import unquote

import jwt
import pytest

from gateway.apps import App, AppKeys
from gateway.auth import SecretHasher, new_api_key
from gateway.cors import CorsPolicy
from gateway.errors import BadRequest, ConfigError
from gateway.identity import IdentityHeaders, strip_client_identity
from gateway.issuer import Issuer, SessionIds, parse_create_body, workflow_id_of
from gateway.metrics import Metrics
from gateway.ratelimit import Identity
from gateway.revocation import Revoker
from gateway.routes import Kind, table_with
from gateway.settings import load_settings
from gateway.store.memory import MemoryStore

WORKFLOWS = '{"wf_a": {"upstream": "http://127.0.0.1:9/chatkit"}}'
KEY = "ckgk_unit-test-key-0123456789"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # workflows with nobody able to create a session
        (
            {"GATEWAY_WORKFLOWS": WORKFLOWS},
            "GATEWAY_WORKFLOWS needs GATEWAY_ISSUER_KEYS or GATEWAY_ISSUER_API_KEYS",
        ),
        # a malformed hash entry
        (
            {"GATEWAY_WORKFLOWS": WORKFLOWS, "GATEWAY_ISSUER_API_KEYS": "sha256:abc"},
            "GATEWAY_ISSUER_API_KEYS: a sha256: entry needs exactly 64 hex digits",
        ),
        # a plain key too short to be a key
        (
            {"GATEWAY_WORKFLOWS": WORKFLOWS, "GATEWAY_ISSUER_API_KEYS": "short"},
            "GATEWAY_ISSUER_API_KEYS: each key must be at least 16 characters",
        ),
        # a workflow upstream that is not an http URL
        (
            {
                "GATEWAY_WORKFLOWS": '{"wf_a": {"upstream": "ftp://x"}}',
                "GATEWAY_ISSUER_API_KEYS": KEY,
            },
            "GATEWAY_WORKFLOWS.wf_a.upstream",
        ),
        # a workflow id that could not travel in a header or a Redis key
        (
            {
                "GATEWAY_WORKFLOWS": '{"wf a": {"upstream": "http://x"}}',
                "GATEWAY_ISSUER_API_KEYS": KEY,
            },
            "GATEWAY_WORKFLOWS: workflow id 'wf a'",
        ),
        # an HS256 key shorter than the hash (RFC 7518 3.2)
        (
            {"GATEWAY_IDENTITY_SIGNING_KEY": "short"},
            "GATEWAY_IDENTITY_SIGNING_KEY: must be at least 32",
        ),
        # a default expiry above the maximum
        (
            {"GATEWAY_SESSION_DEFAULT_EXPIRES_SECONDS": "900"},
            "GATEWAY_SESSION_DEFAULT_EXPIRES_SECONDS exceeds",
        ),
        # a CORS entry that is not an origin
        ({"GATEWAY_CORS_ORIGINS": "https://a.example/path"}, "GATEWAY_CORS_ORIGINS: "),
        # no hosted upstream and nothing to issue: nothing would be served
        ({"GATEWAY_UPSTREAM_URL": "none"}, "GATEWAY_UPSTREAM_URL=none needs GATEWAY_WORKFLOWS"),
    ],
)
def test_bad_issuer_settings_stop_start_up_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert message in str(caught.value)
    assert KEY not in str(caught.value)


def test_issuer_settings_load_and_redact_the_secrets() -> None:
    settings = load_settings(
        {
            "GATEWAY_WORKFLOWS": WORKFLOWS,
            "GATEWAY_ISSUER_API_KEYS": KEY,
            "GATEWAY_IDENTITY_SIGNING_KEY": "k" * 32,
            "GATEWAY_CORS_ORIGINS": "https://a.example, *",
            "GATEWAY_UPSTREAM_URL": "none",
        }
    )
    assert settings.workflows["wf_a"].upstream == "http://127.0.0.1:9/chatkit"
    assert settings.cors_origin_list == ("https://a.example", "*")
    assert not settings.has_upstream
    shown = json.dumps(settings.redacted(), default=str)
    assert KEY not in shown
    assert "k" * 32 not in shown


def test_api_keys_accept_listed_keys_by_hash_or_value_only() -> None:
    key, entry = new_api_key()
    assert entry == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    keys = AppKeys((App.unrestricted(f"{entry}, {KEY}"),))
    assert keys.identify([(b"authorization", f"Bearer {key}".encode())]) is not None
    assert keys.identify([(b"authorization", f"Bearer {KEY}".encode())]) is not None
    assert keys.identify([(b"authorization", f"Bearer {key}x".encode())]) is None
    assert keys.identify([(b"authorization", entry.encode())]) is None  # the entry is not a key
    assert keys.identify([]) is None


def test_session_ids_are_recognised_only_with_their_tag() -> None:
    ids, other = SessionIds(None), SessionIds(b"another pepper")
    minted = ids.mint()
    assert minted.startswith("cksess_")
    assert ids.owns(minted)
    assert not other.owns(minted)  # a pepper makes the tag unforgeable
    assert not ids.owns(minted[:-1] + ("0" if minted[-1] != "0" else "1"))
    assert not ids.owns("cksess_123")
    assert not ids.owns("x" * 55)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"user": "u"}', "workflow"),  # workflow missing
        (b'{"user": 5, "workflow": {"id": "w"}}', "user"),  # not a string
        (b'{"user": "u", "workflow": {"id": "w", "version": 3}}', "workflow.version"),
        (
            b'{"user": "u", "workflow": {"id": "w"}, '
            b'"rate_limits": {"max_requests_per_1_minute": "9"}}',
            "rate_limits.max_requests_per_1_minute",
        ),  # strict: "9" is not a number
        (
            b'{"user": "u", "workflow": {"id": "w"}, '
            b'"chatkit_configuration": {"history": {"x": 1}}}',
            "chatkit_configuration.history.x",
        ),  # unknown nested parameter
    ],
)
def test_create_body_errors_name_the_parameter(body: bytes, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_create_body(body)
    assert caught.value.param == param


def test_workflow_id_is_read_without_validating_the_rest() -> None:
    assert workflow_id_of(b'{"workflow": {"id": "wf_a"}, "user": 1}') == "wf_a"
    assert workflow_id_of(b'{"workflow": "wf_a"}') is None
    assert workflow_id_of(b"[]") is None


@pytest.mark.parametrize("body", [b"\xff", b"{", b'{"workflow": {"id": "a", "id": "b"}}'])
def test_a_create_body_that_cannot_be_read_cannot_be_routed(body: bytes) -> None:
    # Mixed mode decides issuer or hosted API by workflow.id: unreadable is 400.
    with pytest.raises(BadRequest) as caught:
        workflow_id_of(body)
    assert caught.value.code == "invalid_json"


def test_cors_policy_echoes_listed_origins_and_refuses_others() -> None:
    policy = CorsPolicy(("https://a.example",))
    assert policy.allowed(b"https://a.example") == b"https://a.example"
    assert policy.allowed(b"https://b.example") is None
    status, headers = policy.preflight(
        b"https://a.example", frozenset({"POST", "OPTIONS"}), b"authorization, content-type"
    )
    assert status == 204
    assert (b"access-control-allow-methods", b"POST") in headers
    assert (b"access-control-allow-headers", b"authorization, content-type") in headers
    status, headers = policy.preflight(b"https://a.example", frozenset({"POST"}), b"x\r\ny: z")
    assert all(name != b"access-control-allow-headers" for name, _ in headers)
    assert policy.preflight(b"https://b.example", frozenset({"POST"}), None)[0] == 403
    assert CorsPolicy(("*",)).allowed(b"https://any.example") == b"*"


def test_identity_headers_and_assertion() -> None:
    identity = Identity("cksess_1", "Zoë/1", "wf_a", "", 2_000_000_000)
    plain = IdentityHeaders(signing_key=None, issuer="gw", ttl_seconds=60)
    headers = dict(plain(identity, request_id=b"rid1", now=1_000))
    assert unquote(headers["x-chatkit-user"]) == "Zoë/1"
    assert headers["x-chatkit-user"].isascii()
    assert "x-chatkit-workflow-version" not in headers
    assert "x-chatkit-assertion" not in headers
    # Built once per session, yet each call's list is its own to extend.
    assert plain(identity, request_id=b"rid2", now=1_001) == list(headers.items())
    assert plain(identity, request_id=b"rid1", now=1_000) is not plain(
        identity, request_id=b"rid1", now=1_000
    )
    signed = IdentityHeaders(signing_key=b"k" * 32, issuer="gw", ttl_seconds=60)
    token = dict(signed(identity, request_id=b"rid1", now=1_000))["x-chatkit-assertion"]
    claims = jwt.decode(
        token, b"k" * 32, algorithms=["HS256"], audience="wf_a", options={"verify_exp": False}
    )
    jti = claims.pop("jti")
    assert claims == {
        "iss": "gw",
        "aud": "wf_a",
        "sub": "Zoë/1",
        "sid": "cksess_1",
        "iat": 1_000,
        "exp": 1_060,
        "rid": "rid1",
    }
    # Unique per assertion, even for the same request id (a client can pick that).
    again = dict(signed(identity, request_id=b"rid1", now=1_000))["x-chatkit-assertion"]
    assert jwt.decode(again, options={"verify_signature": False})["jti"] != jti
    # Without a time given, the assertion is dated by the clock.
    before = int(time.time())
    dated = dict(signed(identity, request_id=b"rid1"))["x-chatkit-assertion"]
    issued_at = jwt.decode(dated, options={"verify_signature": False})["iat"]
    assert before <= issued_at <= int(time.time())


def test_client_identity_headers_and_credentials_are_stripped() -> None:
    headers = [
        (b"authorization", b"Bearer ek_x"),
        (b"x-chatkit-user", b"mallory"),
        (b"x-chatkit-anything", b"1"),
        (b"content-type", b"application/json"),
    ]
    assert strip_client_identity(headers) == [(b"content-type", b"application/json")]


def test_issuer_routes_exist_only_in_issuer_mode() -> None:
    issued = table_with((), issued=True)
    assert issued.match("POST", "/chatkit").route.kind is Kind.ISSUED
    assert issued.match("PUT", "/chatkit/upload/a").route.kind is Kind.ISSUED
    assert table_with(()).routes == table_with((), issued=False).routes
    only_sessions = table_with((), issued=True, hosted=False)
    kinds = {r.kind for r in only_sessions.routes}
    assert Kind.CLIENT not in kinds
    assert Kind.SESSION_CREATE in kinds


async def test_an_issued_expiry_comes_from_the_stores_clock_not_the_replicas() -> None:
    # The store's clock (Redis TIME in production) says 1,000,000; this
    # process's clock says something else entirely.
    store = MemoryStore(clock=lambda: 1_000_000.0)
    metrics = Metrics()
    issuer = Issuer(
        workflows=frozenset({"wf_a"}),
        apps=AppKeys((App.unrestricted(KEY),)),
        store=store,
        revoker=Revoker(store, replica="r", metrics=metrics),
        hasher=SecretHasher(None),
        metrics=metrics,
        ids=SessionIds(None),
        default_limit=10,
        default_expires_seconds=600,
        max_expires_seconds=600,
    )
    answer = await issuer.create(
        [(b"authorization", f"Bearer {KEY}".encode())],
        b'{"user": "u", "workflow": {"id": "wf_a"}, '
        b'"expires_after": {"anchor": "created_at", "seconds": 120}}',
    )
    assert json.loads(answer.body)["expires_at"] == 1_000_120
