"""What one proxied request leaves behind: metrics, an access-log line, spans.

The proxy makes one :class:`RequestTelemetry` per request and calls it at
four points (upstream request sent, upstream headers in, admission, end), so
the forwarding code stays about forwarding. Per request this costs a clock
read at each end, a few integer additions and two histogram observations;
with tracing off each span hook is one ``is None`` test.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from gateway import logs
from gateway.errors import GatewayError, UpstreamError
from gateway.metrics import Metrics
from gateway.tracing import Tracing
from gateway.types import Scope

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.head import RequestHead

T = TypeVar("T")


class Telemetry:
    """Per-process: what every request reports to."""

    def __init__(self, metrics: Metrics, *, tracing: Tracing | None, access_log: bool) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.access_log = access_log

    def begin(self, scope: Scope, request_id: bytes, head: RequestHead) -> RequestTelemetry:
        return RequestTelemetry(self, scope, request_id, head)


class RequestTelemetry:
    """One request: call :meth:`finish` exactly once, whatever happened."""

    __slots__ = (
        "_admitting",
        "_owner",
        "_scope",
        "_sent_at",
        "_span",
        "_stream",
        "_upstream_span",
        "app",
        "bytes_in",
        "bytes_out",
        "cls",
        "outcome",
        "started",
        "upstream_request_id",
        "upstream_seconds",
        "workflow",
    )

    def __init__(
        self, owner: Telemetry, scope: Scope, request_id: bytes, head: RequestHead
    ) -> None:
        self._owner = owner
        self._scope = scope
        self.started = owner.metrics.request_started()
        logs.REQUEST_ID.set(request_id.decode("latin-1"))
        self.bytes_in = 0
        self.bytes_out = 0
        #: A ChatKit request's class and its session's workflow, once known.
        self.cls = ""
        self.workflow = ""
        #: The error code the gateway answered with, if it did.
        self.outcome: str | None = None
        #: The issuer app a session call came from, if it was one.
        self.app: str | None = None
        self._admitting = False
        self.upstream_request_id: str | None = None
        self.upstream_seconds: float | None = None
        self._sent_at = 0.0
        self._stream = False
        self._span: Span | None = None
        self._upstream_span: Span | None = None
        if owner.tracing is not None:
            self._span = owner.tracing.request(head.method, "rejected", head)

    def admission(self, check: Awaitable[T]) -> Awaitable[T]:
        """The admission decision, in a span of its own when tracing (else as is)."""
        self._admitting = True
        tracing = self._owner.tracing
        if tracing is None or self._span is None:
            return check
        return self._traced_admission(check, tracing, self._span)

    @staticmethod
    async def _traced_admission(check: Awaitable[T], tracing: Tracing, parent: Span) -> T:
        span = tracing.child(parent, "admission")
        try:
            result = await check
        except GatewayError as exc:
            span.set_attribute("chatkit_gateway.outcome", str(exc.code))
            tracing.finish(span, exc.status)
            raise
        span.set_attribute("chatkit_gateway.outcome", "admitted")
        tracing.finish(span, 0)
        return result

    def sending(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The request goes upstream now; returns its headers (with this
        exchange's traceparent when tracing)."""
        self._sent_at = time.perf_counter()
        tracing = self._owner.tracing
        if tracing is None or self._span is None:
            return headers
        self._upstream_span = tracing.child(self._span, "upstream", client=True)
        return tracing.propagate(self._upstream_span, headers)

    def answered(self, kind: str, response: aiohttp.ClientResponse) -> None:
        """The upstream's response headers arrived."""
        self.upstream_seconds = time.perf_counter() - self._sent_at
        metrics = self._owner.metrics
        metrics.upstream_answered(kind, self.upstream_seconds)
        headers = response.headers
        upstream_id = headers.get("x-request-id")
        if upstream_id is not None:
            self.upstream_request_id = upstream_id
            logs.UPSTREAM_REQUEST_ID.set(upstream_id)
        if headers.get("content-type", "").startswith("text/event-stream"):
            self._stream = True
            metrics.open_streams.inc()
        if self._upstream_span is not None:
            self._upstream_span.set_attribute("http.response.status_code", response.status)

    def failed(self, error: GatewayError, *, started: bool) -> None:
        """The gateway answered with ``error`` (or, once ``started``, cut the
        response off because of it)."""
        self.outcome = error.code or type(error).__name__
        if error.app is not None:
            self.app = error.app
        if isinstance(error, UpstreamError):
            self._owner.metrics.upstream_failed(None if started else error)

    def finish(self, kind: str, status: int, aborted: str | None) -> None:
        owner = self._owner
        metrics = owner.metrics
        seconds = metrics.request_finished(kind, status, self.started)
        if self._stream:
            metrics.open_streams.dec()
        tracing = owner.tracing
        if tracing is not None and self._span is not None:
            error = f"aborted: {aborted}" if aborted else None
            if self._upstream_span is not None:
                tracing.finish(self._upstream_span, 0, error=error)
            self._span.update_name(f"{self._scope['method']} {kind}")
            self._span.set_attribute("chatkit_gateway.route_kind", kind)
            tracing.finish(self._span, status, error=error)
        if owner.access_log:
            if self.upstream_request_id is not None:
                # A session call hears the upstream in a task of its own, whose
                # context variables do not flow back here.
                logs.UPSTREAM_REQUEST_ID.set(self.upstream_request_id)
            logs.log_access(self._access_fields(kind, status, aborted, seconds))

    def _access_fields(
        self, kind: str, status: int, aborted: str | None, seconds: float
    ) -> dict[str, Any]:
        scope = self._scope
        client = scope.get("client")
        return {
            "method": scope["method"],
            # The path without its query: a query string may carry anything.
            "path": scope["path"],
            "status": status,
            "kind": kind,
            "app": self.app,
            "outcome": self.outcome or ("admitted" if self._admitting else "-"),
            "client": f"{client[0]}:{client[1]}" if client else "-",
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(seconds * 1000, 1),
            "upstream_ms": None
            if self.upstream_seconds is None
            else round(self.upstream_seconds * 1000, 1),
            "aborted": aborted,
            "workflow": self.workflow or None,
            "class": self.cls or None,
        }
