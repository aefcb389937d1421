"""Session create and cancel answers the gateway must read, however they come.

The official SDKs send ``Accept-Encoding: gzip`` and the real API honours it.
A gateway that parsed only plain JSON would learn no session at all and
reject every client secret, so these tests run the fake upstream compressing
like the real one, and compressing even when asked not to.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import pytest
import pytest_asyncio

from gateway.registry import decoded_body
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, openai_sdk

API_KEY = {"Authorization": "Bearer sk-test"}
SESSION = {"user": "u1", "workflow": {"id": "wf_1"}}
LIMIT = 1 << 20


# -- decoding, table-driven -----------------------------------------------------------

PAYLOAD = b'{"id": "cksess_1", "client_secret": "ek_x"}'
# mtime=0: the same bytes whatever second the module is collected in, so the
# test ids built from them are the same in every pytest-xdist worker.
GZIPPED = gzip.compress(PAYLOAD, mtime=0)


@pytest.mark.parametrize(
    ("encoding", "body", "expected"),
    [
        (None, PAYLOAD, PAYLOAD),  # no header: as is
        ("identity", PAYLOAD, PAYLOAD),
        ("gzip", GZIPPED, PAYLOAD),
        ("GZip ", GZIPPED, PAYLOAD),  # tokens are case-insensitive
        ("x-gzip", GZIPPED, PAYLOAD),
        ("deflate", zlib.compress(PAYLOAD), PAYLOAD),  # zlib-wrapped, as RFC 9110 says
        ("deflate", zlib.compress(PAYLOAD)[2:-4], PAYLOAD),  # raw deflate, as some send
        ("br", b"\x1b\x00", None),  # an encoding the gateway does not read
        ("gzip", b"not gzip at all", None),  # corrupt
        ("gzip, br", GZIPPED, None),  # stacked encodings are not read
    ],
)
def test_control_bodies_are_decoded_for_parsing(
    encoding: str | None, body: bytes, expected: bytes | None
) -> None:
    assert decoded_body(body, encoding, limit=LIMIT) == expected


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"{" + b" " * (64 * LIMIT) + b"}")
    assert len(bomb) < LIMIT // 8
    assert decoded_body(bomb, "gzip", limit=LIMIT) is None


# -- end to end -------------------------------------------------------------------------


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: the test sees the bytes the gateway passed on.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def _client_status(http: aiohttp.ClientSession, gateway: GatewayProcess, secret: str) -> int:
    async with http.post(
        f"{gateway.url}/v1/chatkit/conversation",
        headers={"Authorization": f"Bearer {secret}"},
        json={},
    ) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("compress", ["accepted", "always"])
async def test_sdk_session_create_is_learned_whatever_the_encoding(
    upstream: FakeUpstream, compress: Literal["accepted", "always"]
) -> None:
    upstream.compress = compress
    async with (
        GatewayProcess(upstream.url) as gateway,
        openai_sdk(gateway, "sk-test") as sdk,
        aiohttp.ClientSession() as http,
    ):
        session = await sdk.beta.chatkit.sessions.create(**SESSION)  # type: ignore[arg-type]
        assert session.client_secret
        # The gateway asked for identity on the create route; the SDK itself
        # asked for gzip, which the gateway does not pass on there.
        seen = upstream.requests[-1]
        assert seen.header("accept-encoding") == "identity"
        assert await _client_status(http, gateway, session.client_secret) == 200
        await sdk.beta.chatkit.sessions.cancel(session.id)
        assert await _client_status(http, gateway, session.client_secret) == 401


async def test_a_compressed_answer_reaches_the_caller_byte_for_byte(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.compress = "always"
    async with GatewayProcess(upstream.url) as gateway:
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions", headers=API_KEY, json=SESSION
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            raw = await response.read()
        session = json.loads(gzip.decompress(raw))
        assert await _client_status(http, gateway, session["client_secret"]) == 200


@pytest.mark.parametrize(
    "chunked",
    [
        False,  # Content-Length says it is too large before a byte is read
        True,  # only counting the chunks as they arrive shows it
    ],
)
async def test_an_oversized_cancel_answer_still_revokes(
    upstream: FakeUpstream, http: aiohttp.ClientSession, chunked: bool
) -> None:
    async with GatewayProcess(upstream.url) as gateway:
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions", headers=API_KEY, json=SESSION
        ) as response:
            session = await response.json()
        # A 2xx cancel whose answer is too large to read (2 MB) is still a
        # success: the secret is revoked through the registry, and the caller
        # gets every byte.
        upstream.inject(
            "status",
            path_prefix="/v1/chatkit/sessions/",
            status=200,
            message="x" * (2 << 20),
            chunked=chunked,
        )
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions/{session['id']}/cancel", headers=API_KEY
        ) as response:
            assert response.status == 200
            assert ("Content-Length" in response.headers) is not chunked
            assert response.headers["x-chatkit-gateway-revocation"] == "stored"
            answer = await response.read()
        assert json.loads(answer)["error"]["message"] == "x" * (2 << 20)  # every byte
        assert await _client_status(http, gateway, session["client_secret"]) == 401
