"""The operators' revocation controls, end to end.

The CLI runs as a real subprocess (``chatkit-gateway revoke|revocations``)
against a real Redis that a running gateway also uses; the admin API is the
gateway's own listener on GATEWAY_ADMIN_PORT. Every revocation must reach the
running gateway, land in the audit log, and never expose the raw secret.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.auth import SecretHasher
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    GatewayProcess,
    RedisServer,
    assert_never_logged,
    converse,
    eventually,
    free_port,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "sk-test-operator"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
REPLICA = "replica-op"
HASH = SecretHasher(None)  # no GATEWAY_SECRET_PEPPER is configured
CLI = Path(sys.executable).parent / "chatkit-gateway"


@dataclass(frozen=True)
class Gateway:
    process: GatewayProcess
    admin_url: str

    @property
    def url(self) -> str:
        return self.process.url


@dataclass(frozen=True)
class Session:
    id: str
    secret: str
    expires_at: int
    user: str


# -- fixtures -------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(module_redis: RedisServer, fake: FakeUpstream) -> AsyncIterator[Gateway]:
    admin_port = free_port()
    process = GatewayProcess(
        fake.url,
        redis_url=module_redis.url,
        env={
            "GATEWAY_REPLICA_ID": REPLICA,
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "GATEWAY_ADMIN_PORT": str(admin_port),
            # The most the gateway will ever log: still no secret in it.
            "GATEWAY_LOG_LEVEL": "debug",
        },
    )
    async with process:
        yield Gateway(process, f"http://127.0.0.1:{admin_port}")


@pytest.fixture(autouse=True)
def no_secret_logged(gateway: Gateway, fake: FakeUpstream) -> Iterator[None]:
    """After each test: no client secret the upstream ever issued is in the gateway's log."""
    yield
    issued = [session["client_secret"] for session in fake.sessions.values()]
    assert_never_logged([gateway.process], issued, "a raw client secret")


# -- helpers ----------------------------------------------------------------------------


async def create_session(
    http: aiohttp.ClientSession, gateway: Gateway, *, limit: int = 10
) -> Session:
    user = f"user_{time.monotonic_ns()}"
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions",
        json={
            "user": user,
            "workflow": {"id": "wf_operator"},
            "rate_limits": {"max_requests_per_1_minute": limit},
        },
        headers={"Authorization": f"Bearer {API_KEY}", "OpenAI-Beta": "chatkit_beta=v1"},
    ) as response:
        assert response.status == 200
        body = await response.json()
    return Session(body["id"], body["client_secret"], body["expires_at"], user)


async def admin(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    method: str,
    path: str,
    *,
    json: Any = None,
    token: str | None = ADMIN_TOKEN,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.request(
        method, f"{gateway.admin_url}{path}", json=json, headers=headers
    ) as response:
        return response.status, await response.json()


async def cli(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``chatkit-gateway ARGS`` with only the given GATEWAY_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | env
    return await asyncio.to_thread(
        subprocess.run,
        [str(CLI), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def prefix(secret: str) -> str:
    return HASH(secret.encode())[:12]


# -- the CLI --------------------------------------------------------------------------


async def test_cli_revoke_by_session_id_is_enforced_by_the_running_gateway(
    gateway: Gateway, module_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    session = await create_session(http, gateway)
    assert await converse(http, gateway, session.secret) == (200, None)

    done = await cli(
        "revoke", "--session-id", session.id, env={"GATEWAY_REDIS_URL": module_redis.url}
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        f"session {session.id} (secret hash {prefix(session.secret)}...): revoked"
    )
    assert await converse(http, gateway, session.secret) == (401, "client_secret_revoked")

    again = await cli(
        "revoke", "--session-id", session.id, env={"GATEWAY_REDIS_URL": module_redis.url}
    )
    assert again.returncode == 0, again.stderr
    assert "was already revoked" in again.stdout


async def test_cli_revoke_reads_the_secret_from_stdin(
    gateway: Gateway, module_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    session = await create_session(http, gateway)

    done = await cli(
        "revoke",
        "--secret-stdin",
        env={"GATEWAY_REDIS_URL": module_redis.url},
        stdin=session.secret,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        f"session {session.id} (secret hash {prefix(session.secret)}...): revoked"
    )
    assert session.secret not in done.stdout + done.stderr
    assert await converse(http, gateway, session.secret) == (401, "client_secret_revoked")


async def test_cli_revoke_fails_clearly_when_redis_is_unreachable() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"

    done = await cli("revoke", "--session-id", "cksess_abc", env={"GATEWAY_REDIS_URL": nobody})

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("chatkit-gateway: revocation failed: Redis is unavailable")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("revoke", "--session-id", "cksess_abc"),  # the store to revoke in is unknown
        ("revocations", "--tail", "5"),  # so is the audit log to read
    ],
)
async def test_cli_without_a_redis_url_is_a_usage_error(args: tuple[str, ...]) -> None:
    done = await cli(*args, env={})

    assert done.returncode == 2
    assert "GATEWAY_REDIS_URL is not set" in done.stderr
    assert "Traceback" not in done.stderr


async def test_cli_revocations_lists_cancel_cli_and_admin_entries_without_secrets(
    gateway: Gateway, module_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    by_cancel, by_cli, by_admin = [await create_session(http, gateway) for _ in range(3)]
    async with http.post(
        f"{gateway.url}/v1/chatkit/sessions/{by_cancel.id}/cancel",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as response:
        assert response.status == 200
    revoked = await cli(
        "revoke",
        "--session-id",
        by_cli.id,
        env={"GATEWAY_REDIS_URL": module_redis.url, "GATEWAY_REPLICA_ID": "ops-laptop"},
    )
    assert revoked.returncode == 0, revoked.stderr
    status, _ = await admin(
        http, gateway, "POST", "/admin/revoke", json={"session_id": by_admin.id}
    )
    assert status == 200

    done = await cli("revocations", "--tail", "3", env={"GATEWAY_REDIS_URL": module_redis.url})

    assert done.returncode == 0, done.stderr
    pattern = re.compile(
        r"^\S+  (?P<reason>\S+)\s+session=(?P<sid>\S+) secret=(?P<prefix>\S+) replica=(?P<rep>\S+)$"
    )
    rows = [m.groupdict() for m in map(pattern.match, done.stdout.splitlines()) if m]
    assert rows == [
        # oldest first: the cancel through the gateway, the CLI, the admin API
        {
            "reason": "cancel",
            "sid": by_cancel.id,
            "prefix": prefix(by_cancel.secret),
            "rep": REPLICA,
        },
        {
            "reason": "cli",
            "sid": by_cli.id,
            "prefix": prefix(by_cli.secret),
            "rep": "cli@ops-laptop",
        },
        {"reason": "admin", "sid": by_admin.id, "prefix": prefix(by_admin.secret), "rep": REPLICA},
    ]
    for secret in (by_cancel.secret, by_cli.secret, by_admin.secret):
        assert secret not in done.stdout

    newest = await cli("revocations", "--tail", "1", env={"GATEWAY_REDIS_URL": module_redis.url})
    assert newest.returncode == 0
    assert len(newest.stdout.splitlines()) == 1
    assert f"session={by_admin.id}" in newest.stdout


# -- the admin API ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,  # no Authorization header
        f"Bearer {ADMIN_TOKEN[:-1]}",  # a prefix of the token
        f"Bearer {ADMIN_TOKEN}x",  # the token with a byte more
        ADMIN_TOKEN,  # the token without the Bearer scheme
        f"Bearer {API_KEY}",  # an API key is not an admin token
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/admin/revoke"),
        ("GET", "/admin/sessions/cksess_abc"),
        ("GET", "/admin/revocations"),
    ],
)
async def test_admin_refuses_a_missing_or_wrong_token(
    gateway: Gateway, http: aiohttp.ClientSession, authorization: str | None, method: str, path: str
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with http.request(
        method, f"{gateway.admin_url}{path}", json={"session_id": "cksess_abc"}, headers=headers
    ) as response:
        status, body = response.status, await response.json()

    assert status == 401
    assert body == {
        "error": {
            "message": "A valid admin token is required.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_admin_token",
        }
    }


@pytest.mark.parametrize("by", ["session_id", "client_secret"])
async def test_admin_revoke_is_enforced_by_the_gateway(
    gateway: Gateway, http: aiohttp.ClientSession, by: str
) -> None:
    session = await create_session(http, gateway)
    assert await converse(http, gateway, session.secret) == (200, None)
    target = session.id if by == "session_id" else session.secret

    status, body = await admin(http, gateway, "POST", "/admin/revoke", json={by: target})

    assert status == 200
    assert body == {
        "revoked": True,
        "stored": True,
        "session_id": session.id,
        "secret_hash_prefix": prefix(session.secret),
        "already_revoked": False,
        "session_known": True,
    }
    assert await converse(http, gateway, session.secret) == (401, "client_secret_revoked")


async def test_admin_session_lookup_shows_status_quota_expiry_and_user(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    session = await create_session(http, gateway, limit=7)
    for _ in range(3):
        assert await converse(http, gateway, session.secret) == (200, None)

    status, active = await admin(http, gateway, "GET", f"/admin/sessions/{session.id}")
    assert status == 200
    assert active == {
        "session_id": session.id,
        "status": "active",
        "user": session.user,
        "limit": 7,
        "remaining": 4,  # 7 per minute, 3 used in this window
        "expires_at": session.expires_at,
        "secret_hash_prefix": prefix(session.secret),
        "app": None,  # learned from the hosted API: no issuer app created it
    }

    status, _ = await admin(http, gateway, "POST", "/admin/revoke", json={"session_id": session.id})
    assert status == 200
    status, revoked = await admin(http, gateway, "GET", f"/admin/sessions/{session.id}")
    assert status == 200
    assert revoked == {**active, "status": "revoked"}


async def test_admin_session_lookup_of_an_unknown_id_is_404(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    status, body = await admin(http, gateway, "GET", "/admin/sessions/cksess_never_seen")

    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_admin_audit_log_shows_revocations_without_secrets(
    gateway: Gateway, module_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    first, second = [await create_session(http, gateway) for _ in range(2)]
    status, _ = await admin(
        http, gateway, "POST", "/admin/revoke", json={"client_secret": first.secret}
    )
    assert status == 200
    done = await cli(
        "revoke", "--session-id", second.id, env={"GATEWAY_REDIS_URL": module_redis.url}
    )
    assert done.returncode == 0, done.stderr

    status, body = await admin(http, gateway, "GET", "/admin/revocations?tail=2")

    assert status == 200
    entries = [
        (e["reason"], e["session_id"], e["secret_hash_prefix"], e["replica"]) for e in body["data"]
    ]
    assert entries[0] == ("admin", first.id, prefix(first.secret), REPLICA)
    assert entries[1][:3] == ("cli", second.id, prefix(second.secret))
    assert entries[1][3].startswith("cli@")
    assert all(abs(e["at"] - time.time()) < 60 for e in body["data"])
    text = str(body)
    assert first.secret not in text
    assert second.secret not in text


async def test_admin_listener_is_absent_without_a_token(fake: FakeUpstream) -> None:
    admin_port = free_port()
    # Embedded store: what matters here is only whether the port is bound.
    async with GatewayProcess(fake.url, env={"GATEWAY_ADMIN_PORT": str(admin_port)}) as process:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", admin_port)
        assert "Admin API listening" not in process.output()


async def test_admin_answers_503_bodies_while_redis_is_down_and_keeps_revocations_pending(
    gateway: Gateway, module_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    session = await create_session(http, gateway)
    await asyncio.to_thread(module_redis.stop)
    try:
        for path in (f"/admin/sessions/{session.id}", "/admin/revocations?tail=5"):
            status, body = await admin(http, gateway, "GET", path)
            assert (status, body["error"]["code"]) == (503, "store_unavailable"), path
            assert body["error"]["type"] == "api_error"
            assert set(body["error"]) == {"message", "type", "param", "code"}

        # A revocation the store cannot take is accepted, enforced here at once,
        # and kept until Redis is back.
        status, body = await admin(
            http, gateway, "POST", "/admin/revoke", json={"client_secret": session.secret}
        )
        assert status == 202
        assert body == {
            "revoked": True,
            "stored": False,
            "pending": True,
            "secret_hash_prefix": prefix(session.secret),
        }
        assert await converse(http, gateway, session.secret) == (401, "client_secret_revoked")
    finally:
        await asyncio.to_thread(module_redis.start)

    async def stored() -> bool:
        async with http.get(f"{gateway.url}/readyz") as response:
            return response.status == 200 and (await response.json())["pending_revocations"] == 0

    await eventually(stored, timeout=30, what="the pending revocation stored once Redis is back")
    status, body = await admin(http, gateway, "GET", "/admin/revocations?tail=1")
    assert status == 200
    assert [(e["reason"], e["secret_hash_prefix"]) for e in body["data"]] == [
        ("admin", prefix(session.secret))
    ]
