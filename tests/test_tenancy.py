"""Several apps on one gateway, and a user banned everywhere at once.

Two gateway replicas share one Redis. Two real ``openai-chatkit`` servers
serve the issued workflows ``wf_a`` and ``wf_b``; the fake hosted API
answers the rest (learned sessions). Each app's backend is the official
``openai`` SDK with that app's key:

- ``support`` (two keys): ``wf_a`` only, at most 2 active sessions per user,
  the oldest revoked beyond that;
- ``billing``: ``wf_b`` only, at most 1 active session per user, refused beyond;
- ``burst``: both workflows, at most 5 creates per minute;
- ``default``: the old-style ``GATEWAY_ISSUER_API_KEYS`` key, unrestricted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai.types.beta.chatkit import ChatSession

from gateway.issuer import SessionIds
from tests.chatkit_server import ChatKitServerProcess, threads_create_body
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisServer,
    Samples,
    assert_never_logged,
    create_session,
    eventually,
    free_port,
    metric_value,
    open_stream,
    running,
    scrape,
    sdk_cancel,
    sdk_create,
    until_closed,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

SUPPORT_KEYS = ("ckgk_support-key-one-0123456789", "ckgk_support-key-two-0123456789")
BILLING_KEY = "ckgk_billing-key-0123456789abcdef"
BURST_KEY = "ckgk_burst-key-0123456789abcdefgh"
LEGACY_KEY = "ckgk_legacy-key-0123456789abcdefg"
SIGNING_KEY = "tenancy-test-signing-key-0123456789abcdef"
ADMIN_TOKEN = "tenancy-admin-token-0123456789"
CLI = Path(sys.executable).parent / "chatkit-gateway"
SECRETS: list[str] = []
#: Seconds a server may take to answer its health check: four Python servers
#: start at once here, and on a busy shared machine 20 s has not always been enough.
STARTUP = 60.0


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


APPS = {
    "support": {
        "keys": [digest(k) for k in SUPPORT_KEYS],
        "workflows": ["wf_a"],
        "max_active_sessions_per_user": 2,
    },
    "billing": {
        "keys": [digest(BILLING_KEY)],
        "workflows": ["wf_b"],
        "max_active_sessions_per_user": 1,
        "on_too_many_sessions": "refuse",
    },
    "burst": {
        "keys": [digest(BURST_KEY)],
        "workflows": ["wf_a", "wf_b"],
        "max_sessions_per_minute": 5,
    },
}


#: Windows per session and per user, so a user's view has each kind to show.
WF_A_POLICY = {
    "limits": {
        "turn": {"session": {"1m": 20}, "user": {"1d": 50}},
        "read": {"session": {"1m": 30}, "user": {"1h": 100}},
    }
}


@dataclass(frozen=True)
class Replica:
    process: GatewayProcess
    admin_url: str

    @property
    def url(self) -> str:
        return self.process.url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers() -> AsyncIterator[tuple[ChatKitServerProcess, ChatKitServerProcess]]:
    a = ChatKitServerProcess(
        signing_key=SIGNING_KEY, workflow_ids=["wf_a"], startup_timeout=STARTUP
    )
    b = ChatKitServerProcess(
        signing_key=SIGNING_KEY, workflow_ids=["wf_b"], startup_timeout=STARTUP
    )
    async with running((a, b)) as started:
        yield started


def replica_env(redis_url: str, servers: tuple[ChatKitServerProcess, ...]) -> dict[str, str]:
    return {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_WORKFLOWS": json.dumps(
            {
                "wf_a": {"upstream": servers[0].url, "policy": WF_A_POLICY},
                "wf_b": {"upstream": servers[1].url},
            }
        ),
        "GATEWAY_ISSUER_KEYS": json.dumps(APPS),
        "GATEWAY_ISSUER_API_KEYS": digest(LEGACY_KEY),
        "GATEWAY_IDENTITY_SIGNING_KEY": SIGNING_KEY,
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    module_redis: RedisServer,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    fake: FakeUpstream,
) -> AsyncIterator[tuple[Replica, Replica]]:
    made = []
    for name in ("a", "b"):
        admin_port = free_port()
        env = {
            **replica_env(module_redis.url, servers),
            "GATEWAY_ADMIN_PORT": str(admin_port),
            "GATEWAY_REPLICA_ID": f"replica-{name}",
            "GATEWAY_ACCESS_LOG": "true",
        }
        made.append(
            Replica(
                GatewayProcess(
                    fake.url, redis_url=module_redis.url, env=env, startup_timeout=STARTUP
                ),
                f"http://127.0.0.1:{admin_port}",
            )
        )
    async with running([r.process for r in made]):
        yield made[0], made[1]


@pytest.fixture(autouse=True)
def no_key_or_secret_in_any_log(
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    replicas: tuple[Replica, Replica],
) -> Iterator[None]:
    yield
    processes = (*servers, *(r.process for r in replicas))
    keys = [*SUPPORT_KEYS, BILLING_KEY, BURST_KEY, LEGACY_KEY]
    assert_never_logged(processes, keys, "an issuer API key")
    assert_never_logged(processes, SECRETS, "a client secret")


def user_name(label: str) -> str:
    return f"{label}-{time.monotonic_ns()}"


async def create(replica: Replica, key: str, user: str, workflow: str = "wf_a") -> ChatSession:
    session = await sdk_create(replica, key, user=user, workflow={"id": workflow})
    SECRETS.append(session.client_secret)
    return session


async def admin(
    http: aiohttp.ClientSession, replica: Replica, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(
        method,
        f"{replica.admin_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        return response.status, await response.json()


def post_message(http: aiohttp.ClientSession, replica: Replica, secret: str, text: str) -> Any:
    """A ``threads.create`` as ChatKit JS custom mode posts it."""
    return http.post(
        f"{replica.url}/chatkit",
        data=threads_create_body(text),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )


async def status_of(http: aiohttp.ClientSession, replica: Replica, secret: str) -> int:
    async with post_message(http, replica, secret, "hello") as response:
        await response.read()
        status: int = response.status
        return status


async def read_status(http: aiohttp.ClientSession, replica: Replica, secret: str) -> int:
    """A ``threads.list``, as ChatKit JS sends it to show the history."""
    async with http.post(
        f"{replica.url}/chatkit",
        json={"type": "threads.list", "params": {"limit": 20, "order": "desc"}},
        headers={"Authorization": f"Bearer {secret}"},
    ) as response:
        await response.read()
        status: int = response.status
        return status


@contextlib.asynccontextmanager
async def live_stream(
    http: aiohttp.ClientSession, replica: Replica, secret: str
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A ChatKit stream of 50 events 0.1 s apart, its first event already in."""
    async with post_message(http, replica, secret, "slow 50 0.1") as response:
        assert response.status == 200
        raw = b""
        async for chunk in response.content.iter_any():
            raw += chunk
            if b"tick" in raw:
                break
        yield response


async def ends_within(response: aiohttp.ClientResponse, seconds: float) -> float:
    """Read the stream to its end; how long that took, failing past ``seconds``."""
    started = time.monotonic()
    ticks = 0

    async def drain() -> None:
        nonlocal ticks
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                ticks += chunk.count(b"tick")

    await asyncio.wait_for(drain(), timeout=seconds)
    assert ticks < 45, "the stream ran to its end instead of being cut"
    return time.monotonic() - started


# -- scoped keys ----------------------------------------------------------------------


async def test_a_key_may_not_create_sessions_for_another_workflow(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    user = user_name("scoped")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await create(replicas[0], SUPPORT_KEYS[0], user, workflow="wf_b")
    error = refused.value
    assert error.status_code == 403
    assert error.body == {
        "message": "The API key of app 'support' may not create sessions for workflow 'wf_b'.",
        "type": "invalid_request_error",
        "param": "workflow.id",
        "code": "workflow_not_allowed",
    }
    # Nothing registered or counted: the user has no session anywhere.
    status, view = await admin(http, replicas[1], "GET", f"/admin/users/{user}")
    assert (status, view["sessions"]) == (200, [])
    samples = await scrape(http, replicas[0].url)
    refusals = metric_value(
        samples,
        "chatkit_gateway_session_creates_refused_total",
        app="support",
        reason="workflow_not_allowed",
    )
    assert refusals is not None
    assert refusals >= 1
    await eventually(
        lambda: "app=support" in replicas[0].process.output(),
        what="the access log line naming the app",
    )


async def test_another_apps_session_is_not_found_exactly_like_an_unknown_one(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    theirs = await create(replicas[0], BILLING_KEY, user_name("foreign"), workflow="wf_b")
    unknown = SessionIds(None).mint()  # minted as the gateway mints, never issued
    answers = []
    for session_id in (theirs.id, unknown):
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk_cancel(replicas[1], SUPPORT_KEYS[0], session_id)
        body = dict(missing.value.body)  # type: ignore[call-overload]
        body["message"] = body["message"].replace(session_id, "<id>")
        answers.append((missing.value.status_code, body))
    assert answers[0] == answers[1]
    assert answers[0][0] == 404
    # Not cancelled by the refusal; its own app may cancel it.
    assert await status_of(http, replicas[0], theirs.client_secret) == 200
    assert (await sdk_cancel(replicas[1], BILLING_KEY, theirs.id)).status == "cancelled"


async def test_both_keys_of_an_app_work_and_share_its_sessions(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    session = await create(replicas[0], SUPPORT_KEYS[0], user_name("rotate"))
    other = await create(replicas[1], SUPPORT_KEYS[1], user_name("rotate"))
    assert await status_of(http, replicas[1], other.client_secret) == 200
    # The second key cancels what the first created: one app, two keys.
    assert (await sdk_cancel(replicas[1], SUPPORT_KEYS[1], session.id)).status == "cancelled"
    assert await status_of(http, replicas[0], session.client_secret) == 401
    status, info = await admin(http, replicas[0], "GET", f"/admin/sessions/{other.id}")
    assert (status, info["app"], info["status"]) == (200, "support", "active")


async def test_old_style_keys_are_one_unrestricted_app_named_default(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    user = user_name("legacy")
    sessions = [
        await create(replicas[i % 2], LEGACY_KEY, user, workflow=wf)
        for i, wf in enumerate(("wf_a", "wf_b", "wf_a", "wf_a"))
    ]
    statuses = [await status_of(http, replicas[0], s.client_secret) for s in sessions]
    assert statuses == [200] * 4
    with pytest.raises(openai.NotFoundError):
        await sdk_cancel(replicas[0], SUPPORT_KEYS[0], sessions[0].id)
    assert (await sdk_cancel(replicas[1], LEGACY_KEY, sessions[0].id)).status == "cancelled"
    status, app = await admin(http, replicas[0], "GET", "/admin/apps/default")
    assert status == 200
    assert app["workflows"] is None
    assert app["max_sessions_per_minute"] is None


# -- bounded creation -----------------------------------------------------------------


async def test_an_apps_create_window_is_exact_across_replicas(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    async def one(i: int) -> tuple[str | None, int]:
        """(the refusal's code or None, its Retry-After or 0)"""
        try:
            workflow = ("wf_a", "wf_b")[i % 2]
            await create(replicas[i % 2], BURST_KEY, user_name(f"burst{i}"), workflow)
        except openai.RateLimitError as exc:
            return exc.code, int(exc.response.headers["retry-after"])
        return None, 0

    results = await asyncio.gather(*(one(i) for i in range(12)))
    assert [code for code, _ in results].count(None) == 5
    refused = [(code, retry) for code, retry in results if code is not None]
    assert len(refused) == 7
    assert all(code == "session_rate_limit_exceeded" for code, _ in refused)
    assert all(1 <= retry <= 60 for _, retry in refused)
    status, app = await admin(http, replicas[1], "GET", "/admin/apps/burst")
    assert status == 200
    assert (app["creates_in_window"], app["active_sessions"], app["window_seconds"]) == (5, 5, 60)
    assert app["max_sessions_per_minute"] == 5


async def test_revoke_oldest_cuts_the_oldest_sessions_live_stream(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    user = user_name("reload")
    oldest = await create(a, SUPPORT_KEYS[0], user)
    second = await create(b, SUPPORT_KEYS[1], user)
    async with live_stream(http, b, oldest.client_secret) as stream:
        # A third page load: the user's oldest session makes room.
        third = await create(a, SUPPORT_KEYS[0], user)
        assert await ends_within(stream, 2.0) < 2.0
    assert await status_of(http, b, oldest.client_secret) == 401
    assert await status_of(http, a, second.client_secret) == 200
    assert await status_of(http, b, third.client_secret) == 200
    status, tail = await admin(http, a, "GET", "/admin/revocations?tail=50")
    entries = [e for e in tail["data"] if e["session_id"] == oldest.id]
    assert status == 200
    assert [(e["reason"], e["app"]) for e in entries] == [("too_many_sessions", "support")]
    status, view = await admin(http, b, "GET", f"/admin/users/{user}")
    assert {s["session_id"] for s in view["sessions"]} == {second.id, third.id}


async def test_refuse_answers_429_until_a_session_ends(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    user = user_name("refuse")
    first = await create(replicas[0], BILLING_KEY, user, workflow="wf_b")
    with pytest.raises(openai.RateLimitError) as refused:
        await create(replicas[1], BILLING_KEY, user, workflow="wf_b")
    assert refused.value.code == "too_many_active_sessions"
    retry = int(refused.value.response.headers["retry-after"])
    assert 590 <= retry <= 600  # until the first session expires
    assert await status_of(http, replicas[0], first.client_secret) == 200  # untouched
    await sdk_cancel(replicas[1], BILLING_KEY, first.id)
    second = await create(replicas[1], BILLING_KEY, user, workflow="wf_b")
    assert await status_of(http, replicas[0], second.client_secret) == 200


# -- banning a user -------------------------------------------------------------------


async def test_a_ban_cuts_a_live_stream_on_the_other_replica_and_refuses_the_next_create(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    a, b = replicas
    user = user_name("banned")
    issued = [
        await create(a, SUPPORT_KEYS[0], user),
        await create(b, LEGACY_KEY, user, workflow="wf_b"),
    ]
    learned = await create_session(http, a.url, user=user)
    SECRETS.append(learned["client_secret"])
    bystander = await create(a, SUPPORT_KEYS[0], user_name("bystander"))

    hosted = await open_stream(http, b, learned["client_secret"], events=100)
    async with live_stream(http, b, issued[0].client_secret) as stream:
        status, result = await admin(
            http, a, "POST", "/admin/revoke", {"user": user, "for_seconds": 120}
        )
        assert status == 200
        assert await ends_within(stream, 2.0) < 2.0
    seen, _ = await until_closed(hosted)
    assert seen < 100
    assert result["revoked"] == 3
    assert result["banned_for_seconds"] == 120
    assert {s["session_id"] for s in result["sessions"]} == {
        issued[0].id,
        issued[1].id,
        learned["id"],
    }
    for secret in (*(s.client_secret for s in issued), learned["client_secret"]):
        assert await status_of(http, a, secret) == 401
    assert await status_of(http, b, bystander.client_secret) == 200

    # The next create is refused, issued or hosted, on every replica.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await create(b, SUPPORT_KEYS[1], user)
    assert refused.value.code == "user_banned"
    assert 110 <= int(refused.value.response.headers["retry-after"]) <= 120
    creates_before = len(fake.sessions)
    async with http.post(
        f"{a.url}/v1/chatkit/sessions",
        headers={"Authorization": "Bearer sk-test"},
        json={"user": user, "workflow": {"id": "wf_1"}},
    ) as response:
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (403, "user_banned")
    assert len(fake.sessions) == creates_before, "a banned user's create was forwarded"

    # One audit entry per session; the user's view shows the ban.
    status, tail = await admin(http, b, "GET", "/admin/revocations?tail=100")
    reasons = [e["reason"] for e in tail["data"] if e["session_id"] in result_ids(result)]
    assert reasons == ["ban"] * 3
    status, view = await admin(http, b, "GET", f"/admin/users/{user}")
    assert view["sessions"] == []
    assert 100 < view["banned_for_seconds"] <= 120

    # Lifted early, the user gets sessions again; the revoked ones stay revoked.
    status, lifted = await admin(http, a, "DELETE", f"/admin/bans/{user}")
    assert (status, lifted) == (200, {"user": user, "lifted": True})
    again = await create(b, SUPPORT_KEYS[0], user)
    assert await status_of(http, a, again.client_secret) == 200
    assert await status_of(http, a, issued[0].client_secret) == 401


def result_ids(result: dict[str, Any]) -> set[str]:
    return {s["session_id"] for s in result["sessions"]}


async def test_a_users_view_lists_active_sessions_with_what_remains(
    replicas: tuple[Replica, Replica],
    http: aiohttp.ClientSession,
    module_redis: RedisServer,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
) -> None:
    user = user_name("viewed")
    first = await sdk_create(
        replicas[0],
        SUPPORT_KEYS[0],
        user=user,
        workflow={"id": "wf_a"},
        rate_limits={"max_requests_per_1_minute": 4},
    )
    SECRETS.append(first.client_secret)
    other = await create(replicas[1], SUPPORT_KEYS[1], user)
    second = await create(replicas[1], LEGACY_KEY, user, workflow="wf_b")
    # Turns and reads through both replicas: first 2 turns and 3 reads, other
    # 1 turn and 1 read, second (wf_b, the default policy) 1 read.
    for replica, secret, requests in (
        (replicas[1], first.client_secret, ("turn", "read", "read")),
        (replicas[0], first.client_secret, ("turn", "read")),
        (replicas[0], other.client_secret, ("turn", "read")),
        (replicas[1], second.client_secret, ("read",)),
    ):
        for cls in requests:
            if cls == "turn":
                assert await status_of(http, replica, secret) == 200
            else:
                assert await read_status(http, replica, secret) == 200
    status, view = await admin(http, replicas[0], "GET", f"/admin/users/{user}")
    assert status == 200
    assert view["banned_for_seconds"] is None
    rows = {s["session_id"]: s for s in view["sessions"]}
    assert set(rows) == {first.id, other.id, second.id}
    assert rows[first.id]["app"] == "support"
    assert rows[first.id]["workflow_id"] == "wf_a"
    assert rows[first.id]["windows"] == {
        # An issued session's own limit counts its turns.
        "session": {"limit": 4, "remaining": 2, "window_seconds": 60, "counts": "turn"},
        "turn-session-1m": {"limit": 20, "remaining": 18, "window_seconds": 60},
        "read-session-1m": {"limit": 30, "remaining": 27, "window_seconds": 60},
        # The classes the policy does not name keep their defaults.
        "write-session-1m": {"limit": 60, "remaining": 60, "window_seconds": 60},
        "upload-session-1m": {"limit": 10, "remaining": 10, "window_seconds": 60},
        "transcribe-session-1m": {"limit": 10, "remaining": 10, "window_seconds": 60},
    }
    assert rows[other.id]["windows"]["turn-session-1m"]["remaining"] == 19
    assert rows[other.id]["windows"]["read-session-1m"]["remaining"] == 29
    assert rows[second.id]["app"] == "default"
    assert rows[second.id]["windows"]["read-session-1m"] == {
        "limit": 120,
        "remaining": 119,
        "window_seconds": 60,
    }
    # The user's own windows, across both wf_a sessions; wf_b's policy sets none.
    assert view["user_windows"] == {
        "wf_a": {
            "turn-user-1d": {"limit": 50, "remaining": 47, "window_seconds": 86400},
            "read-user-1h": {"limit": 100, "remaining": 96, "window_seconds": 3600},
        }
    }
    # The other replica sees the same, and looking twice changes nothing.
    status, again = await admin(http, replicas[1], "GET", f"/admin/users/{user}")
    assert (status, again) == (200, view)
    # The CLI shows the same windows.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= replica_env(module_redis.url, servers)
    shown = await asyncio.to_thread(
        subprocess.run,
        [str(CLI), "user", user],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "session=2/4 turn-session-1m=18/20 read-session-1m=27/30" in shown.stdout
    assert "workflow=wf_a remaining turn-user-1d=47/50 read-user-1h=96/100" in shown.stdout


async def test_the_cli_bans_a_user_and_shows_an_app(
    replicas: tuple[Replica, Replica],
    http: aiohttp.ClientSession,
    module_redis: RedisServer,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
) -> None:
    user = user_name("cli")
    session = await create(replicas[0], SUPPORT_KEYS[0], user)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= replica_env(module_redis.url, servers)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CLI), *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    banned = await asyncio.to_thread(run, "revoke", "--user", user, "--for", "2m")
    assert banned.returncode == 0, banned.stderr
    assert f"session {session.id} (app support): revoked" in banned.stdout
    assert "new sessions refused for 120 s" in banned.stdout
    assert await status_of(http, replicas[1], session.client_secret) == 401
    with pytest.raises(openai.PermissionDeniedError):
        await create(replicas[1], SUPPORT_KEYS[0], user)
    shown = await asyncio.to_thread(run, "user", user)
    assert shown.returncode == 0, shown.stderr
    assert "banned for" in shown.stdout
    app = await asyncio.to_thread(run, "app", "support")
    assert app.returncode == 0, app.stderr
    assert "max_active_sessions_per_user: 2" in app.stdout
    missing = await asyncio.to_thread(run, "app", "nobody")
    assert missing.returncode == 2
    unbanned = await asyncio.to_thread(run, "unban", "--user", user)
    assert (unbanned.returncode, unbanned.stdout) == (0, f"user {user}: ban lifted\n")
    bad = await asyncio.to_thread(run, "revoke", "--user", user, "--for", "soon")
    assert (bad.returncode, "--for" in bad.stderr) == (2, True)


# -- the app on the record ------------------------------------------------------------

DECISIONS = "chatkit_gateway_admission_decisions_total"
RETIRED_KEY = "ckgk_retired-key-0123456789abcdef"


def gained(before: Samples, after: Samples, **labels: str) -> float:
    """How much the admission counter with exactly these labels grew."""
    return (metric_value(after, DECISIONS, **labels) or 0) - (
        metric_value(before, DECISIONS, **labels) or 0
    )


def access_lines(process: GatewayProcess) -> list[str]:
    return [line for line in process.output().splitlines() if "gateway.access" in line]


async def test_client_traffic_is_counted_and_logged_by_the_app_that_issued_it(
    replicas: tuple[Replica, Replica], http: aiohttp.ClientSession
) -> None:
    # Each app's session is created on one replica and used on the other:
    # the app comes from the shared record, in the admission's round trip.
    support = await create(replicas[1], SUPPORT_KEYS[1], user_name("label"))
    billing = await create(replicas[1], BILLING_KEY, user_name("label"), workflow="wf_b")
    before = await scrape(http, replicas[0].url)
    assert await status_of(http, replicas[0], support.client_secret) == 200
    assert await read_status(http, replicas[0], billing.client_secret) == 200
    after = await scrape(http, replicas[0].url)
    admitted = {"outcome": "admitted"}
    assert [
        gained(before, after, **admitted, workflow=wf, app=app, **{"class": cls})
        for wf, app, cls in (("wf_a", "support", "turn"), ("wf_b", "billing", "read"))
    ] == [1, 1]
    await eventually(
        lambda: (
            sum(" POST /chatkit 200 " in line for line in access_lines(replicas[0].process)) >= 2
        ),
        what="the access-log lines of both requests",
    )
    lines = [line for line in access_lines(replicas[0].process) if " POST /chatkit 200 " in line]
    assert any(" app=support workflow=wf_a class=turn" in line for line in lines), lines
    assert any(" app=billing workflow=wf_b class=read" in line for line in lines), lines


async def test_an_app_a_replica_was_not_configured_with_is_never_a_label(
    replicas: tuple[Replica, Replica],
    http: aiohttp.ClientSession,
    module_redis: RedisServer,
    servers: tuple[ChatKitServerProcess, ChatKitServerProcess],
    fake: FakeUpstream,
) -> None:
    # A third replica knows one more app (as during a rollout that adds it,
    # or after one that removed it): its sessions reach replicas that do not.
    env = replica_env(module_redis.url, servers)
    env |= {
        "GATEWAY_ISSUER_KEYS": json.dumps(
            {**APPS, "retired": {"keys": [digest(RETIRED_KEY)], "workflows": ["wf_a"]}}
        ),
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "GATEWAY_REPLICA_ID": "replica-retired",
        "GATEWAY_ACCESS_LOG": "true",
        "GATEWAY_LOG_FORMAT": "json",
    }
    third = GatewayProcess(fake.url, redis_url=module_redis.url, env=env, startup_timeout=STARTUP)
    async with running([third]):
        retired = await sdk_create(
            third, RETIRED_KEY, user=user_name("retired"), workflow={"id": "wf_a"}
        )
        SECRETS.append(retired.client_secret)
        support = await create(replicas[0], SUPPORT_KEYS[0], user_name("json"))
        before = await scrape(http, replicas[0].url)
        assert await status_of(http, replicas[0], retired.client_secret) == 200
        after = await scrape(http, replicas[0].url)
        # The JSON access log of a client request names its app as a field.
        async with http.post(
            f"{third.url}/chatkit",
            json={"type": "threads.list", "params": {"limit": 20, "order": "desc"}},
            headers={"Authorization": f"Bearer {support.client_secret}"},
        ) as response:
            assert response.status == 200
        await eventually(
            lambda: any('"/chatkit"' in line for line in access_lines(third)),
            what="the JSON access-log line",
        )
        entries = [json.loads(line) for line in access_lines(third) if '"/chatkit"' in line]
        keys = [RETIRED_KEY]
        assert_never_logged((third,), keys, "an issuer API key")
    assert (
        gained(before, after, outcome="admitted", workflow="wf_a", app="other", **{"class": "turn"})
        == 1
    )
    assert not [labels for _, labels in after if ("app", "retired") in labels]
    [entry] = entries
    assert (entry["app"], entry["workflow"], entry["class"]) == ("support", "wf_a", "read")
    # The replica that does not know the app still logs the record's name.
    await eventually(
        lambda: any(
            " app=retired workflow=wf_a class=turn" in line
            for line in access_lines(replicas[0].process)
        ),
        what="the text access-log line of the retired app's request",
    )
