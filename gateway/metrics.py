"""Prometheus metrics. Labels are fixed vocabularies: never a secret, a session
id or a user, so cardinality stays bounded and nothing sensitive is exported."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.ratelimit import Outcome


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chatkit_gateway_requests_total",
            "Requests handled, by route kind and response status class.",
            ["kind", "status"],
            registry=r,
        )
        self.decisions = Counter(
            "chatkit_gateway_admission_decisions_total",
            "Admission decisions for client-secret traffic.",
            ["outcome"],
            registry=r,
        )
        self.would_reject = Counter(
            "chatkit_gateway_report_only_would_reject_total",
            "Requests admitted only because GATEWAY_ENFORCE=false.",
            ["outcome"],
            registry=r,
        )
        self.store_errors = Counter(
            "chatkit_gateway_store_errors_total",
            "Store operations that failed (the request was refused with 503).",
            registry=r,
        )
        self.upstream_errors = Counter(
            "chatkit_gateway_upstream_errors_total",
            "Upstream failures, by kind.",
            ["kind"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "chatkit_gateway_client_disconnects_total",
            "Requests whose client went away before the response was complete.",
            registry=r,
        )
        self.sessions_registered = Counter(
            "chatkit_gateway_sessions_registered_total",
            "Sessions learned from session-create responses.",
            registry=r,
        )
        self.sessions_issued = Counter(
            "chatkit_gateway_sessions_issued_total",
            "Sessions the gateway issued itself (issuer mode).",
            registry=r,
        )
        self.sessions_unparsed = Counter(
            "chatkit_gateway_session_create_unparsed_total",
            "Successful session-create responses the gateway could not learn from.",
            ["reason"],
            registry=r,
        )
        self.revocations = Counter(
            "chatkit_gateway_revocations_total",
            "Revocations performed, by source and whether the session was known.",
            ["source", "known"],
            registry=r,
        )
        self.revocations_pending = Gauge(
            "chatkit_gateway_revocations_pending",
            "Revocations enforced locally that the store has not accepted yet.",
            registry=r,
        )
        self.store_full = Gauge(
            "chatkit_gateway_store_full",
            "1 while Redis refuses writes for lack of memory (maxmemory reached): "
            "sessions are not registered and admissions are refused.",
            registry=r,
        )
        self.revocation_listener_restarts = Counter(
            "chatkit_gateway_revocation_listener_restarts_total",
            "Restarts of the listener that closes streams revoked on other replicas.",
            registry=r,
        )
        self.revocation_listener_up = Gauge(
            "chatkit_gateway_revocation_listener_up",
            "1 while the revocation listener runs, 0 while it waits to restart.",
            registry=r,
        )
        self.streams_closed = Counter(
            "chatkit_gateway_streams_closed_on_revocation_total",
            "Responses in flight cut off because their secret was revoked.",
            registry=r,
        )
        self.decision_seconds = Histogram(
            "chatkit_gateway_admission_seconds",
            "Time to decide an admission (store round trip included).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        # Children bound once: .labels() is a dict lookup plus a lock per call.
        self.decision_by_outcome = {o: self.decisions.labels(o.name.lower()) for o in Outcome}
        self.would_reject_by_outcome = {
            o: self.would_reject.labels(o.name.lower()) for o in Outcome
        }
        self._request_children: dict[tuple[str, int], Any] = {}

    def count_request(self, kind: str, status: int) -> None:
        """Count one request; the labelled child is looked up once per pair."""
        child = self._request_children.get((kind, status))
        if child is None:
            child = self._request_children[(kind, status)] = self.requests.labels(kind, str(status))
        child.inc()
