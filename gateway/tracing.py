"""Optional OpenTelemetry tracing: a span per request, with the admission
decision and the upstream exchange as its children, in the caller's trace.

On when the ``otel`` extra is installed (``pip install 'chatkit-gateway[otel]'``)
and the standard ``OTEL_TRACES_EXPORTER`` names an exporter; the SDK reads
every other ``OTEL_*`` variable itself (endpoint, sampler, batch sizes,
``OTEL_SERVICE_NAME``). Off, nothing here is imported and the proxy skips
each hook on one ``is None`` test.

The caller's W3C ``traceparent``/``tracestate`` make the request span's
parent; the upstream receives the upstream span's own ``traceparent``, so the
trace continues through the gateway as it would through any instrumented
proxy.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from gateway.head import RequestHead

logger = logging.getLogger(__name__)

_TRACE_NAMES = ("traceparent", "tracestate")
_EXPORTERS = "opentelemetry_traces_exporter"  # the SDK's entry-point group


class Tracing:
    """Starts the gateway's spans; built by :func:`configure`, or by tests with
    their own provider (an in-memory exporter)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._provider = provider
        self._tracer = provider.get_tracer("chatkit-gateway", __version__)
        self._propagator = TraceContextTextMapPropagator()

    def request(self, method: str, path_kind: str, head: RequestHead) -> Span:
        """The request's span (kind SERVER), a child of the caller's traceparent."""
        carrier = {}
        if head.traceparent is not None:
            carrier["traceparent"] = head.traceparent.decode("latin-1")
            if head.tracestate is not None:
                carrier["tracestate"] = head.tracestate.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        return self._tracer.start_span(
            f"{method} {path_kind}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "chatkit_gateway.route_kind": path_kind},
        )

    def child(self, parent: Span, name: str, *, client: bool = False) -> Span:
        kind = self._trace.SpanKind.CLIENT if client else self._trace.SpanKind.INTERNAL
        return self._tracer.start_span(
            name, context=self._trace.set_span_in_context(parent), kind=kind
        )

    def propagate(self, span: Span, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` for the upstream, with ``span`` as their trace parent."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        out = [(n, v) for n, v in headers if n not in _TRACE_NAMES]
        out.extend(carrier.items())
        return out

    def finish(self, span: Span, status: int, *, error: str | None = None) -> None:
        """End ``span``; 5xx (or an ``error``) marks it failed, as OpenTelemetry's
        HTTP conventions say for server spans."""
        if status:
            span.set_attribute("http.response.status_code", status)
        if error is not None or status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end()

    def shutdown(self) -> None:
        """Export what is buffered; called when the gateway stops."""
        self._provider.shutdown()


def configure(exporter: str | None) -> Tracing | None:
    """Tracing for ``OTEL_TRACES_EXPORTER`` (a comma-separated list), or None."""
    if exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning(
            "OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed; no spans are "
            "sent. Install it with: pip install 'chatkit-gateway[otel]'"
        )
        return None
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "chatkit-gateway"}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    installed = {e.name: e for e in entry_points(group=_EXPORTERS)}
    for name in (n.strip() for n in exporter.split(",")):
        if name not in installed:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: no exporter named {name!r} is installed (installed: "
                f"{', '.join(sorted(installed)) or 'none'}; e.g. pip install "
                "opentelemetry-exporter-otlp for 'otlp')"
            )
        provider.add_span_processor(BatchSpanProcessor(installed[name].load()()))
    return Tracing(provider)
