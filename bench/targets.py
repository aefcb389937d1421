"""The targets measured by ``scripts/bench``, and the processes behind them."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from bench import BenchError
from bench.clients import PROXY_AIOHTTP, PROXY_COMMON, RUNNER
from bench.cpu import CpuWatch
from bench.memory import rss_bytes
from bench.nginx import nginx_conf
from bench.probe import answers, http_request
from bench.redis_figures import RedisCounter, RedisFigures
from bench.streams import IdleStreams, idle_streams, paced_streams
from bench.wrk import BackgroundWrk, Request, WrkParams, WrkResult, run_wrk, wrk_script
from tests.fake_upstream import BENCH_BODY
from tests.processes import Service, find_tool, free_port, gateway_env

API_KEY = "sk-bench"
#: Creates issued sessions (issuer mode); never the key forwarded upstream.
ISSUER_KEY = "sk-bench-issuer-0123456789"
ISSUED_WORKFLOW = "wf_issued"
# Large enough that the sliding window never rejects during a run.
HUGE_LIMIT = 1_000_000_000
CONVERSATION_BODY = (
    b'{"type":"threads.create","params":{"input":{"content":'
    b'[{"type":"input_text","text":"Hello from scripts/bench"}]}}}'
)
#: An issued read: what a page load makes several of.
READ_BODY = b'{"type":"threads.list","params":{"limit":20,"order":"desc"}}'
INSTALL_HINT = "install it with: apt-get install wrk nginx-light"
CONVERSATION = "/v1/chatkit/conversation?bench=1"
# Issuer mode: the gateway sends it to <workflow upstream>?bench=1, which the
# fake answers with the same constant as every other row.
ISSUED_PATH = "/chatkit?bench=1"
#: What ``--only`` can pick.
PARTS = ("direct", "nginx", "minimal", "embedded", "gateway", "workers", "streams", "model")
#: The model route's rows: the real key the fake model takes, and a workflow
#: with a token budget, so the reservation and settling are measured too.
MODEL_KEY = "sk-bench-model-key-0123456789"
MODEL_WORKFLOW = "wf_model"
MODEL_BODY = b'{"model":"gpt-5-mini","input":"Hello from scripts/bench","stream":true}'


@dataclass
class Run:
    """One measured wrk run and the CPU figures taken around it."""

    result: WrkResult
    cpu_percent: dict[str, float]
    core_percent: dict[str, float]


@dataclass
class Outcome:
    """One target: its measured rounds, or why it has none."""

    name: str
    method: str
    path: str
    #: wrk connections when not the run's --connections (1: the latency rows).
    connections: int | None = None
    #: A rejection flood: every answer must have this status.
    expect_status: int | None = None
    #: False for the stream targets: they are not wrk rows (they only carry a failure).
    wrk_row: bool = True
    runs: list[Run] = field(default_factory=list)
    warmup_errors: int = 0
    skipped: str | None = None
    failed: str | None = None

    @property
    def median(self) -> Run | None:
        """The round with the median throughput (the lower one of an even count)."""
        if not self.runs:
            return None
        ranked = sorted(self.runs, key=lambda run: run.result.rps)
        return ranked[(len(ranked) - 1) // 2]

    @property
    def errors(self) -> int:
        return sum(run.result.errors for run in self.runs)


class Bench:
    """Starts the processes, measures every target, and keeps what it saw."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.params = WrkParams(
            connections=args.connections,
            threads=args.threads,
            duration=args.duration,
            warmup=args.warmup,
        )
        self.sut_cpus: str | None = None if args.no_pin else args.sut_cpus
        self.load_cpus: str | None = None if args.no_pin else args.load_cpus
        self.services: list[Service] = []
        self.outcomes: list[Outcome] = []
        self.redis_figures: RedisFigures | None = None
        self.notes: list[str] = []
        #: RSS in bytes, per process measured: "idle" after start-up, "loaded"
        #: the highest seen after a 64-connection run.
        self.memory: dict[str, dict[str, int]] = {}
        self.idle_streams: IdleStreams | None = None
        self.paced: dict[str, dict[str, object]] = {}
        self.flood: dict[str, float] = {}
        #: How the cores were shared in the workers comparison.
        self.workers_layout: str | None = None
        #: µs to read one streamed answer's usage (StreamMeter), when measured.
        self.model_parser_us: float | None = None

    # processes

    def start(self, service: Service, ready: Callable[[], bool]) -> Service:
        self.services.append(service)
        try:
            service.wait_ready(ready)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(str(exc)) from None
        return service

    def stop(self, service: Service) -> None:
        service.stop()
        self.services.remove(service)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def fake_upstream(self, name: str, cpus: str | None) -> tuple[Service, int]:
        port = free_port()
        argv = [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)]
        service = Service(name, argv, cpus=cpus, workdir=self.workdir)
        return self.start(service, answers(port)), port

    def gateway(
        self,
        name: str,
        upstream_port: int,
        redis_url: str | None,
        *,
        workers: int | None = None,
        cpus: str | None = "sut",
        extra: dict[str, str] | None = None,
    ) -> tuple[Service, int]:
        port = free_port()
        env = gateway_env(
            f"http://127.0.0.1:{upstream_port}",
            port=port,
            redis_url=redis_url,
            extra={
                "GATEWAY_WORKERS": str(workers or self.args.workers),
                "GATEWAY_LOG_LEVEL": "warning",
                # Issuer mode beside the hosted upstream: the issued-session row.
                # Its reads get a window too large to refuse during a run,
                # like the sessions' own limit: measured is the deciding.
                "GATEWAY_WORKFLOWS": json.dumps(
                    {
                        ISSUED_WORKFLOW: {
                            "upstream": f"http://127.0.0.1:{upstream_port}/v1/chatkit",
                            "policy": {"limits": {"read": {"session": {"1m": HUGE_LIMIT}}}},
                        },
                        MODEL_WORKFLOW: {
                            "upstream": f"http://127.0.0.1:{upstream_port}/v1/chatkit",
                            "policy": {"tokens": {"user": {"1d": HUGE_LIMIT}}}
                            if "GATEWAY_MODEL_API_KEY" in (extra or {})
                            else {},
                        },
                    }
                ),
                "GATEWAY_ISSUER_API_KEYS": ISSUER_KEY,
                **(extra or {}),
            },
        )
        argv = [sys.executable, "-m", "gateway", "serve"]
        pin = self.sut_cpus if cpus == "sut" else cpus
        service = Service(name, argv, cpus=pin, workdir=self.workdir, env=env)
        return self.start(service, answers(port)), port

    def minimal_proxy(self, upstream_port: int) -> tuple[Service, int]:
        """The reference: the ~40-line raw-ASGI + aiohttp proxy of bench/clients.py."""
        path = self.workdir / "minimal_proxy.py"
        path.write_text(PROXY_COMMON + PROXY_AIOHTTP + RUNNER)
        port = free_port()
        env = {"PYTHONUNBUFFERED": "1", "BENCH_UPSTREAM": f"http://127.0.0.1:{upstream_port}"}
        env.update({k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")})
        argv = [sys.executable, str(path), str(port)]
        service = Service("minimal proxy", argv, cpus=self.sut_cpus, workdir=self.workdir, env=env)
        return self.start(service, answers(port)), port

    def sample_memory(self, name: str, service: Service, what: str) -> None:
        figures = self.memory.setdefault(name, {})
        rss = rss_bytes(service)
        figures[what] = max(figures.get(what, 0), rss) if what == "loaded" else rss

    def nginx(
        self, upstream_port: int, *, constant: bytes | None = None
    ) -> tuple[Service, int] | None:
        """nginx proxying to ``upstream_port``; with ``constant``, the backend:
        it answers ``?bench=1`` itself with that body (see bench/nginx.py)."""
        binary = find_tool("nginx")
        if binary is None:
            return None
        name = "nginx" if constant is None else "nginx-backend"
        port = free_port()
        conf = self.workdir / f"{name}.conf"
        conf.write_text(nginx_conf(binary, self.workdir, port, upstream_port, constant=constant))
        argv = [
            binary,
            "-p",
            f"{self.workdir}/",
            "-e",
            str(self.workdir / f"{name}-error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ]
        cpus = self.sut_cpus if constant is None else self.load_cpus
        service = Service(name, argv, cpus=cpus, workdir=self.workdir)
        return self.start(service, answers(port, "/v1/chatkit/threads?bench=1")), port

    def redis_server(self) -> tuple[Service, int] | None:
        binary = find_tool("redis-server")
        if binary is None:
            print("  redis-server not found, so the redis target is skipped")
            self.notes.append(
                "redis-server not found, redis target skipped; apt-get install redis-server"
            )
            return None
        port = free_port()
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        service = Service("redis-server", argv, cpus=self.load_cpus, workdir=self.workdir)

        def pong() -> bool:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        return self.start(service, pong), port

    def client_secret(
        self,
        gateway_port: int,
        *,
        workflow: str = "wf_bench",
        key: str = API_KEY,
        limit: int = HUGE_LIMIT,
    ) -> str:
        """A session's secret: learned from the fake upstream, or issued by the
        gateway itself for a configured workflow."""
        session: dict[str, object] = {
            "user": "bench-user",
            "workflow": {"id": workflow},
            "rate_limits": {"max_requests_per_1_minute": limit},
        }
        status, _, reply = http_request(
            gateway_port,
            "POST",
            "/v1/chatkit/sessions",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            json.dumps(session).encode(),
        )
        if status != 200:
            raise BenchError(f"session create through the gateway answered {status}")
        secret: str = json.loads(reply)["client_secret"]
        return secret

    # measuring

    def measure(
        self,
        outcome: Outcome,
        port: int,
        request: Request,
        *,
        sut: list[Service],
        load: dict[str, list[Service]],
        expect_header: str | None = None,
        before_run: Callable[[], None] | None = None,
        after_run: Callable[[WrkResult], None] | None = None,
        rounds: int = 1,
        alongside: Callable[[], BackgroundWrk] | None = None,
    ) -> None:
        """Check one request answers as expected, warm up once per target, then measure.

        ``alongside`` starts a second load (a flood) just before each measured run.
        """
        try:
            status, headers, body = http_request(
                port, request.method, request.path, request.headers(), request.body
            )
        except OSError as exc:  # includes the socket timeout
            raise BenchError(
                f"{outcome.name}: the first request failed ({exc!r}); "
                f"{sut[0].name} log:\n{sut[0].tail()}"
            ) from None
        if outcome.expect_status is not None:
            if status != outcome.expect_status:
                raise BenchError(
                    f"{outcome.name}: the first request answered {status}, "
                    f"not {outcome.expect_status}: {body[:300]!r}"
                )
        elif not 200 <= status < 300:
            raise BenchError(
                f"{outcome.name}: the first request answered {status}, not 2xx: {body[:300]!r}"
            )
        if expect_header is not None and expect_header not in headers:
            raise BenchError(f"{outcome.name}: response lacks {expect_header!r}: {headers}")
        slug = re.sub(r"[^a-z0-9]+", "-", outcome.name.lower()).strip("-")
        script = wrk_script(request, self.workdir / f"wrk-{slug}.lua")
        url = f"http://127.0.0.1:{port}{request.path}"
        params = self.params
        if outcome.connections is not None:
            params = replace(params, connections=outcome.connections, threads=1)
        print(f"  {outcome.name}:", end="", flush=True)
        if not outcome.runs and params.warmup > 0:
            print(f" warm-up {params.warmup:g}s ...", end="", flush=True)
            warm = run_wrk(url, script, params, seconds=params.warmup, cpus=self.load_cpus)
            warm.expect_status = outcome.expect_status
            outcome.warmup_errors += warm.errors
        for _ in range(rounds):
            flood = alongside() if alongside is not None else None
            try:
                self._measure_once(outcome, url, script, params, sut, load, before_run, after_run)
            finally:
                if flood is not None:
                    result = flood.result()
                    result.expect_status = 401
                    self.flood["rejected_rps"] = result.rps
                    self.flood["rejected_errors"] = result.errors

    def _measure_once(
        self,
        outcome: Outcome,
        url: str,
        script: Path,
        params: WrkParams,
        sut: list[Service],
        load: dict[str, list[Service]],
        before_run: Callable[[], None] | None,
        after_run: Callable[[WrkResult], None] | None,
    ) -> None:
        print(f" measuring {params.duration:g}s ...", end="", flush=True)
        if before_run is not None:
            before_run()
        watch = CpuWatch({"sut": sut, **load})
        result = run_wrk(url, script, params, seconds=params.duration, cpus=self.load_cpus)
        result.expect_status = outcome.expect_status
        procs, cores = watch.percent(result.seconds)
        procs["wrk"] = 100 * result.cpu_seconds / result.seconds
        busy = sum(v for k, v in cores.items() if k.startswith("cpu"))
        cores["other"] = max(busy - sum(procs.values()) - cores["softirq"], 0.0)
        procs["sut_us_per_request"] = procs["sut"] / 100 * 1e6 / max(result.rps, 1e-9)
        if after_run is not None:
            after_run(result)
        outcome.runs.append(Run(result, procs, cores))
        print(f" {result.rps:,.0f} req/s", end="", flush=True)
        if result.errors:
            print(f" ({result.errors} ERRORS)", end="", flush=True)
        print()

    def attempt(
        self, outcome: Outcome, step: Callable[..., None], *args: Any, **kwargs: Any
    ) -> None:
        """Run one target; a failure is reported and the other targets still run."""
        if outcome.failed is not None:
            return  # failed in an earlier round: its figures are not comparable
        try:
            step(*args, **kwargs)
        except BenchError as exc:
            outcome.failed = str(exc)
            print(f"\n!!! {outcome.name} FAILED: {str(exc).splitlines()[0]}", flush=True)

    # the targets, in the order they run

    def run(self) -> None:
        # "?bench=1": the fake answers every route with the same constant, so
        # the routes compared below differ only in what sits in front of it.
        get_threads = Request("GET", "/v1/chatkit/threads?bench=1", f"Bearer {API_KEY}")
        o = self.o = Outcomes(get_threads.path, CONVERSATION)
        self.outcomes = o.all()

        # The upstream behind every proxy, on the load side: nginx answering
        # "?bench=1" with the fake's constant itself, and passing the rest
        # (session creates) to the fake. Python answering every request would
        # make the load core the bottleneck, and the proxies' ratios would
        # measure it rather than the proxies.
        fake, fake_port = self.fake_upstream("fake upstream (backend)", self.load_cpus)
        self.load: dict[str, list[Service]] = {"upstream": [fake]}
        self.backend_port = fake_port
        backend = self.nginx(fake_port, constant=BENCH_BODY)
        if backend is None:
            self.notes.append(
                "nginx not found: the fake upstream answers every request itself, so the "
                f"load core may saturate before the proxies do; {INSTALL_HINT}"
            )
        else:
            self.load["upstream"].append(backend[0])
            self.backend_port = backend[1]
        direct_post = Request("POST", CONVERSATION, f"Bearer {API_KEY}", CONVERSATION_BODY)

        only = self.args.only
        for outcome in self.outcomes:
            outcome.skipped = "not asked for (--only)"
        for part, rows in (
            ("direct", (o.upstream, o.upstream_c1)),
            ("nginx", (o.nginx,)),
            ("minimal", (o.minimal, o.minimal_c1)),
            ("embedded", (o.embedded,)),
            ("gateway", (o.passthrough, o.with_redis, o.decision_only, o.issued, o.issued_read,
                         o.gateway_c1, o.unauthorized, o.limited, o.under_flood)),
            ("workers", (o.workers_one, o.workers_two)),
            ("streams", (o.streams_idle, o.streams_paced)),
            ("model", (o.model_minimal, o.model_gateway)),
        ):  # fmt: skip
            if part in only:
                for outcome in rows:
                    outcome.skipped = None
        if "direct" in only:
            self.attempt(o.upstream, self._direct, get_threads, direct_post)
        if "nginx" in only:
            self.attempt(o.nginx, self._nginx, get_threads)
        if "minimal" in only:
            self.attempt(o.minimal, self._minimal, direct_post)
        if "embedded" in only:
            self.attempt(o.embedded, self._embedded)

        started = self.redis_server()
        if started is None:
            for outcome in self.outcomes:
                if outcome.runs or outcome.failed or outcome.skipped:
                    continue
                outcome.skipped = "redis-server not installed"
            self.stop_all()
            return
        redis_service, redis_port = started
        self.load["redis"] = [redis_service]
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.redis_port = redis_port
        if "gateway" in only:
            self.attempt(o.with_redis, self._gateway_rows, get_threads)
        if "workers" in only:
            self.attempt(o.workers_two, self._workers)
        if "streams" in only:
            self.attempt(o.streams_idle, idle_streams, self)
            self.attempt(o.streams_paced, paced_streams, self)
        if "model" in only:
            self.attempt(o.model_gateway, self._model_rows)
        self.stop_all()

    def conversation(self, gateway_port: int) -> Request:
        secret = self.client_secret(gateway_port)
        return Request("POST", CONVERSATION, f"Bearer {secret}", CONVERSATION_BODY)

    def over_limit(self, gateway_port: int) -> Request:
        """A request whose session has used up its limit: one a minute, used now.
        Made afresh each round, since the window slides past a minute-old use."""
        secret = self.client_secret(gateway_port, limit=1)
        auth = {"Authorization": f"Bearer {secret}"}
        http_request(gateway_port, "POST", CONVERSATION, auth, b"{}")
        return Request("POST", CONVERSATION, f"Bearer {secret}", CONVERSATION_BODY)

    def issued_secret(self, gateway_port: int, workflow: str = ISSUED_WORKFLOW) -> str:
        """A secret the gateway minted itself (issuer mode) for ``workflow``."""
        return self.client_secret(gateway_port, workflow=workflow, key=ISSUER_KEY)

    def issued(self, gateway_port: int, body: bytes = CONVERSATION_BODY) -> Request:
        """An issued request: a turn (threads.create) unless ``body`` says otherwise."""
        secret = self.issued_secret(gateway_port)
        return Request("POST", ISSUED_PATH, f"Bearer {secret}", body)

    def _direct(self, get_threads: Request, post: Request) -> None:
        # The fake as the system under test: its own instance, on the SUT side.
        o = self.o
        direct, port = self.fake_upstream("fake upstream (direct)", self.sut_cpus)
        try:
            self.measure(o.upstream, port, get_threads, sut=[direct], load={}, rounds=self.rounds)
            self.attempt(
                o.upstream_c1,
                lambda: self.measure(
                    o.upstream_c1, port, post, sut=[direct], load={}, rounds=self.rounds
                ),
            )
        finally:
            self.stop(direct)

    def _nginx(self, get_threads: Request) -> None:
        started = self.nginx(self.backend_port)
        if started is None:
            print(f"  nginx not found, so not measured; {INSTALL_HINT}")
            self.notes.append(f"nginx not found, nginx target skipped; {INSTALL_HINT}")
            self.o.nginx.skipped = "nginx not installed"
            return
        service, port = started
        try:
            self.measure(
                self.o.nginx, port, get_threads, sut=[service], load=self.load, rounds=self.rounds
            )
        finally:
            self.stop(service)

    def _minimal(self, post: Request) -> None:
        o = self.o
        service, port = self.minimal_proxy(self.backend_port)
        try:
            self.sample_memory("minimal proxy", service, "idle")
            for _ in range(self.rounds):  # alternate, as on the gateway
                self.measure(o.minimal, port, post, sut=[service], load=self.load)
                self.sample_memory("minimal proxy", service, "loaded")
                if o.minimal_c1.failed is None:
                    self.attempt(
                        o.minimal_c1,
                        lambda: self.measure(
                            o.minimal_c1, port, post, sut=[service], load=self.load
                        ),
                    )
        finally:
            self.stop(service)

    def _embedded(self) -> None:
        o = self.o
        if self.args.workers > 1:
            # A session is learned by the worker that proxied its creation;
            # the others' in-process stores never hear of it (by design).
            o.embedded.skipped = "the embedded store is per worker process (--workers > 1)"
            return
        gw, port = self.gateway("gateway (embedded)", self.backend_port, None)
        try:
            self.measure(
                o.embedded,
                port,
                self.conversation(port),
                sut=[gw],
                load=self.load,
                expect_header="ratelimit-policy",
                rounds=self.rounds,
            )
        finally:
            self.stop(gw)

    def _gateway_rows(self, get_threads: Request) -> None:
        """Pass-through, client and issued routes, latency and rejections on one
        gateway backed by Redis, in alternating rounds: their ratios are the
        cost of what differs, and alternating keeps a drift in the machine's
        load out of them."""
        o = self.o
        gw, port = self.gateway("gateway (redis)", self.backend_port, self.redis_url)
        self.sample_memory("gateway", gw, "idle")
        load = self.load
        counter = RedisCounter(self.redis_port, port)
        try:
            for _ in range(self.rounds):
                # Fresh sessions each round: learned ones expire after 600 s.
                post = self.conversation(port)
                get = Request("GET", CONVERSATION, post.authorization)
                issued = self.issued(port)
                issued_read = self.issued(port, READ_BODY)
                measure = functools.partial(self.measure, port=port, sut=[gw], load=load)
                self.attempt(
                    o.passthrough, measure, o.passthrough, request=get_threads, expect_header="via"
                )
                self.attempt(
                    o.with_redis,
                    measure,
                    o.with_redis,
                    request=post,
                    expect_header="ratelimit-policy",
                    before_run=counter.before,
                    after_run=counter.after,
                )
                self.attempt(
                    o.decision_only,
                    measure,
                    o.decision_only,
                    request=get,
                    expect_header="ratelimit-policy",
                )
                self.attempt(
                    o.issued, measure, o.issued, request=issued, expect_header="ratelimit-policy"
                )
                self.attempt(
                    o.issued_read,
                    measure,
                    o.issued_read,
                    request=issued_read,
                    expect_header="ratelimit-policy",
                )
                self.sample_memory("gateway", gw, "loaded")
                self.attempt(o.gateway_c1, measure, o.gateway_c1, request=post)
            self._rejections(gw, port)
        finally:
            counter.close()
        self.redis_figures = counter.figures
        self.stop(gw)

    def _rejections(self, gw: Service, port: int) -> None:
        """401 and 429 answers (no upstream involved), and admitted traffic
        measured while a flood of 401s runs beside it."""
        o = self.o
        # Well-formed, so each one costs the store's decision: the expensive case.
        unknown = Request("POST", CONVERSATION, "Bearer ek_bench_" + "x" * 43, CONVERSATION_BODY)
        flood_script = wrk_script(unknown, self.workdir / "wrk-flood.lua")
        flood_url = f"http://127.0.0.1:{port}{unknown.path}"

        def flood() -> BackgroundWrk:
            # A second wrk with as many connections; it outlasts the measured run.
            return BackgroundWrk(
                flood_url,
                flood_script,
                self.params,
                seconds=self.params.duration + 1,
                cpus=self.load_cpus,
            )

        for _ in range(self.rounds):
            measure = functools.partial(self.measure, port=port, sut=[gw], load=self.load)
            self.attempt(o.unauthorized, measure, o.unauthorized, request=unknown)
            self.attempt(o.limited, measure, o.limited, request=self.over_limit(port))
            post = self.conversation(port)
            self.attempt(o.under_flood, measure, o.under_flood, request=post, alongside=flood)

    def _workers(self) -> None:
        """One worker against two, everything sharing both cores (see report)."""
        o = self.o
        if self.sut_cpus is None or self.load_cpus is None:
            both = None
        else:
            both = f"{self.sut_cpus},{self.load_cpus}"
        saved, self.load_cpus = self.load_cpus, both
        self.workers_layout = (
            f"both gateways, wrk, nginx, the fake upstream and redis-server all on CPUs {both} "
            "(this machine has no third core for the load): two workers can only share what "
            "the load side leaves, so the ratio is a floor; the SUT column (% of one core) "
            "and us/req show what each worker count used"
            if both
            else "not pinned: every process shares every core"
        )
        try:
            one, one_port = self.gateway(
                "gateway (1 worker)", self.backend_port, self.redis_url, workers=1, cpus=both
            )
            two, two_port = self.gateway(
                "gateway (2 workers)", self.backend_port, self.redis_url, workers=2, cpus=both
            )
            for _ in range(self.rounds):
                for outcome, service, port in (
                    (o.workers_one, one, one_port),
                    (o.workers_two, two, two_port),
                ):
                    post = self.conversation(port)
                    self.measure(outcome, port, post, sut=[service], load=self.load)
            self.stop(one)
            self.stop(two)
        finally:
            self.load_cpus = saved

    def _model_rows(self) -> None:
        """A streamed Responses answer through the gateway's model route (token
        checked, budget reserved and settled, usage read from the stream) and
        through the minimal proxy, from the fake model on the load side."""
        o = self.o
        port = free_port()
        argv = [
            sys.executable, "-m", "tests.fake_model", "--port", str(port), "--api-key", MODEL_KEY,
        ]  # fmt: skip
        model = self.start(
            Service("fake model", argv, cpus=self.load_cpus, workdir=self.workdir),
            answers(port, "/healthz"),
        )
        load = {**self.load, "upstream": [model]}
        minimal, minimal_port = self.minimal_proxy(port)
        try:
            direct = Request("POST", "/v1/responses", f"Bearer {MODEL_KEY}", MODEL_BODY)
            self.attempt(
                o.model_minimal,
                lambda: self.measure(
                    o.model_minimal, minimal_port, direct, sut=[minimal], load=load,
                    rounds=self.rounds,
                ),
            )  # fmt: skip
        finally:
            self.stop(minimal)
        gw, gw_port = self.gateway(
            "gateway (model)",
            self.backend_port,
            self.redis_url,
            extra={
                "GATEWAY_MODEL_API_KEY": MODEL_KEY,
                "GATEWAY_MODEL_UPSTREAM": f"http://127.0.0.1:{port}",
            },
        )
        try:
            token = model_token(self.redis_url)
            through = Request("POST", "/v1/responses", f"Bearer {token}", MODEL_BODY)
            self.measure(o.model_gateway, gw_port, through, sut=[gw], load=load, rounds=self.rounds)
            _, _, stream = http_request(port, "POST", "/v1/responses", through.headers() | {
                "Authorization": f"Bearer {MODEL_KEY}"}, MODEL_BODY)  # fmt: skip
            self.model_parser_us = usage_parser_us(stream)
        finally:
            self.stop(gw)
            self.stop(model)

    @property
    def rounds(self) -> int:
        return int(self.args.rounds)


def model_token(redis_url: str) -> str:
    """A model token for the bench's calls, granted in the store as a turn's
    would be (the bench has no ChatKit server to hand one to)."""
    import asyncio
    import secrets
    import time

    from gateway.auth import SecretHasher
    from gateway.store.base import ModelGrant
    from gateway.store.redis import RedisStore, connect

    token = "ckmt_" + secrets.token_urlsafe(32)

    async def grant() -> None:
        store = RedisStore(connect(redis_url, cluster=False, timeout=5.0), pubsub_url=redis_url)
        try:
            await store.grant_model_token(
                SecretHasher(None)(token.encode()),
                ModelGrant(
                    secret_hash="bench-" + secrets.token_hex(16),
                    session_id="cksess_bench_model",
                    user="bench-user",
                    workflow_id=MODEL_WORKFLOW,
                    request_id="bench",
                    expires_at=int(time.time()) + 3600,
                ),
            )
        finally:
            await store.close()

    asyncio.run(grant())
    return token


def usage_parser_us(stream: bytes, repeat: int = 2000) -> float:
    """What reading one streamed answer's usage costs the gateway (µs per answer)."""
    import time

    from gateway.model.usage import RESPONSES, StreamMeter

    started = time.perf_counter()
    for _ in range(repeat):
        meter = StreamMeter(RESPONSES)
        meter.feed(stream)
        meter.rest()
    if meter.usage is None:
        raise BenchError("the usage parser found no usage in the fake model's stream")
    return (time.perf_counter() - started) / repeat * 1e6


class Outcomes:
    """Every wrk row of the report, by what it measures."""

    def __init__(self, get_path: str, post_path: str) -> None:
        self.upstream = Outcome("upstream direct", "GET", get_path)
        self.nginx = Outcome("nginx proxy_pass", "GET", get_path)
        self.minimal = Outcome("minimal proxy", "POST", post_path)
        self.passthrough = Outcome("gateway pass-through", "GET", get_path)
        self.embedded = Outcome("gateway client (embedded)", "POST", post_path)
        self.with_redis = Outcome("gateway client (redis)", "POST", post_path)
        # It splits the client route's cost: the same decision on a body-less
        # GET, whose upstream answer is the size of the pass-through's.
        self.decision_only = Outcome("gateway client GET (redis)", "GET", post_path)
        self.issued = Outcome("gateway issued turn", "POST", ISSUED_PATH)
        self.issued_read = Outcome("gateway issued read", "POST", ISSUED_PATH)
        self.upstream_c1 = Outcome("upstream direct c1", "POST", post_path, connections=1)
        self.minimal_c1 = Outcome("minimal proxy c1", "POST", post_path, connections=1)
        self.gateway_c1 = Outcome("gateway client (redis) c1", "POST", post_path, connections=1)
        self.unauthorized = Outcome(
            "gateway 401 unknown secret", "POST", post_path, expect_status=401
        )
        self.limited = Outcome("gateway 429 over limit", "POST", post_path, expect_status=429)
        self.under_flood = Outcome("gateway client under 401 flood", "POST", post_path)
        self.workers_one = Outcome("gateway 1 worker, 2 cores", "POST", post_path)
        self.workers_two = Outcome("gateway 2 workers, 2 cores", "POST", post_path)
        # Not wrk rows: they carry a failure or a skip for the stream targets.
        self.streams_idle = Outcome("idle SSE streams", "POST", ISSUED_PATH, wrk_row=False)
        self.streams_paced = Outcome("paced SSE streams", "POST", ISSUED_PATH, wrk_row=False)
        self.model_minimal = Outcome("minimal proxy, model stream", "POST", "/v1/responses")
        self.model_gateway = Outcome("gateway model route (redis)", "POST", "/v1/responses")

    def all(self) -> list[Outcome]:
        return [v for v in vars(self).values() if isinstance(v, Outcome)]
