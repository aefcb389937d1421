"""Issuer mode: the gateway answers the session API for self-hosted workflows.

Two replicas (A and B) share one real Redis. The official ``openai`` SDK is the
server-side client, unchanged but for ``base_url``. Each configured workflow's
"ChatKit server" here is a path on the fake upstream, whose echo shows exactly
what reached it (headers, path, query); the real ``openai-chatkit`` server is
exercised in tests/test_issuer_chatkit.py. The fake also plays OpenAI's hosted
API for the workflow that is not configured (mixed mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import openai
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy
from openai.types.beta.chatkit import ChatSession
from redis import Redis as SyncRedis

from gateway.issuer import SessionIds
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Replicas,
    assert_never_logged,
    eventually,
    openai_sdk,
    running,
    sdk_create,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ckgk_issuer-test-key-0123456789"  # configured as its sha256: entry
HOSTED_KEY = "sk-hosted-test"  # the hosted API's key, forwarded in mixed mode
SIGNING_KEY = "s" * 40
PAGE_ORIGIN = "http://page.example:5173"
#: Every client secret the tests were handed: none may appear in a log.
ISSUED: list[str] = []


def _sha256_entry(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def redis_keys(server: RedisServer) -> set[bytes | str]:
    client = SyncRedis.from_url(server.url)
    try:
        return set(client.keys("*"))
    finally:
        client.close()


# -- fixtures: two replicas on the module's Redis and fake (conftest) -----------------


def issuer_env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_WORKFLOWS": (
            # wf_a's session limit counts every request, as before request
            # classes (the default counts turns only; tests/test_policy.py),
            # and its reads have no window of their own to speak of.
            f'{{"wf_a": {{"upstream": "{fake.url}/v1/chatkit/server-a",'
            f' "policy": {{"session_limit_counts": "all",'
            f' "limits": {{"read": {{"session": {{"1m": 100000}}}}}}}}}},'
            f' "wf_b": {{"upstream": "{fake.url}/v1/chatkit/server-b/"}}}}'
        ),
        "GATEWAY_ISSUER_API_KEYS": f"{_sha256_entry(API_KEY)},another-plain-key-0123456789",
        "GATEWAY_IDENTITY_SIGNING_KEY": SIGNING_KEY,
        "GATEWAY_CORS_ORIGINS": PAGE_ORIGIN,
        "GATEWAY_REDIS_TIMEOUT": "0.5",
        **extra,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(module_redis: RedisServer, fake: FakeUpstream) -> AsyncIterator[Replicas]:
    def replica() -> GatewayProcess:
        return GatewayProcess(fake.url, redis_url=module_redis.url, env=issuer_env(fake))

    async with running((replica(), replica())) as started:
        yield started


@pytest.fixture(autouse=True)
def fresh(module_redis: RedisServer, fake: FakeUpstream, replicas: Replicas) -> Iterator[None]:
    module_redis.ensure_running()
    fake.clear_faults()
    fake.reset_records()
    yield
    module_redis.ensure_running()
    assert_never_logged(replicas, [API_KEY], "an issuer API key")
    assert_never_logged(replicas, ISSUED, "a client secret")


async def post_create(
    http: aiohttp.ClientSession, gateway: GatewayProcess, body: bytes, *, key: str | None = None
) -> aiohttp.ClientResponse:
    """A create whose body goes as written, with ``key`` as the bearer if given;
    the response comes back read."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions", data=body, headers=headers
    ) as response:
        await response.read()
    return response


async def create(gateway: GatewayProcess, **kwargs: Any) -> ChatSession:
    params: dict[str, Any] = {"user": "user_1", "workflow": {"id": "wf_a"}, **kwargs}
    session = await sdk_create(gateway, API_KEY, **params)
    ISSUED.append(session.client_secret)
    return session


async def chatkit(
    http: aiohttp.ClientSession,
    gateway: GatewayProcess,
    secret: str,
    *,
    path: str = "/chatkit",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """One custom-mode request: (status, JSON body, response headers)."""
    async with http.post(
        f"{gateway.url}{path}",
        json={"type": "threads.list", "params": {}},
        headers={"Authorization": f"Bearer {secret}", **(headers or {})},
    ) as response:
        return response.status, await response.json(), response.headers


# -- session create --------------------------------------------------------------------


async def test_sdk_create_answers_a_chat_session_in_the_reference_shape(
    replicas: Replicas, fake: FakeUpstream
) -> None:
    before = int(time.time())
    session = await create(
        replicas[0],
        user="user_42",
        workflow={"id": "wf_a", "version": "7", "state_variables": {"plan": "pro", "n": 2}},
        expires_after={"anchor": "created_at", "seconds": 300},
        rate_limits={"max_requests_per_1_minute": 25},
        chatkit_configuration={"file_upload": {"enabled": True, "max_files": 3}},
    )
    assert session.id.startswith("cksess_")
    assert session.object == "chatkit.session"
    assert session.client_secret.startswith("ek_")
    assert len(session.client_secret) >= 3 + 43  # 256 bits, URL-safe base64
    assert before + 300 <= session.expires_at <= int(time.time()) + 300
    assert session.status == "active"
    assert session.user == "user_42"
    assert session.workflow.id == "wf_a"
    assert session.workflow.version == "7"
    assert session.workflow.state_variables == {"plan": "pro", "n": 2}
    assert session.workflow.tracing.enabled is True
    assert session.rate_limits.max_requests_per_1_minute == 25
    assert session.max_requests_per_1_minute == 25
    config = session.chatkit_configuration
    assert config.automatic_thread_titling.enabled is True
    assert (config.file_upload.enabled, config.file_upload.max_files) == (True, 3)
    assert config.file_upload.max_file_size == 512
    assert (config.history.enabled, config.history.recent_threads) == (True, None)
    assert fake.count("/v1/chatkit/sessions") == 0, "an issued session was forwarded"


async def test_defaults_apply_when_the_body_names_none(
    replicas: Replicas,
) -> None:
    before = int(time.time())
    session = await create(replicas[1])
    assert session.max_requests_per_1_minute == 10  # GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE
    # Redis's whole second at creation plus 600; Redis runs on this host's clock.
    assert before + 600 <= session.expires_at <= int(time.time()) + 600
    assert session.workflow.version is None
    assert session.chatkit_configuration.file_upload.enabled is False


@pytest.mark.parametrize(
    ("params", "param"),
    [
        # an empty user: the API requires at least one character
        ({"user": ""}, "user"),
        # 65 state variables: the API allows 64
        (
            {"workflow": {"id": "wf_a", "state_variables": {f"k{i}": "v" for i in range(65)}}},
            "workflow.state_variables",
        ),
        # a state variable that is neither string, boolean nor number
        ({"workflow": {"id": "wf_a", "state_variables": {"k": [1]}}}, "workflow.state_variables"),
        # tracing.enabled must be a JSON boolean
        ({"workflow": {"id": "wf_a", "tracing": {"enabled": "yes"}}}, "workflow.tracing.enabled"),
        # expiry below the minimum
        ({"expires_after": {"anchor": "created_at", "seconds": 0}}, "expires_after.seconds"),
        # expiry above GATEWAY_SESSION_MAX_EXPIRES_SECONDS (600)
        ({"expires_after": {"anchor": "created_at", "seconds": 601}}, "expires_after.seconds"),
        # an anchor the API does not know
        ({"expires_after": {"anchor": "now", "seconds": 60}}, "expires_after.anchor"),
        # a limit below one
        (
            {"rate_limits": {"max_requests_per_1_minute": 0}},
            "rate_limits.max_requests_per_1_minute",
        ),
        # an upload size above the API's 512 MB
        (
            {"chatkit_configuration": {"file_upload": {"max_file_size": 513}}},
            "chatkit_configuration.file_upload.max_file_size",
        ),
        # a parameter the API does not have
        ({"extra_body": {"surprise": 1}}, "surprise"),
    ],
)
async def test_invalid_create_bodies_are_400_naming_the_parameter(
    replicas: Replicas,
    module_redis: RedisServer,
    params: dict[str, Any],
    param: str,
) -> None:
    keys_before = redis_keys(module_redis)
    with pytest.raises(openai.BadRequestError) as caught:
        await create(replicas[0], **params)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert redis_keys(module_redis) == keys_before, "a refused create stored something"


async def test_a_create_without_user_is_openais_missing_parameter_error(
    replicas: Replicas, http: aiohttp.ClientSession
) -> None:
    response = await post_create(http, replicas[0], b'{"workflow": {"id": "wf_a"}}', key=API_KEY)
    payload = await response.json()
    assert response.status == 400
    assert payload["error"] == {
        "message": "Missing required parameter: 'user'.",
        "type": "invalid_request_error",
        "param": "user",
        "code": "missing_required_parameter",
    }


@pytest.mark.parametrize("body", [b"[1, 2]", b'{"user": "u"}', b'{"workflow": "wf_a"}'])
async def test_in_mixed_mode_a_body_naming_no_workflow_goes_to_the_hosted_api(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    body: bytes,
) -> None:
    response = await post_create(http, replicas[0], body, key=HOSTED_KEY)
    assert response.status == 400  # the hosted API's own answer
    assert fake.count("/v1/chatkit/sessions") == 1


@pytest.mark.parametrize("body", [b"", b"{not json", b"[" * 990 + b"]" * 990])
async def test_in_mixed_mode_a_body_that_cannot_be_read_is_400_and_not_forwarded(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    body: bytes,
) -> None:
    # Where a create goes is decided by its workflow.id; a body the gateway
    # cannot read cannot be routed, and is refused before any key is looked at.
    response = await post_create(http, replicas[0], body)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"
    assert fake.count("/v1/chatkit/sessions") == 0


@pytest.mark.parametrize(
    "key",
    [
        None,  # no Authorization header
        "ckgk_issuer-test-key-0123456780",  # one character off
        HOSTED_KEY,  # a key for another service
    ],
)
async def test_a_missing_or_wrong_key_is_401_and_nothing_is_forwarded(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    key: str | None,
) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(
        f"{replicas[0].url}/v1/chatkit/sessions",
        json={"user": "u", "workflow": {"id": "wf_a"}},
        headers=headers,
    ) as response:
        payload = await response.json()
    assert response.status == 401
    assert payload["error"]["code"] == "invalid_api_key"
    assert key is None or key not in payload["error"]["message"]
    session = await create(replicas[0])  # the right key still works
    async with http.post(
        f"{replicas[0].url}/v1/chatkit/sessions/{session.id}/cancel", headers=headers
    ) as response:
        assert response.status == 401
    assert fake.count() == 0, "a refused session call reached an upstream"


async def test_a_plain_key_entry_works_too(replicas: Replicas) -> None:
    async with openai_sdk(replicas[0], "another-plain-key-0123456789") as client:
        session = await client.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_a"})
    assert session.status == "active"


# -- client traffic -----------------------------------------------------------------------


async def test_the_chatkit_server_gets_the_identity_never_the_secret(
    replicas: Replicas,
    http: aiohttp.ClientSession,
) -> None:
    user = "Zoë Ünal/ops 1"  # UTF-8 and characters a header value cannot carry raw
    session = await create(
        replicas[0],
        user=user,
        workflow={"id": "wf_a", "version": "3"},
        # Uploads are off unless the session enables them (file_upload.enabled).
        chatkit_configuration={"file_upload": {"enabled": True}},
    )
    status, echo, response_headers = await chatkit(
        http,
        replicas[1],
        session.client_secret,
        path="/chatkit/upload/att_1?name=x",
        headers={
            "X-ChatKit-User": "mallory",  # spoofed identity: must never arrive
            "X-ChatKit-Session-Id": "cksess_forged",
            "x-chatkit-assertion": "forged",
        },
    )
    assert status == 200
    seen = echo["headers"]
    assert echo["path"] == "/v1/chatkit/server-a/upload/att_1"
    assert echo["query"] == "name=x"
    assert "authorization" not in seen
    assert seen["x-chatkit-user"] == quote(user, safe="")
    assert seen["x-chatkit-session-id"] == session.id
    assert seen["x-chatkit-workflow-id"] == "wf_a"
    assert seen["x-chatkit-workflow-version"] == "3"
    assert seen["x-chatkit-expires-at"] == str(session.expires_at)
    assert json.loads(seen["x-chatkit-configuration"]) == session.chatkit_configuration.model_dump()
    assert seen["x-forwarded-host"] == f"127.0.0.1:{replicas[1].port}"
    assert seen["x-forwarded-proto"] == "http"
    assert session.client_secret not in str(echo)
    claims = jwt.decode(
        seen["x-chatkit-assertion"],
        SIGNING_KEY,
        algorithms=["HS256"],
        audience="wf_a",
        issuer="chatkit-gateway",
    )
    assert claims["sub"] == user
    assert claims["sid"] == session.id
    assert claims["rid"] == response_headers["x-request-id"]
    assert len(claims["jti"]) == 32  # the gateway's own, never the client's request id
    assert claims["iat"] <= claims["exp"] <= min(claims["iat"] + 60, session.expires_at)


async def test_each_session_reaches_only_its_own_workflows_server(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    a = await create(replicas[0], workflow={"id": "wf_a"})
    b = await create(replicas[0], workflow={"id": "wf_b"})
    for session, server in ((a, "/v1/chatkit/server-a"), (b, "/v1/chatkit/server-b")):
        status, echo, _ = await chatkit(http, replicas[1], session.client_secret)
        assert status == 200
        assert echo["path"] == server
    # An issued secret is never sent to the hosted API's client routes either.
    status, body, _ = await chatkit(http, replicas[0], a.client_secret, path="/v1/chatkit/x")
    assert (status, body["error"]["code"]) == (401, "invalid_client_secret")
    assert fake.count() == 2


async def test_client_routes_refuse_missing_unknown_and_malformed_secrets(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    cases = [
        ({}, "missing_client_secret"),
        ({"Authorization": "Bearer ek_never_issued"}, "invalid_client_secret"),
        ({"Authorization": "Basic Zm9vOmJhcg=="}, "invalid_authorization"),
    ]
    for headers, code in cases:
        envelope = {"type": "threads.list", "params": {}}
        async with http.post(
            f"{replicas[0].url}/chatkit", json=envelope, headers=headers
        ) as response:
            body = await response.json()
        assert (response.status, body["error"]["code"]) == (401, code)
    assert fake.count() == 0


async def test_the_limit_holds_exactly_across_replicas(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    session = await create(replicas[0], rate_limits={"max_requests_per_1_minute": 5})
    results = await asyncio.gather(
        *(
            chatkit(http, replicas[i % 2], session.client_secret)
            for i in range(17)  # 3 * 5 + 2, alternating replicas
        )
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [429] * 12
    assert fake.count("/v1/chatkit/server-a") == 5
    for status, _, headers in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_an_expired_secret_is_refused(
    replicas: Replicas, http: aiohttp.ClientSession
) -> None:
    # expires_at is Redis's whole second at creation plus the seconds asked,
    # so a session asked for n seconds has between n-1 and n left: with 1 it
    # could be expired by the first request. Redis runs on this host's clock,
    # so each answer is checked against the time it was asked and answered.
    session = await create(
        replicas[0],
        expires_after={"anchor": "created_at", "seconds": 3},
        rate_limits={"max_requests_per_1_minute": 1000},  # every ask counts
    )
    answers: list[tuple[float, float, int, str | None]] = []

    async def expired() -> bool:
        asked = time.time()
        status, body, _ = await chatkit(http, replicas[1], session.client_secret)
        answers.append((asked, time.time(), status, body.get("error", {}).get("code")))
        return status == 401

    await eventually(expired, timeout=10, what="the secret to be refused as expired")
    statuses = [status for _, _, status, _ in answers]
    assert statuses[0] == 200, "the secret was refused with 2 s of its life left"
    assert statuses == [200] * (len(statuses) - 1) + [401]
    for asked, answered, status, code in answers:
        if status == 200:
            assert asked < session.expires_at
        else:
            assert code == "client_secret_expired"
            assert answered >= session.expires_at


async def test_one_set_of_rate_limit_headers_and_the_gateways_cors(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    fake.inject(
        "status",
        status=200,
        path_prefix="/v1/chatkit/server-a",
        headers={
            "x-ratelimit-remaining-requests": "9962",
            "RateLimit": '"upstream";r=1;t=1',
            "Access-Control-Allow-Origin": "*",
        },
    )
    session = await create(replicas[0], rate_limits={"max_requests_per_1_minute": 3})
    async with http.post(
        f"{replicas[0].url}/chatkit",
        json={"type": "threads.add_user_message", "params": {}},
        headers={"Authorization": f"Bearer {session.client_secret}", "Origin": PAGE_ORIGIN},
    ) as response:
        assert response.status == 200
        headers = response.headers
    assert headers.getall("x-ratelimit-remaining-requests") == ["2"]
    assert headers.getall("ratelimit") == ['"session";r=2;t=60']
    assert headers.getall("access-control-allow-origin") == [PAGE_ORIGIN]
    assert "retry-after" in headers["access-control-expose-headers"]
    # The gateway's own 429 carries CORS too, so the page can read Retry-After.
    for _ in range(2):
        await chatkit(http, replicas[1], session.client_secret)
    async with http.post(
        f"{replicas[1].url}/chatkit",
        json={"type": "threads.list", "params": {}},
        headers={"Authorization": f"Bearer {session.client_secret}", "Origin": PAGE_ORIGIN},
    ) as response:
        assert response.status == 429
        assert response.headers["access-control-allow-origin"] == PAGE_ORIGIN
        assert "Origin" in response.headers.getall("vary")
        assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (PAGE_ORIGIN, 204),  # the configured origin
        ("http://evil.example", 403),  # any other origin
    ],
)
async def test_preflights_are_answered_by_the_gateway(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    origin: str,
    status: int,
) -> None:
    async with http.options(
        f"{replicas[0].url}/chatkit",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    ) as response:
        assert response.status == status
        allowed = response.headers.get("access-control-allow-origin")
    if status == 204:
        assert allowed == origin
        assert response.headers["access-control-allow-headers"] == "authorization, content-type"
        assert "POST" in response.headers["access-control-allow-methods"]
    else:
        assert allowed is None
    assert fake.count() == 0, "a preflight reached the upstream"


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_revokes_everywhere_and_is_idempotent(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    a, b = replicas
    session = await create(a, user="user_c")
    assert (await chatkit(http, b, session.client_secret))[0] == 200
    async with openai_sdk(b, API_KEY) as client:
        cancelled = await client.beta.chatkit.sessions.cancel(session.id)
        again = await client.beta.chatkit.sessions.cancel(session.id)  # the SDK may retry
    for answer in (cancelled, again):
        assert answer.id == session.id
        assert answer.status == "cancelled"
        assert answer.user == "user_c"
        assert answer.workflow.id == "wf_a"
    for gateway in replicas:
        status, body, _ = await chatkit(http, gateway, session.client_secret)
        assert (status, body["error"]["code"]) == (401, "client_secret_revoked")
    assert fake.count("/v1/chatkit/sessions") == 0
    assert fake.count("/v1/chatkit/server-a") == 1


async def test_cancel_cuts_a_live_stream_on_the_other_replica(
    replicas: Replicas, http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    session = await create(a)
    events = []
    async with http.post(
        f"{a.url}/chatkit?events=100&interval=0.1",
        json={"type": "threads.add_user_message", "params": {}},
        headers={"Authorization": f"Bearer {session.client_secret}", "Accept": "text/event-stream"},
    ) as response:
        assert response.status == 200
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        async with openai_sdk(b, API_KEY) as client:
            await client.beta.chatkit.sessions.cancel(session.id)
        cut_at = time.monotonic()
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for line in response.content:
                events.append(line)
        closed_after = time.monotonic() - cut_at
    assert closed_after < 2.0, f"the stream stayed open {closed_after:.1f}s after the cancel"
    assert len([e for e in events if e.startswith(b"data: ")]) < 90
    status, body, _ = await chatkit(http, a, session.client_secret)
    assert (status, body["error"]["code"]) == (401, "client_secret_revoked")


async def test_cancel_of_an_unknown_issued_id_is_404_and_a_hosted_id_is_forwarded(
    replicas: Replicas, fake: FakeUpstream
) -> None:
    # An id minted as the gateway mints them (no pepper is configured, so the
    # test can), that no session has: the gateway knows it is its own.
    unknown = SessionIds(None).mint()
    async with openai_sdk(replicas[0], API_KEY) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.beta.chatkit.sessions.cancel(unknown)
    # An id this gateway did not mint goes to the hosted API, as before.
    async with openai_sdk(replicas[0], HOSTED_KEY) as client:
        with pytest.raises(openai.NotFoundError):
            await client.beta.chatkit.sessions.cancel("cksess_hosted_unknown")
    assert fake.count("/v1/chatkit/sessions/cksess_hosted_unknown/cancel") == 1
    assert fake.count(f"/v1/chatkit/sessions/{unknown}") == 0
    # The SDK parses OpenAI's not-found body from the gateway's own answer.
    assert caught.value.status_code == 404


# -- mixed mode -------------------------------------------------------------------------


async def test_an_unconfigured_workflow_is_forwarded_and_learned(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    async with openai_sdk(replicas[0], HOSTED_KEY) as client:
        hosted = await client.beta.chatkit.sessions.create(
            user="u_hosted", workflow={"id": "wf_still_hosted"}
        )
    assert fake.count("/v1/chatkit/sessions") == 1
    assert hosted.id in fake.sessions
    async with http.post(
        f"{replicas[1].url}/v1/chatkit/conversation",
        json={},
        headers={"Authorization": f"Bearer {hosted.client_secret}"},
    ) as response:
        assert response.status == 200
    # ...and a hosted secret does not open the self-hosted servers.
    status, body, _ = await chatkit(http, replicas[1], hosted.client_secret)
    assert (status, body["error"]["code"]) == (401, "invalid_client_secret")


# -- the store down: nothing half-done ----------------------------------------------------


async def test_redis_paused_during_create_is_503_and_hands_out_nothing(
    replicas: Replicas, module_redis: RedisServer
) -> None:
    keys_before = redis_keys(module_redis)
    module_redis.pause()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await create(replicas[0])
    finally:
        module_redis.resume()
    assert caught.value.status_code == 503
    assert caught.value.code == "store_unavailable"
    session = await create(replicas[0])  # and the gateway recovers by itself
    assert session.status == "active"
    # An issued session is three keys: its record under the secret's hash,
    # and the id's mapping to that hash and its document. The refused
    # create's write was queued in the paused Redis's socket and may have run
    # when it resumed: then it is a whole second session, whose secret was
    # never handed out, so it can admit nobody.
    added = {k.decode() if isinstance(k, bytes) else k for k in redis_keys(module_redis)}
    added -= {k.decode() if isinstance(k, bytes) else k for k in keys_before}
    ids = {key.split("{sid:", 1)[1].split("}", 1)[0] for key in added if "{sid:" in key}
    assert session.id in ids
    assert len(ids) in (1, 2)
    assert added == {
        *(key for sid in ids for key in (f"ckg:{{sid:{sid}}}:h", f"ckg:{{sid:{sid}}}:d")),
        *(key for key in added if key.endswith(":s") and "{sid:" not in key),
    }
    assert len([key for key in added if key.endswith(":s")]) == len(ids)


async def test_redis_paused_during_cancel_is_503_and_the_session_stays_usable(
    replicas: Replicas,
    module_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    a, b = replicas
    session = await create(a)
    module_redis.pause()
    try:
        async with openai_sdk(b, API_KEY) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.beta.chatkit.sessions.cancel(session.id)
    finally:
        module_redis.resume()
    assert caught.value.status_code == 503
    # Not cancelled, not half cancelled: it works on both replicas...
    for gateway in replicas:
        assert (await chatkit(http, gateway, session.client_secret))[0] == 200
    # ...until the retried cancel succeeds.
    async with openai_sdk(b, API_KEY) as client:
        assert (await client.beta.chatkit.sessions.cancel(session.id)).status == "cancelled"
    assert (await chatkit(http, a, session.client_secret))[0] == 401


# -- a gateway with no hosted upstream ---------------------------------------------------


async def test_a_gateway_without_hosted_upstream_issues_only(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    key_output = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "new-api-key", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await key_output.communicate()
    lines = dict(line.split(":", 1) for line in out.decode().splitlines() if ":" in line)
    key, entry = lines["key"].strip(), lines["entry"].strip()
    assert entry.startswith("sha256:")
    assert key not in entry
    env = issuer_env(fake, GATEWAY_ISSUER_API_KEYS=entry)
    async with GatewayProcess("none", env=env) as gateway:
        async with openai_sdk(gateway, key) as client:
            session = await client.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_b"})
            with pytest.raises(openai.BadRequestError) as unknown_workflow:
                await client.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_z"})
            with pytest.raises(openai.BadRequestError) as empty_workflow:
                await client.beta.chatkit.sessions.create(user="u", workflow={"id": ""})
            with pytest.raises(openai.NotFoundError):
                await client.beta.chatkit.sessions.cancel("cksess_from_elsewhere")
        assert unknown_workflow.value.param == "workflow.id"
        assert empty_workflow.value.param == "workflow.id"
        # With no hosted API to defer to, every body is validated here.
        for body in (b"", b"{not json", b"[1, 2]"):
            async with http.post(
                f"{gateway.url}/v1/chatkit/sessions",
                data=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                payload = await response.json()
            assert (response.status, payload["error"]["code"]) == (400, "invalid_json")
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation",
            headers={"Authorization": f"Bearer {session.client_secret}"},
        ) as response:
            assert response.status == 404  # no hosted client routes at all
        assert (await chatkit(http, gateway, session.client_secret))[0] == 200
    assert fake.count("/v1/chatkit/sessions") == 0


async def test_a_forwarded_cancel_is_acted_on_after_its_caller_gave_up(
    replicas: Replicas,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
) -> None:
    # The caller times out at 0.3 s; the hosted API completes the cancel at
    # 1.5 s. The gateway must still see that success and revoke the secret.
    async with openai_sdk(replicas[0], HOSTED_KEY) as client:
        hosted = await client.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_h"})
    fake.inject("delay", seconds=1.5, path_prefix="/v1/chatkit/sessions/", method="POST")
    async with openai_sdk(replicas[0], HOSTED_KEY, timeout=0.3) as impatient:
        with pytest.raises(openai.APITimeoutError):
            await impatient.beta.chatkit.sessions.cancel(hosted.id)
    await fake.wait_for(lambda: fake.sessions[hosted.id]["status"] == "cancelled", timeout=5)

    async def revoked() -> bool:
        async with http.post(
            f"{replicas[1].url}/v1/chatkit/conversation",
            json={},
            headers={"Authorization": f"Bearer {hosted.client_secret}"},
        ) as response:
            return response.status == 401

    await eventually(revoked, timeout=5, what="the cancelled secret to be refused")


async def test_a_hosted_session_that_cannot_be_registered_is_503_not_a_dead_secret(
    replicas: Replicas, module_redis: RedisServer, fake: FakeUpstream
) -> None:
    # The hosted API creates the session, but the gateway cannot record it:
    # handing its secret out would give the user a session every request of
    # which is refused. The caller gets 503 and retries instead.
    fake.inject("delay", seconds=0.3, path_prefix="/v1/chatkit/sessions", method="POST")
    async with openai_sdk(replicas[0], HOSTED_KEY) as client:
        create = asyncio.ensure_future(
            client.beta.chatkit.sessions.create(user="u", workflow={"id": "wf_h"})
        )
        await fake.wait_for(lambda: fake.count("/v1/chatkit/sessions") == 1)
        module_redis.pause()
        try:
            with pytest.raises(openai.InternalServerError) as caught:
                await create
        finally:
            module_redis.resume()
    assert caught.value.status_code == 503
    assert caught.value.code == "store_unavailable"
