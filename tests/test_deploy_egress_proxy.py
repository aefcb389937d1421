"""The egress proxy (GATEWAY_UPSTREAM_PROXY), through a real forward proxy.

Debian's tinyproxy runs on loopback with Basic authentication and logs every
request it relays; the gateway is a real subprocess. Plain-http upstreams are
sent to the proxy in absolute form, https ones through a CONNECT tunnel.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, eventually, free_port
from tests.processes import terminate, wait_until

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        shutil.which("tinyproxy") is None, reason="tinyproxy is not installed (scripts/install)"
    ),
]

API_KEY = {"Authorization": "Bearer sk-test-egress"}
PROXY_USER = "egress"
PROXY_PASSWORD = "proxy-pass-5f1e9c"  # must never appear in the gateway's output
SESSION_BODY = {"workflow": {"id": "wf_egress"}, "user": "user-egress"}


class TinyProxy:
    """tinyproxy in the foreground on a free loopback port, logging to a file."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.log = directory / "tinyproxy.log"
        self.config = directory / "tinyproxy.conf"
        self.config.write_text(
            f"Port {self.port}\n"
            "Listen 127.0.0.1\n"
            "Timeout 30\n"
            f'LogFile "{self.log}"\n'
            "LogLevel Info\n"
            "MaxClients 50\n"
            f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}\n"
            # Tunnels to any port, so an https upstream on a test port is
            # reached (tinyproxy allows 443 and 563 only by default).
            "ConnectPort 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, *, password: str = PROXY_PASSWORD) -> str:
        return f"http://{PROXY_USER}:{password}@127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> TinyProxy:
        self.proc = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited:\n{self.log_text()}")
            return "listening on" in self.log_text().lower()

        try:
            wait_until(listening, timeout=10, what=lambda: f"tinyproxy:\n{self.log_text()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=10)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path_factory.mktemp("tinyproxy")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def wait_for_log(proxy: TinyProxy, text: str) -> str:
    await eventually(lambda: text in proxy.log_text(), timeout=10, what=proxy.log_text)
    return proxy.log_text()


async def test_upstream_requests_go_through_the_proxy(
    proxy: TinyProxy, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.reset_records()
    env = {"GATEWAY_UPSTREAM_PROXY": proxy.url(), "GATEWAY_LOG_LEVEL": "debug"}
    async with GatewayProcess(fake.url, env=env) as gateway:
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions", json=SESSION_BODY, headers=API_KEY
        ) as resp:
            assert resp.status == 200, await resp.text()
        log = await wait_for_log(proxy, f"POST {fake.url}/v1/chatkit/sessions")
        output = gateway.output()
    # The proxy relayed it (tinyproxy marks what it forwards with a Via header)...
    assert [seen.path for seen in fake.requests] == ["/v1/chatkit/sessions"]
    headers = {name.lower(): value for name, value in fake.requests[0].headers}
    assert "tinyproxy" in headers.get("via", "")
    # ...after authenticating the gateway, whose credentials stop at the proxy.
    assert "proxy-authorization" not in headers
    assert "Unauthorized" not in log
    assert PROXY_PASSWORD not in output
    assert "'upstream_proxy': 'http://127.0.0.1:" in output  # shown without credentials


async def test_https_upstreams_are_tunnelled_with_connect(
    proxy: TinyProxy, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    # The tunnel reaches the fake, which speaks plain http, so the TLS
    # handshake inside it fails: a 502, but only after the proxy opened the
    # CONNECT tunnel the gateway asked for.
    port = int(fake.url.rsplit(":", 1)[1])
    env = {"GATEWAY_UPSTREAM_PROXY": proxy.url(), "GATEWAY_LOG_LEVEL": "debug"}
    async with GatewayProcess(f"https://127.0.0.1:{port}", env=env) as gateway:
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions", json=SESSION_BODY, headers=API_KEY
        ) as resp:
            assert resp.status == 502
            body = await resp.json()
        await wait_for_log(proxy, f"CONNECT 127.0.0.1:{port}")
        output = gateway.output()
    assert body["error"]["code"] == "upstream_unavailable"
    assert PROXY_PASSWORD not in output


@pytest.mark.parametrize(
    "password",
    [
        "wrong-password",  # the proxy refuses with 407
        None,  # nothing listens on the proxy's port
    ],
)
async def test_an_unusable_proxy_is_a_502_without_leaking_credentials(
    proxy: TinyProxy, http: aiohttp.ClientSession, password: str | None
) -> None:
    url = (
        proxy.url(password=password)
        if password
        else f"http://u:{PROXY_PASSWORD}@127.0.0.1:{free_port()}"
    )
    env = {"GATEWAY_UPSTREAM_PROXY": url, "GATEWAY_LOG_LEVEL": "debug"}
    async with GatewayProcess("https://127.0.0.1:9", env=env) as gateway:
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions", json=SESSION_BODY, headers=API_KEY
        ) as resp:
            assert resp.status == 502
            body = await resp.json()
        output = gateway.output()
    assert body["error"]["code"] == "upstream_unavailable"
    for secret in (PROXY_PASSWORD, "wrong-password"):
        assert secret not in output
        assert secret not in str(body)
