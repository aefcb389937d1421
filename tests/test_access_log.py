"""The optional access log: one line per proxied request, nothing secret in it."""

from __future__ import annotations

import aiohttp

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, eventually


async def test_access_log_has_one_line_per_request_without_query_or_secret(
    upstream: FakeUpstream,
) -> None:
    secret = "ek_access_log_secret_value"
    env = {"GATEWAY_ACCESS_LOG": "true", "GATEWAY_UNKNOWN_SECRETS": "allow"}
    async with GatewayProcess(upstream.url, env=env) as gateway, aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation?token=query-secret",
            headers={"Authorization": f"Bearer {secret}", "x-request-id": "rid-123"},
            json={},
        ) as response:
            assert response.status == 200
        async with http.get(f"{gateway.url}/v1/nowhere") as response:
            assert response.status == 404
        await eventually(lambda: "/v1/nowhere" in gateway.output(), what=gateway.output)
        lines = [line for line in gateway.output().splitlines() if "gateway.access" in line]
    assert len(lines) == 2, lines
    assert "POST /v1/chatkit/conversation 200 client" in lines[0]
    assert "rid=rid-123" in lines[0]
    assert "GET /v1/nowhere 404 rejected" in lines[1]
    for line in lines:
        assert secret not in line
        assert "query-secret" not in line
