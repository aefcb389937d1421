"""OpenTelemetry spans: the request, its admission and its upstream exchange,
in the caller's trace."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.app import GatewayApp
from gateway.errors import ConfigError
from gateway.settings import load_settings, otel_traces_exporter
from gateway.tracing import Tracing, configure
from tests.doubles import serving_in_process
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, eventually

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
CLIENT = {"Authorization": "Bearer ek_tracing", "traceparent": TRACEPARENT}


@contextlib.asynccontextmanager
async def serving(app: GatewayApp) -> AsyncIterator[str]:
    async with serving_in_process(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def app(upstream: FakeUpstream, exporter: InMemorySpanExporter) -> GatewayApp:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = load_settings(
        {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_UNKNOWN_SECRETS": "allow"}
    )
    return GatewayApp(settings, tracing=Tracing(provider))


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


async def test_a_request_is_a_server_span_in_the_callers_trace_with_its_two_steps(
    app: GatewayApp, upstream: FakeUpstream, exporter: InMemorySpanExporter
) -> None:
    async with serving(app) as url, aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chatkit/conversation", headers=CLIENT, json={}) as response:
            assert response.status == 200
            await response.read()
        spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST client", "admission", "upstream"}
    request, admission, exchange = spans["POST client"], spans["admission"], spans["upstream"]
    assert all(s.context is not None for s in spans.values())
    assert {f"{s.context.trace_id:032x}" for s in spans.values() if s.context} == {TRACE_ID}
    assert request.kind is SpanKind.SERVER
    assert request.parent is not None
    assert f"{request.parent.span_id:016x}" == CALLER_SPAN
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    for child, kind in ((admission, SpanKind.INTERNAL), (exchange, SpanKind.CLIENT)):
        assert child.kind is kind
        assert child.parent is not None
        assert request.context is not None
        assert child.parent.span_id == request.context.span_id
    assert admission.attributes is not None
    assert admission.attributes["chatkit_gateway.outcome"] == "admitted"
    # The upstream continues the trace from the gateway's upstream span.
    assert exchange.context is not None
    forwarded = upstream.requests[0].header("traceparent")
    assert forwarded == f"00-{TRACE_ID}-{exchange.context.span_id:016x}-01"


async def test_a_failed_upstream_marks_the_spans_failed(
    app: GatewayApp, upstream: FakeUpstream, exporter: InMemorySpanExporter
) -> None:
    upstream.inject("status", path_prefix="/v1/chatkit/conversation", status=503)
    async with serving(app) as url, aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chatkit/conversation", headers=CLIENT, json={}) as response:
            assert response.status == 503
        spans = by_name(exporter.get_finished_spans())
    assert spans["POST client"].status.status_code is StatusCode.ERROR
    assert spans["upstream"].attributes is not None
    assert spans["upstream"].attributes["http.response.status_code"] == 503


async def test_a_rejected_request_has_no_upstream_span(
    app: GatewayApp, exporter: InMemorySpanExporter
) -> None:
    async with serving(app) as url, aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chatkit/conversation", json={}) as response:
            assert response.status == 401  # no secret at all
        spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST client", "admission"}
    assert spans["admission"].attributes is not None
    assert spans["admission"].attributes["chatkit_gateway.outcome"] == "missing_client_secret"


@pytest.mark.parametrize(
    ("environ", "exporter_name"),
    [
        ({}, None),  # nothing asked: tracing stays off
        ({"OTEL_TRACES_EXPORTER": "none"}, None),  # the spec's explicit "off"
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": " Console "}, "console"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),  # SDK off wins
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_named(
    environ: dict[str, str], exporter_name: str | None
) -> None:
    assert otel_traces_exporter(environ) == exporter_name


def test_an_exporter_that_is_not_installed_stops_start_up_with_a_hint() -> None:
    assert configure(None) is None
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: no exporter named 'nope'"):
        configure("nope")


async def test_standard_otel_variables_turn_spans_on_in_the_served_gateway(
    upstream: FakeUpstream,
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "GATEWAY_UNKNOWN_SECRETS": "allow",
    }
    async with GatewayProcess(upstream.url, env=env) as gateway, aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/v1/chatkit/conversation", headers=CLIENT, json={}
        ) as response:
            assert response.status == 200
        await eventually(
            lambda: gateway.output().count(TRACE_ID) >= 3, timeout=10, what=gateway.output
        )
        output = gateway.output()
    assert '"service.name": "gateway-under-test"' in output
    assert json.dumps(f"0x{CALLER_SPAN}") in output  # the request span's parent
