"""What a Prometheus scrape of a running gateway shows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.ratelimit import Outcome
from gateway.settings import load_settings
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, eventually, free_port, metric_value, scrape

API_KEY = {"Authorization": "Bearer sk-test"}
CLIENT = {"Authorization": "Bearer ek_metrics_test"}
ALLOW = {"GATEWAY_UNKNOWN_SECRETS": "allow"}


async def test_requests_are_timed_by_kind_and_status_class_without_created_series(
    upstream: FakeUpstream,
) -> None:
    async with GatewayProcess(upstream.url, env=ALLOW) as gateway, aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/v1/chatkit/threads", headers=API_KEY) as response:
            assert response.status == 200
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation", headers=CLIENT, json={}
        ) as response:
            assert response.status == 200
        async with http.get(f"{gateway.url}/nowhere") as response:
            assert response.status == 404
        samples = await scrape(http, gateway.url)
    count = "chatkit_gateway_request_duration_seconds_count"
    assert metric_value(samples, count, kind="server", status_class="2xx") == 1
    assert metric_value(samples, count, kind="client", status_class="2xx") == 1
    assert metric_value(samples, count, kind="rejected", status_class="4xx") == 1
    headers = "chatkit_gateway_upstream_headers_seconds_count"
    assert metric_value(samples, headers, kind="server") == 1
    assert metric_value(samples, headers, kind="client") == 1
    assert metric_value(samples, "chatkit_gateway_requests_in_flight") == 0
    assert metric_value(samples, "chatkit_gateway_open_streams") == 0
    assert metric_value(samples, "chatkit_gateway_store_up") == 1
    for kind in ("unavailable", "timeout", "mid_stream"):  # present before the first failure
        assert metric_value(samples, "chatkit_gateway_upstream_errors_total", kind=kind) == 0
    assert (metric_value(samples, "process_cpu_seconds_total") or 0) > 0
    assert (metric_value(samples, "process_resident_memory_bytes") or 0) > 1_000_000
    assert (metric_value(samples, "process_open_fds") or 0) > 3
    assert not [name for name, _ in samples if name.endswith("_created")]


async def test_connect_failures_and_timeouts_count_as_upstream_errors(
    upstream: FakeUpstream,
) -> None:
    env = {
        # A second upstream nothing listens on: connecting fails at once.
        "GATEWAY_UPSTREAMS": json.dumps({"dead": f"http://127.0.0.1:{free_port()}"}),
        "GATEWAY_ROUTES": json.dumps(
            [{"pattern": "/dead/**", "methods": ["GET"], "kind": "server", "upstream": "dead"}]
        ),
        "GATEWAY_UPSTREAM_READ_TIMEOUT": "0.3",
    }
    async with GatewayProcess(upstream.url, env=env) as gateway, aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/dead/x") as response:
            assert response.status == 502
        upstream.inject("stall", path_prefix="/v1/chatkit/threads")
        async with http.get(f"{gateway.url}/v1/chatkit/threads", headers=API_KEY) as response:
            assert response.status == 504
        samples = await scrape(http, gateway.url)
    errors = "chatkit_gateway_upstream_errors_total"
    assert metric_value(samples, errors, kind="unavailable") == 1
    assert metric_value(samples, errors, kind="timeout") == 1
    count = "chatkit_gateway_request_duration_seconds_count"
    assert metric_value(samples, count, kind="server", status_class="5xx") == 2


async def test_a_live_event_stream_is_in_flight_and_open_until_it_ends(
    upstream: FakeUpstream,
) -> None:
    async with GatewayProcess(upstream.url, env=ALLOW) as gateway, aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation?events=3&interval=0.5",
            headers={**CLIENT, "Accept": "text/event-stream"},
            json={},
        ) as response:
            assert response.status == 200
            await response.content.readuntil(b"\n\n")  # the first event: the stream is open
            during = await scrape(http, gateway.url)
            await response.read()
        after = await scrape(http, gateway.url)
    assert metric_value(during, "chatkit_gateway_open_streams") == 1
    assert metric_value(during, "chatkit_gateway_requests_in_flight") == 1
    assert metric_value(after, "chatkit_gateway_open_streams") == 0
    assert metric_value(after, "chatkit_gateway_requests_in_flight") == 0


async def test_metrics_port_serves_metrics_and_the_client_port_stops(
    upstream: FakeUpstream,
) -> None:
    port = free_port()
    env = {"GATEWAY_METRICS_PORT": str(port)}
    async with GatewayProcess(upstream.url, env=env) as gateway, aiohttp.ClientSession() as http:
        samples = await scrape(http, f"http://127.0.0.1:{port}")
        async with http.get(f"{gateway.url}/metrics") as response:
            assert response.status == 404
    assert metric_value(samples, "chatkit_gateway_store_up") == 1
    assert upstream.requests == []


def listing(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def per_worker_requests(directory: Path) -> dict[str, float]:
    """Each worker's own count of served requests, read from its own file."""
    counts = {}
    for path in directory.glob("histogram_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
        counts[path.stem] = sum(
            s.value
            for family in merged
            for s in family.samples
            if s.name == "chatkit_gateway_request_duration_seconds_count"
        )
    return counts


async def test_with_two_workers_every_scrape_sees_the_sum(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = {"GATEWAY_WORKERS": "2", "TMPDIR": str(tmp_path)}
    count = "chatkit_gateway_request_duration_seconds_count"
    upstream.inject("delay", path_prefix="/v1/chatkit/threads", times=None, seconds=0.05)
    sent = 0
    async with GatewayProcess(upstream.url, env=env) as gateway, aiohttp.ClientSession() as http:

        async def one() -> None:
            url = f"{gateway.url}/v1/chatkit/threads"
            async with http.get(url, headers={**API_KEY, "Connection": "close"}) as response:
                assert response.status == 200

        (directory,) = listing(tmp_path)

        async def both_workers_served() -> bool:
            # /healthz answered for one worker; the other may still be starting.
            nonlocal sent
            await asyncio.gather(*(one() for _ in range(20)))
            sent += 20
            served = per_worker_requests(directory)
            return len(served) == 2 and all(n > 0 for n in served.values())

        await eventually(
            both_workers_served, timeout=10, interval=0.05, what="both workers to serve requests"
        )
        seen = [
            metric_value(await scrape(http, gateway.url), count, kind="server", status_class="2xx")
            for _ in range(8)
        ]
    # Whichever worker answers the scrape, it shows the total.
    assert seen == [sent] * 8
    # The serve command removes the directory it made.
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"GATEWAY_METRICS_PORT": "8080"}, "GATEWAY_METRICS_PORT"),  # the client port
        (  # the admin port, when the admin API is on
            {"GATEWAY_METRICS_PORT": "8081", "GATEWAY_ADMIN_TOKEN": "a" * 16},
            "GATEWAY_METRICS_PORT",
        ),
        ({"GATEWAY_LOG_FORMAT": "xml"}, "GATEWAY_LOG_FORMAT"),
        ({"GATEWAY_STORE_CHECK_INTERVAL_SECONDS": "0"}, "GATEWAY_STORE_CHECK_INTERVAL_SECONDS"),
    ],
)
def test_observability_settings_that_cannot_work_stop_start_up(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ)


@pytest.mark.parametrize(
    ("workflow", "app", "labels"),
    [
        ("wf_a", "support", ("wf_a", "support")),  # both configured: named
        ("wf_a", "default", ("wf_a", "default")),  # GATEWAY_ISSUER_API_KEYS's app
        ("wf_a", "retired", ("wf_a", "other")),  # an app this replica does not know
        ("wf_client_chose", "", ("other", "other")),  # a learned session
    ],
)
def test_admissions_are_labelled_only_with_configured_workflows_and_apps(
    workflow: str, app: str, labels: tuple[str, str]
) -> None:
    metrics = Metrics()
    metrics.workflows = frozenset({"wf_a"})
    metrics.apps = frozenset({"support", "default"})
    metrics.count_decision(Outcome.ADMITTED, workflow, "turn", app)
    metrics.count_decision(Outcome.ADMITTED, workflow, "turn", app)  # the cached child
    samples = {
        (sample.labels["workflow"], sample.labels["app"]): sample.value
        for family in metrics.registry.collect()
        if family.name == "chatkit_gateway_admission_decisions"
        for sample in family.samples
        if sample.labels["class"] == "turn"
    }
    assert samples == {labels: 2.0}
