"""Prometheus metrics. Labels are fixed vocabularies: never a secret, a session
id, a user or a raw path, so cardinality stays bounded and nothing sensitive is
exported.

With several worker processes each worker counts into files in one directory
(prometheus_client's multiprocess mode) and any worker's scrape answers the sum
over all of them: otherwise each scrape would see whichever worker accepted it,
and Prometheus would read the jumps between workers as counter resets. The
serve command creates that directory (:func:`shared_across_workers`).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gateway.capacity import Shed
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.ratelimit import Outcome

#: prometheus_client reads this variable when it is imported: the serve command
#: sets it before the workers start, so every worker writes to the same place.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Whole requests: most answer in milliseconds, SSE streams last minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Time to the upstream's response headers (a model may think for a while).
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: The label values of chatkit_gateway_upstream_errors_total.
UPSTREAM_ERROR_KINDS = ("unavailable", "timeout", "mid_stream")


#: Label values of admissions without a configured workflow, app or a class.
OTHER_WORKFLOW = "other"
OTHER_APP = "other"
NO_CLASS = "none"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, workers: int = 1) -> None:
        # A counter's _created sample doubles the series for no use on a dashboard.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chatkit_gateway_requests_total",
            "Requests handled, by route kind and response status.",
            ["kind", "status"],
            registry=r,
        )
        self.model_tokens = Counter(
            "chatkit_gateway_model_tokens_total",
            "Tokens the model reported for calls through the model routes, by "
            "workflow, model and kind (input: uncached input; cached_input; "
            "output, reasoning included): the three add up to the total.",
            ["workflow", "model", "kind"],
            registry=r,
        )
        self.model_calls_unmetered = Counter(
            "chatkit_gateway_model_calls_unmetered_total",
            "Model calls answered 2xx whose answer ended without usage (a cut stream).",
            ["workflow"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "chatkit_gateway_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["kind", "status_class"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_headers_seconds = Histogram(
            "chatkit_gateway_upstream_headers_seconds",
            "Time from sending a request upstream to the upstream's response headers.",
            ["kind"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "chatkit_gateway_requests_in_flight",
            "Requests being handled now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.open_streams = Gauge(
            "chatkit_gateway_open_streams",
            "Server-sent event streams being relayed to clients now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_up = Gauge(
            "chatkit_gateway_store_up",
            "1 when the store answered its last check, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.decisions = Counter(
            "chatkit_gateway_admission_decisions_total",
            "Admission decisions for client-secret traffic, by outcome, the session's "
            "workflow (configured ids only, else other), the request's class "
            "(turn, read, write, upload, transcribe; none when unclassed) and the "
            "issuer app that created the session (configured names only, else other).",
            ["outcome", "workflow", "class", "app"],
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
            "Upstream failures: unavailable (502, connect failures included), "
            "timeout (504), mid_stream (the response was cut off).",
            ["kind"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "chatkit_gateway_client_disconnects_total",
            "Requests whose client went away before the response was complete.",
            registry=r,
        )
        self.auth_failures = Counter(
            "chatkit_gateway_auth_failures_total",
            "Requests refused for a missing or wrong issuer API key or admin token.",
            ["credential"],
            registry=r,
        )
        self.sessions_registered = Counter(
            "chatkit_gateway_sessions_registered_total",
            "Sessions learned from session-create responses.",
            registry=r,
        )
        # ``app`` is a configured app's name (GATEWAY_ISSUER_KEYS, or
        # "default"): never a value a client chooses.
        self.sessions_issued = Counter(
            "chatkit_gateway_sessions_issued_total",
            "Sessions the gateway issued itself (issuer mode), by app.",
            ["app"],
            registry=r,
        )
        self.session_creates_refused = Counter(
            "chatkit_gateway_session_creates_refused_total",
            "Issuer session creates refused by an app's scope or limits, or a user's ban.",
            ["app", "reason"],
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
            multiprocess_mode="livesum",
        )
        self.store_full = Gauge(
            "chatkit_gateway_store_full",
            "1 while Redis refuses writes for lack of memory (maxmemory reached): "
            "sessions are not registered and admissions are refused.",
            registry=r,
            multiprocess_mode="livemax",
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
            multiprocess_mode="livemin",
        )
        self.streams_closed = Counter(
            "chatkit_gateway_streams_closed_on_revocation_total",
            "Responses in flight cut off because their secret was revoked.",
            registry=r,
        )
        self.connections_shed = Counter(
            "chatkit_gateway_connections_shed_total",
            "Client connections closed at the connection cap to make room for a new one: "
            "no_head (request head not complete), idle (keep-alive), no_room (the new "
            "connection itself, every other one being in a request).",
            ["reason"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "chatkit_gateway_admission_seconds",
            "Time to decide an admission (store round trip included).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        # Children bound once: .labels() is a dict lookup plus a lock per call.
        self.decision_by_outcome = {
            o: self.decisions.labels(o.name.lower(), OTHER_WORKFLOW, NO_CLASS, OTHER_APP)
            for o in Outcome
        }
        self._decision_children: dict[tuple[Outcome, str, str, str], Any] = {}
        self.would_reject_by_outcome = {
            o: self.would_reject.labels(o.name.lower()) for o in Outcome
        }
        # Alerts divide by these: they must exist (at 0) before the first failure.
        self.upstream_errors_by_kind = {
            k: self.upstream_errors.labels(k) for k in UPSTREAM_ERROR_KINDS
        }
        self.shed_by_reason = {s.value: self.connections_shed.labels(s.value) for s in Shed}
        self._request_children: dict[tuple[str, int], Any] = {}
        self.workflows: frozenset[str] = frozenset()
        #: The configured issuer apps' names: the only ``app`` label values.
        self.apps: frozenset[str] = frozenset()
        self._duration_children: dict[tuple[str, int], Any] = {}
        self._headers_children: dict[str, Any] = {}
        self._exposed = self.registry
        if workers > 1:
            self._exposed = _shared_registry()
        else:
            ProcessCollector(registry=r)

    # -- the hot path: a dict lookup and a few additions per call ---------------

    def count_decision(self, outcome: Outcome, workflow: str, cls: str, app: str = "") -> None:
        """One admission decision. Only configured workflow ids and app names
        become label values (a session's workflow id is the client's word for
        learned sessions; an app removed from the configuration lives on in
        its sessions' records), so the series stay bounded."""
        if not cls and not workflow and not app:
            self.decision_by_outcome[outcome].inc()
            return
        label = workflow if workflow in self.workflows else OTHER_WORKFLOW
        app_label = app if app in self.apps else OTHER_APP
        key = (outcome, label, cls, app_label)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(
                outcome.name.lower(), label, cls or NO_CLASS, app_label
            )
        child.inc()

    def count_request(self, kind: str, status: int) -> None:
        """Count one request; the labelled child is looked up once per pair."""
        child = self._request_children.get((kind, status))
        if child is None:
            child = self._request_children[(kind, status)] = self.requests.labels(kind, str(status))
        child.inc()

    def request_started(self) -> float:
        """Mark a request in flight; returns its start time for :meth:`request_finished`."""
        self.in_flight.inc()
        return time.perf_counter()

    def request_finished(self, kind: str, status: int, started: float) -> float:
        """Record the request's duration (``status`` 0: no response was sent)."""
        self.in_flight.dec()
        seconds = time.perf_counter() - started
        key = (kind, status // 100)
        child = self._duration_children.get(key)
        if child is None:
            status_class = f"{status // 100}xx" if status else "none"
            child = self._duration_children[key] = self.request_seconds.labels(kind, status_class)
        child.observe(seconds)
        return seconds

    def upstream_answered(self, kind: str, seconds: float) -> None:
        child = self._headers_children.get(kind)
        if child is None:
            child = self._headers_children[kind] = self.upstream_headers_seconds.labels(kind)
        child.observe(seconds)

    def upstream_failed(self, error: UpstreamError | None = None) -> None:
        """Count a 502 or 504 the gateway answered, or (None) a response cut off."""
        if error is None:
            kind = "mid_stream"
        elif isinstance(error, UpstreamTimeout):
            kind = "timeout"
        else:
            kind = "unavailable"
        self.upstream_errors_by_kind[kind].inc()

    def count_shed_connection(self, reason: str) -> None:
        """One connection closed to make room (a :class:`gateway.capacity.Shed` value)."""
        self.shed_by_reason[reason].inc()

    # -- exposition ----------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format for one scrape: the sum over workers when there are several."""
        return generate_latest(self._exposed)


@contextmanager
def shared_across_workers(workers: int) -> Iterator[None]:
    """For the serve command: with several workers, give them one directory to
    count in, for as long as they run, and remove it afterwards."""
    if workers <= 1:
        yield
        return
    path = tempfile.mkdtemp(prefix="chatkit-gateway-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def _shared_registry() -> CollectorRegistry:
    path = os.environ.get(MULTIPROC_ENV)
    if not path or not Path(path).is_dir():
        raise RuntimeError(
            f"several workers need {MULTIPROC_ENV}: start the gateway with "
            "`chatkit-gateway serve`, which creates it"
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(_WorkerProcesses(Path(path)))
    return registry


_PID = re.compile(r"_(\d+)\.db$")
_SUMMED = (
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
)


class _WorkerProcesses(Collector):
    """Process metrics summed over the live workers and their supervisor.

    Also forgets the in-flight style gauges of workers that died (uvicorn
    restarts them under a new pid), which would otherwise count for ever.
    """

    def __init__(self, path: Path) -> None:
        self._path = path

    def _live_workers(self) -> set[int]:
        live: set[int] = set()
        pids = {int(m.group(1)) for f in self._path.iterdir() if (m := _PID.search(f.name))}
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                mark_process_dead(pid, str(self._path))  # type: ignore[no-untyped-call]
                continue
            except PermissionError:
                pass
            live.add(pid)
        return live

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = dict.fromkeys(_SUMMED, 0.0)
        start_time = max_fds = float("inf")
        for pid in {*self._live_workers(), os.getppid()}:
            collector = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in collector.collect():
                if not family.samples:
                    continue
                value = family.samples[0].value
                if family.name in totals:
                    totals[family.name] += value
                elif family.name == "process_start_time_seconds":
                    start_time = min(start_time, value)
                elif family.name == "process_max_fds":
                    max_fds = min(max_fds, value)
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds, summed over the workers.",
            value=totals["process_cpu_seconds"],
        )
        for name, help_text in (
            ("process_resident_memory_bytes", "Resident memory size in bytes, summed."),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes, summed."),
            ("process_open_fds", "Number of open file descriptors, summed."),
        ):
            yield GaugeMetricFamily(name, help_text, value=totals[name])
        if start_time != float("inf"):
            yield GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the oldest process since the epoch, in seconds.",
                value=start_time,
            )
        if max_fds != float("inf"):
            yield GaugeMetricFamily(
                "process_max_fds", "Maximum number of open file descriptors.", value=max_fds
            )
