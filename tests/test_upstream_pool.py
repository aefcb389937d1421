"""The upstream connection pool lets idle connections go before the upstream
would: a request sent on a connection the upstream is closing never reaches
it (a 502 for a POST, which is not retried)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.settings import load_settings
from gateway.upstream import create_session


async def _connections_for_two_requests(keepalive: str, pause: float) -> int:
    """How many connections two requests ``pause`` seconds apart arrive on."""
    peers: set[object] = set()

    async def answer(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    settings = load_settings({"GATEWAY_UPSTREAM_KEEPALIVE_TIMEOUT": keepalive})
    session = create_session(settings)
    try:
        for _ in range(2):
            async with session.post(f"http://127.0.0.1:{port}/", data=b"{}") as response:
                assert response.status == 200
                await response.read()
            await asyncio.sleep(pause)
    finally:
        await session.close()
        await runner.cleanup()
    return len(peers)


async def test_an_idle_upstream_connection_is_let_go_after_the_keepalive_timeout() -> None:
    assert await _connections_for_two_requests("0.2", 0.6) == 2


async def test_a_connection_used_again_within_the_timeout_is_reused() -> None:
    assert await _connections_for_two_requests("5", 0.1) == 1


def test_the_default_is_shorter_than_uvicorns_idle_timeout() -> None:
    # uvicorn closes idle keep-alive connections after 5 s by default.
    assert load_settings({}).upstream_keepalive_timeout < 5
