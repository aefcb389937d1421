"""The targets measured by ``scripts/bench``, and the processes behind them."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import BenchError
from bench.cpu import CpuWatch
from bench.nginx import nginx_conf
from bench.probe import answers, http_request
from bench.redis_figures import RedisCounter, RedisFigures
from bench.wrk import Request, WrkParams, WrkResult, run_wrk, wrk_script
from tests.processes import Service, find_tool, free_port, gateway_env

API_KEY = "sk-bench"
# Large enough that the sliding window never rejects during a run.
HUGE_LIMIT = 1_000_000_000
CONVERSATION_BODY = (
    b'{"type":"threads.create","params":{"input":{"content":'
    b'[{"type":"input_text","text":"Hello from scripts/bench"}]}}}'
)
INSTALL_HINT = "install it with: apt-get install wrk nginx-light"


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

    def gateway(self, name: str, upstream_port: int, redis_url: str | None) -> tuple[Service, int]:
        port = free_port()
        env = gateway_env(
            f"http://127.0.0.1:{upstream_port}",
            port=port,
            redis_url=redis_url,
            extra={"GATEWAY_WORKERS": str(self.args.workers), "GATEWAY_LOG_LEVEL": "warning"},
        )
        argv = [sys.executable, "-m", "gateway", "serve"]
        service = Service(name, argv, cpus=self.sut_cpus, workdir=self.workdir, env=env)
        return self.start(service, answers(port)), port

    def nginx(self, upstream_port: int) -> tuple[Service, int] | None:
        binary = find_tool("nginx")
        if binary is None:
            print(f"  nginx not found, so not measured; {INSTALL_HINT}")
            self.notes.append(f"nginx not found, nginx target skipped; {INSTALL_HINT}")
            return None
        port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(binary, self.workdir, port, upstream_port))
        argv = [
            binary,
            "-p",
            f"{self.workdir}/",
            "-e",
            str(self.workdir / "nginx-error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ]
        service = Service("nginx", argv, cpus=self.sut_cpus, workdir=self.workdir)
        return self.start(service, answers(port, "/v1/chatkit/threads")), port

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

    def client_secret(self, gateway_port: int) -> str:
        body = json.dumps(
            {
                "user": "bench-user",
                "workflow": {"id": "wf_bench"},
                "rate_limits": {"max_requests_per_1_minute": HUGE_LIMIT},
            }
        ).encode()
        status, _, reply = http_request(
            gateway_port,
            "POST",
            "/v1/chatkit/sessions",
            {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            body,
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
    ) -> None:
        """Check one request answers 2xx, warm up once per target, then measure."""
        try:
            status, headers, body = http_request(
                port, request.method, request.path, request.headers(), request.body
            )
        except OSError as exc:  # includes the socket timeout
            raise BenchError(
                f"{outcome.name}: the first request failed ({exc!r}); "
                f"{sut[0].name} log:\n{sut[0].tail()}"
            ) from None
        if not 200 <= status < 300:
            raise BenchError(
                f"{outcome.name}: the first request answered {status}, not 2xx: {body[:300]!r}"
            )
        if expect_header is not None and expect_header not in headers:
            raise BenchError(f"{outcome.name}: response lacks {expect_header!r}: {headers}")
        slug = re.sub(r"[^a-z0-9]+", "-", outcome.name.lower()).strip("-")
        script = wrk_script(request, self.workdir / f"wrk-{slug}.lua")
        url = f"http://127.0.0.1:{port}{request.path}"
        print(f"  {outcome.name}:", end="", flush=True)
        if not outcome.runs and self.params.warmup > 0:
            print(f" warm-up {self.params.warmup:g}s ...", end="", flush=True)
            warm = run_wrk(
                url, script, self.params, seconds=self.params.warmup, cpus=self.load_cpus
            )
            outcome.warmup_errors += warm.errors
        for _ in range(rounds):
            self._measure_once(outcome, url, script, sut, load, before_run, after_run)

    def _measure_once(
        self,
        outcome: Outcome,
        url: str,
        script: Path,
        sut: list[Service],
        load: dict[str, list[Service]],
        before_run: Callable[[], None] | None,
        after_run: Callable[[WrkResult], None] | None,
    ) -> None:
        print(f" measuring {self.params.duration:g}s ...", end="", flush=True)
        if before_run is not None:
            before_run()
        watch = CpuWatch({"sut": sut, **load})
        result = run_wrk(
            url, script, self.params, seconds=self.params.duration, cpus=self.load_cpus
        )
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

    def attempt(self, outcome: Outcome, step: Callable[[], None]) -> None:
        """Run one target; a failure is reported and the other targets still run."""
        try:
            step()
        except BenchError as exc:
            outcome.failed = str(exc)
            print(f"\n!!! {outcome.name} FAILED: {str(exc).splitlines()[0]}", flush=True)

    def run(self) -> None:
        # "?bench=1": the fake answers every route with the same constant, so
        # the routes compared below differ only in what the gateway does.
        get_threads = Request("GET", "/v1/chatkit/threads?bench=1", f"Bearer {API_KEY}")
        conversation = "/v1/chatkit/conversation?bench=1"
        upstream = Outcome("upstream direct", "GET", get_threads.path)
        nginx = Outcome("nginx proxy_pass", "GET", get_threads.path)
        passthrough = Outcome("gateway pass-through", "GET", get_threads.path)
        embedded = Outcome("gateway client (embedded)", "POST", conversation)
        with_redis = Outcome("gateway client (redis)", "POST", conversation)
        # It splits the client route's cost: the same decision on a body-less
        # GET, whose upstream answer is the size of the pass-through's, so only
        # the decision differs from target 3.
        decision_only = Outcome("gateway client GET (redis)", "GET", conversation)
        self.outcomes = [upstream, nginx, passthrough, embedded, with_redis, decision_only]

        # The fake upstream behind every proxy, on the load side.
        backend, backend_port = self.fake_upstream("fake upstream (backend)", self.load_cpus)
        load = {"upstream": [backend]}

        rounds = self.args.rounds

        def upstream_direct() -> None:
            # The fake as the system under test: its own instance, on the SUT side.
            direct, port = self.fake_upstream("fake upstream (direct)", self.sut_cpus)
            try:
                self.measure(upstream, port, get_threads, sut=[direct], load={}, rounds=rounds)
            finally:
                self.stop(direct)

        def nginx_proxy() -> None:
            started = self.nginx(backend_port)
            if started is None:
                nginx.skipped = "nginx not installed"
                return
            service, port = started
            try:
                self.measure(nginx, port, get_threads, sut=[service], load=load, rounds=rounds)
            finally:
                self.stop(service)

        def client_embedded() -> None:
            if self.args.workers > 1:
                # A session is learned by the worker that proxied its creation;
                # the others' in-process stores never hear of it (by design).
                embedded.skipped = "the embedded store is per worker process (--workers > 1)"
                return
            gw, port = self.gateway("gateway (embedded)", backend_port, None)
            try:
                self.measure(
                    embedded,
                    port,
                    self.conversation(port),
                    sut=[gw],
                    load=load,
                    expect_header="ratelimit-policy",
                    rounds=rounds,
                )
            finally:
                self.stop(gw)

        self.attempt(upstream, upstream_direct)
        self.attempt(nginx, nginx_proxy)
        self.attempt(embedded, client_embedded)

        # Pass-through and client route on one gateway backed by Redis, in
        # alternating rounds: their ratio is the cost of the decision, and
        # alternating keeps a drift in the machine's load out of it.
        started = self.redis_server()
        if started is None:
            with_redis.skipped = decision_only.skipped = "redis-server not installed"
            gw, port = self.gateway("gateway", backend_port, None)
            self.attempt(
                passthrough,
                lambda: self.measure(
                    passthrough, port, get_threads, sut=[gw], load=load, rounds=rounds
                ),
            )
            self.stop_all()
            return
        redis_service, redis_port = started
        load["redis"] = [redis_service]
        gw, port = self.gateway(
            "gateway (redis)", backend_port, f"redis://127.0.0.1:{redis_port}/0"
        )
        post = self.conversation(port)
        get = Request("GET", conversation, post.authorization)
        counter = RedisCounter(redis_port, port)
        try:
            for _ in range(rounds):
                if passthrough.failed is None:
                    self.attempt(
                        passthrough,
                        lambda: self.measure(
                            passthrough, port, get_threads, sut=[gw], load=load, expect_header="via"
                        ),
                    )
                if with_redis.failed is None:
                    self.attempt(
                        with_redis,
                        lambda: self.measure(
                            with_redis,
                            port,
                            post,
                            sut=[gw],
                            load=load,
                            expect_header="ratelimit-policy",
                            before_run=counter.before,
                            after_run=counter.after,
                        ),
                    )
                if decision_only.failed is None:
                    self.attempt(
                        decision_only,
                        lambda: self.measure(
                            decision_only,
                            port,
                            get,
                            sut=[gw],
                            load=load,
                            expect_header="ratelimit-policy",
                        ),
                    )
        finally:
            counter.close()
        self.redis_figures = counter.figures
        self.stop_all()

    def conversation(self, gateway_port: int) -> Request:
        secret = self.client_secret(gateway_port)
        return Request(
            "POST", "/v1/chatkit/conversation?bench=1", f"Bearer {secret}", CONVERSATION_BODY
        )
