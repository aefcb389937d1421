"""Every metric the dashboard and the alerts use exists on a running gateway.

A renamed metric would leave a panel empty and an alert silent, and neither
complains. The names are read from deploy/grafana/chatkit-gateway.json and
the PrometheusRule; a gateway with Redis serves a little traffic of each
kind (a session, an admitted request, a rejection, an upstream failure) and
its /metrics must have a sample of every one.
"""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import REPO_ROOT, GatewayProcess, RedisServer, create_session, scrape

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "chatkit-gateway.json"
RULES = REPO_ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
METRIC = re.compile(r"\b((?:chatkit_gateway|process)_[a-z0-9_]+)\b")
API_KEY = "sk-test-metrics"


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def alert_metrics() -> set[str]:
    # The rule file is YAML; the expressions are the only place these names occur.
    return set(METRIC.findall(RULES.read_text()))


def test_the_dashboard_and_alerts_name_the_metrics_on_call_needs() -> None:
    # The names the issue asks for, so an edit cannot quietly drop one.
    assert {
        "chatkit_gateway_requests_total",
        "chatkit_gateway_request_duration_seconds_bucket",
        "chatkit_gateway_upstream_headers_seconds_bucket",
        "chatkit_gateway_requests_in_flight",
        "chatkit_gateway_open_streams",
        "chatkit_gateway_upstream_errors_total",
        "chatkit_gateway_store_errors_total",
        "chatkit_gateway_store_up",
        "chatkit_gateway_revocations_pending",
        "chatkit_gateway_revocation_listener_up",
        "chatkit_gateway_admission_decisions_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    } <= dashboard_metrics()
    assert {
        "chatkit_gateway_store_up",
        "chatkit_gateway_revocations_pending",
        "chatkit_gateway_upstream_errors_total",
        "chatkit_gateway_requests_total",
        "chatkit_gateway_upstream_headers_seconds_bucket",
        "chatkit_gateway_request_duration_seconds_bucket",
    } <= alert_metrics()


@pytest.mark.asyncio(loop_scope="module")
async def test_every_metric_in_the_dashboard_and_alerts_is_served(
    module_redis: RedisServer, fake: FakeUpstream
) -> None:
    async with (
        GatewayProcess(fake.url, redis_url=module_redis.url) as gateway,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        session = await create_session(http, gateway.url, api_key=API_KEY)
        secret = session["client_secret"]
        client = {"Authorization": f"Bearer {secret}"}
        async with http.post(f"{gateway.url}/v1/chatkit/threads", json={}, headers=client) as resp:
            await resp.read()  # admitted
        unknown = {"Authorization": "Bearer ek_unknown_metrics_secret"}
        async with http.post(f"{gateway.url}/v1/chatkit/threads", json={}, headers=unknown) as resp:
            assert resp.status == 401
        fake.inject("reset", path_prefix="/v1/chatkit/sessions")
        async with http.post(
            f"{gateway.url}/v1/chatkit/sessions",
            json={"workflow": {"id": "wf_metrics"}, "user": "user-metrics"},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp:
            assert resp.status == 502
        served = {name for name, _ in await scrape(http, gateway.url)}
    missing = (dashboard_metrics() | alert_metrics()) - served
    assert not missing, f"named in deploy/ but not served: {sorted(missing)}"
