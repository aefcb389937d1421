"""Routes to other upstreams are configuration: a self-hosted ChatKit server
behind the same gateway, with the same client-secret admission."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, create_session

SELF_HOSTED = "/v1/chatkit/selfhosted"


def _toml(tmp_path: Path, upstream_url: str, route_upstream: str = "selfhosted") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[upstreams]
selfhosted = "{upstream_url}"

[[routes]]
pattern = "{SELF_HOSTED}"
methods = ["POST"]
kind = "client"
upstream = "{route_upstream}"
"""
    )
    return path


def test_routes_and_upstreams_load_from_the_toml_file(tmp_path: Path) -> None:
    settings = load_settings({"GATEWAY_CONFIG_FILE": str(_toml(tmp_path, "http://127.0.0.1:9/"))})
    assert settings.upstreams == {"selfhosted": "http://127.0.0.1:9"}
    (route,) = settings.routes
    assert (route.pattern, route.methods, route.kind) == (SELF_HOSTED, ("POST",), "client")


def test_routes_can_come_from_the_environment_as_json() -> None:
    settings = load_settings(
        {
            "GATEWAY_UPSTREAMS": '{"sh": "https://chatkit.internal"}',
            "GATEWAY_ROUTES": '[{"pattern": "/chatkit/**", "methods": ["POST"], '
            '"kind": "client", "upstream": "sh"}]',
        }
    )
    assert settings.routes[0].upstream == "sh"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        # A route naming an upstream nobody defined.
        ({"GATEWAY_ROUTES": '[{"pattern": "/x", "methods": ["GET"], "kind": "client", '
          '"upstream": "nowhere"}]'}, "nowhere"),
        # Patterns are plain segments, {params} and a final **.
        ({"GATEWAY_ROUTES": '[{"pattern": "x/y", "methods": ["GET"], "kind": "client"}]'},
         "must start with /"),
        ({"GATEWAY_ROUTES": '[{"pattern": "/a/**/b", "methods": ["GET"], "kind": "client"}]'},
         "bad segment"),
        ({"GATEWAY_ROUTES": '[{"pattern": "/a", "methods": ["TRACE"], "kind": "client"}]'},
         "methods"),
        ({"GATEWAY_ROUTES": '[{"pattern": "/a", "methods": ["GET"], "kind": "admin"}]'},
         "kind must be"),
        ({"GATEWAY_ROUTES": "not json"}, "GATEWAY_ROUTES: must be JSON"),
        ({"GATEWAY_UPSTREAMS": '{"sh": "ftp://x"}'}, "GATEWAY_UPSTREAMS"),
        ({"GATEWAY_UPSTREAMS": '{"default": "http://x"}'}, "default"),
    ],
)  # fmt: skip
def test_bad_route_configuration_stops_start_up(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)


async def test_a_configured_route_reaches_its_own_upstream_under_admission(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with (
        FakeUpstream() as self_hosted,
        GatewayProcess(
            upstream.url, env={"GATEWAY_CONFIG_FILE": str(_toml(tmp_path, self_hosted.url))}
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        secret = (await create_session(http, gateway.url, limit=2))["client_secret"]
        auth = {"Authorization": f"Bearer {secret}"}
        statuses = []
        for _ in range(3):
            async with http.post(f"{gateway.url}{SELF_HOSTED}", headers=auth, json={}) as r:
                statuses.append(r.status)
        # Admitted under the session's limit, and sent to the self-hosted server only.
        assert statuses == [200, 200, 429]
        assert self_hosted.count(SELF_HOSTED) == 2
        assert upstream.count(SELF_HOSTED) == 0
        seen = self_hosted.requests[-1]
        assert seen.header("host") == self_hosted.url.removeprefix("http://")
        # Unknown secrets are refused there too, without reaching it.
        async with http.post(
            f"{gateway.url}{SELF_HOSTED}", headers={"Authorization": "Bearer ek_nope"}, json={}
        ) as r:
            assert r.status == 401
        assert self_hosted.count(SELF_HOSTED) == 2


def test_the_example_configuration_loads_and_is_the_defaults() -> None:
    example = Path(__file__).parent.parent / "config" / "gateway.example.toml"
    assert load_settings({"GATEWAY_CONFIG_FILE": str(example)}) == load_settings({})
