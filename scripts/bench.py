"""Throughput and latency of the gateway next to its upstream and nginx, in one run.

Run it as ``scripts/bench`` (it needs the project's venv). It starts every
process itself on free 127.0.0.1 ports, drives each target with wrk using the
same parameters, and prints one table:

1. ``upstream direct``: the fake ChatKit API (``tests/fake_upstream.py``);
2. ``nginx``: ``proxy_pass`` to that fake, with upstream keepalive;
3. ``gateway pass-through``: ``GET /v1/chatkit/threads``, a server route with
   no admission decision;
4. ``gateway client (embedded)``: ``POST /v1/chatkit/conversation`` with a
   client secret, decided by the in-process store;
5. ``gateway client (redis)``: the same, decided by a private redis-server;
6. ``gateway client GET (redis)``: a body-less ``GET`` on the client route,
   which splits the cost of 5 into the decision and the request body.

Every request carries ``?bench=1``, on which the fake upstream answers any
route with the same constant body: targets 1-3 and 6 then differ only in what
sits in front of the fake, and 4-5 add a small JSON body. The client secret
comes from a session created through the gateway under test with a limit so
large that nothing is ever rejected. Targets 3, 5 and 6 run on one gateway
process, in alternating rounds (``--rounds``). The admission budget (at least
0.9x the pass-through throughput, p99 within 1.2x) is checked on 6 against 3:
the same GET with the same upstream answer, where the only difference is the
admission decision. With several rounds each row is the round with the
median throughput.

The machine has two cores, so processes are pinned: whatever is being measured
(the gateway, nginx, or the fake upstream in target 1, a separate instance)
runs on ``--sut-cpus`` (CPU 0); wrk, the fake upstream behind the proxies and
redis-server share ``--load-cpus`` (CPU 1). The CPU table says how busy each
side was, so a load side that saturated first is visible rather than silent.

For target 5 the Redis ``INFO commandstats`` delta over the measured run is
divided by the requests wrk reports: EVALSHA per request, and client commands
per request (EVALSHA plus any command that ``admit.lua`` itself does not issue;
commands run inside the script are counted by Redis too, so they are shown
apart).

Temporary files (logs, nginx.conf, wrk scripts) live in a directory under
$TMPDIR, removed at the end unless ``--keep-temp``. Exit status: 0 success,
1 wrk is missing or a process or target failed, 2 bad arguments, 3 some request
was answered with a status >= 400 or failed on the socket (the figures are then
not comparable). Runs disturbed by other work on the machine are flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

REPO = Path(__file__).resolve().parent.parent
ADMIT_LUA = REPO / "gateway" / "store" / "lua" / "admit.lua"
API_KEY = "sk-bench"
# Large enough that the sliding window never rejects during a run.
HUGE_LIMIT = 1_000_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONVERSATION_BODY = (
    b'{"type":"threads.create","params":{"input":{"content":'
    b'[{"type":"input_text","text":"Hello from scripts/bench"}]}}}'
)
INSTALL_HINT = "install it with: apt-get install wrk nginx-light"
# Busy time no benchmark process explains, in % of one core, above which a run
# is flagged as disturbed by other work on the machine.
NOISE_LIMIT = 20


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


# -- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_tool(name: str) -> str | None:
    """A binary on PATH, or in /usr/sbin (Debian's nginx), which root's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


class Service:
    """A long-running child process pinned to some CPUs, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None,
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name.replace(' ', '-')}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # taskset execs the command, so this pid is the service itself.
        self.proc = subprocess.Popen(
            pinned(cpus, argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def wait_ready(self, ready: Callable[[], bool], *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """This process and its descendants (uvicorn and nginx workers)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                # Our own session (start_new_session): its workers go with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def answers(port: int, path: str = "/healthz") -> Callable[[], bool]:
    def check() -> bool:
        try:
            return http_request(port, "GET", path)[0] < 500
        except OSError:
            return False

    return check


# -- wrk -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str
    body: bytes | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": self.authorization, "OpenAI-Beta": "chatkit_beta=v1"}
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        return headers


# done() prints the figures as one JSON line: wrk's own text output rounds
# latencies and hides which socket errors happened.
_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script(request: Request, path: Path) -> Path:
    lines = [f'wrk.method = "{request.method}"']
    for name, value in request.headers().items():
        lines.append(f'wrk.headers["{name}"] = [==[{value}]==]')
    if request.body is not None:
        lines.append(f"wrk.body = [==[{request.body.decode()}]==]")
    path.write_text("\n".join(lines) + "\n" + _WRK_DONE)
    path.chmod(0o600)  # it holds a client secret, fake as it is
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non_2xx: int  # wrk counts responses with status >= 400
    socket_errors: dict[str, int]
    cpu_seconds: float  # wrk's own CPU time

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclass(frozen=True)
class WrkParams:
    connections: int
    threads: int
    duration: int  # wrk takes whole seconds
    warmup: int
    timeout: int = 10


def run_wrk(
    url: str, script: Path, params: WrkParams, *, seconds: int, cpus: str | None
) -> WrkResult:
    argv = pinned(
        cpus,
        [
            find_tool("wrk") or "wrk",
            f"--threads={params.threads}",
            f"--connections={params.connections}",
            f"--duration={seconds}s",
            f"--timeout={params.timeout}s",
            f"--script={script}",
            url,
        ],
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    secs = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"],
        seconds=secs,
        rps=raw["requests"] / secs,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        non_2xx=raw["status"],
        socket_errors={k: raw[k] for k in ("connect", "read", "write", "timeout") if raw[k]},
        cpu_seconds=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


# -- CPU accounting --------------------------------------------------------------


def core_jiffies() -> dict[int, list[int]]:
    """Per CPU: user nice system idle iowait irq softirq steal, in jiffies since boot."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                out[int(name[3:])] = [int(v) for v in values[:8]]
    return out


def process_jiffies(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total


class CpuWatch:
    """CPU used by named groups of processes, and by each core, over an interval.

    Figures are percent of one core. ``cpuN`` is how busy core N was; ``softirq``
    (loopback TCP is processed there, and charged to no process) and ``steal``
    (the hypervisor ran someone else) are summed over the cores.
    """

    def __init__(self, groups: dict[str, list[Service]]) -> None:
        self._pids = {
            name: [p for s in services for p in s.pids()] for name, services in groups.items()
        }
        self._cores = core_jiffies()
        self._procs = {name: process_jiffies(pids) for name, pids in self._pids.items()}

    def percent(self, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        procs = {
            name: 100 * (process_jiffies(pids) - self._procs[name]) / CLK_TCK / seconds
            for name, pids in self._pids.items()
        }
        cores: dict[str, float] = {"softirq": 0.0, "steal": 0.0}
        for cpu, now in core_jiffies().items():
            delta = [b - a for a, b in zip(self._cores[cpu], now, strict=True)]
            total = max(sum(delta), 1)
            cores[f"cpu{cpu}"] = 100 * (total - delta[3] - delta[4]) / total
            cores["softirq"] += 100 * delta[6] / total
            cores["steal"] += 100 * delta[7] / total
        return procs, cores


# -- Redis -------------------------------------------------------------------------


def script_commands() -> frozenset[str]:
    """Commands admit.lua issues itself: Redis counts those in commandstats too."""
    return frozenset(
        name.lower() for name in re.findall(r"redis\.call\('([A-Za-z]+)'", ADMIT_LUA.read_text())
    )


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since Redis started, leaving out our own INFO."""
    stats: dict[str, Any] = client.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in stats.items()
        if key.startswith("cmdstat_") and key != "cmdstat_info"
    }


def settled(read: Callable[[], Any], *, timeout: float = 5.0) -> Any:
    """Read until two reads 100 ms apart agree: requests in flight when wrk
    stopped are still being decided for a moment."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    return last


def gateway_decisions(port: int) -> int:
    status, _, body = http_request(port, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"gateway /metrics answered {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("chatkit_gateway_admission_decisions_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


@dataclass
class RedisFigures:
    requests: int
    decisions: int
    evalsha: int
    client_commands: int
    script_commands: int
    other: dict[str, int]

    @property
    def per_request(self) -> float:
        return self.client_commands / max(self.requests, 1)

    def plus(self, other: RedisFigures) -> RedisFigures:
        merged = dict(self.other)
        for name, count in other.other.items():
            merged[name] = merged.get(name, 0) + count
        return RedisFigures(
            requests=self.requests + other.requests,
            decisions=self.decisions + other.decisions,
            evalsha=self.evalsha + other.evalsha,
            client_commands=self.client_commands + other.client_commands,
            script_commands=self.script_commands + other.script_commands,
            other=merged,
        )


# -- targets ------------------------------------------------------------------------


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
        service.wait_ready(ready)
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
        # Stale GATEWAY_* variables from the caller's shell would change what is measured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(port),
            GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}",
            GATEWAY_WORKERS=str(self.args.workers),
            GATEWAY_LOG_LEVEL="warning",
            PYTHONUNBUFFERED="1",
        )
        if redis_url is not None:
            env["GATEWAY_REDIS_URL"] = redis_url
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


class RedisCounter:
    """Redis commands and gateway decisions over measured runs, summed."""

    def __init__(self, redis_port: int, gateway_port: int) -> None:
        self._client = redis.Redis(port=redis_port, socket_timeout=5)
        self._gateway_port = gateway_port
        self._inside = script_commands()
        self._calls: dict[str, int] = {}
        self._decisions = 0
        self.figures: RedisFigures | None = None

    def _read(self) -> tuple[dict[str, int], int]:
        return command_calls(self._client), gateway_decisions(self._gateway_port)

    def before(self) -> None:
        # Requests the warm-up left in flight are still being decided.
        self._calls, self._decisions = settled(self._read)

    def after(self, result: WrkResult) -> None:
        calls, decisions_now = settled(self._read)
        decisions = decisions_now - self._decisions
        delta = {
            name: count - self._calls.get(name, 0)
            for name, count in calls.items()
            if count != self._calls.get(name, 0)
        }
        evalsha = delta.pop("evalsha", 0)
        other = {name: n for name, n in delta.items() if name not in self._inside}
        run = RedisFigures(
            requests=result.requests,
            decisions=decisions,
            evalsha=evalsha,
            client_commands=evalsha + sum(other.values()),
            script_commands=sum(n for name, n in delta.items() if name in self._inside),
            other=other,
        )
        self.figures = run if self.figures is None else self.figures.plus(run)

    def close(self) -> None:
        self._client.close()


def nginx_conf(binary: str, workdir: Path, port: int, upstream_port: int) -> str:
    # Every temp path nginx was built with must point somewhere writable.
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    temp_paths = "".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if kind == "client_body" or kind == "proxy" or f"--http-{kind}-temp-path" in built
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""\
{user}worker_processes 1;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000000;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


# -- report ---------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def report(bench: Bench, layout: str) -> tuple[dict[str, Any], int]:
    """Print the tables; return the figures and the exit status."""
    rounds = bench.args.rounds
    out: dict[str, Any] = {
        "wrk": asdict(bench.params),
        "rounds": rounds,
        "layout": layout,
        "workers": bench.args.workers,
        "targets": [],
    }
    print()
    if rounds > 1:
        print(f"Each row is the round with the median req/s of {rounds}; errors are summed.")
    header = f"{'target':<28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
    print(header)
    print("-" * len(header))
    status = 0
    medians: dict[str, Run] = {}
    for outcome in bench.outcomes:
        run = outcome.median
        entry: dict[str, Any] = {
            "name": outcome.name,
            "request": f"{outcome.method} {outcome.path}",
            "skipped": outcome.skipped,
            "failed": outcome.failed,
            "warmup_errors": outcome.warmup_errors,
            "runs": [asdict(r) for r in outcome.runs],
        }
        out["targets"].append(entry)
        if outcome.failed:
            status = 1
        if run is None:
            why = f"FAILED: {outcome.failed.splitlines()[0]}" if outcome.failed else "skipped:"
            print(f"{outcome.name:<28}  {why} {outcome.skipped or ''}")
            continue
        medians[outcome.name] = run
        r = run.result
        entry["median"] = asdict(run)
        print(
            f"{outcome.name:<28}{r.rps:>10,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.max_ms:>9.2f}{outcome.errors:>8}"
        )
        if outcome.errors and status == 0:
            status = 3

    for outcome in bench.outcomes:
        for run in outcome.runs:
            if run.result.errors:
                print(
                    f"\n!!! {outcome.name}: {run.result.non_2xx} responses had a status >= 400 "
                    f"and the socket errors were {run.result.socket_errors or 'none'}: "
                    "these figures are NOT valid."
                )
        if outcome.warmup_errors:
            print(f"\n!!! {outcome.name}: {outcome.warmup_errors} errors during the warm-up.")
        if outcome.failed and "\n" in outcome.failed:
            print(f"\n!!! {outcome.name} FAILED:\n{outcome.failed}")
    if rounds > 1:
        print("\nreq/s of every round")
        for outcome in bench.outcomes:
            if outcome.runs:
                shown = ", ".join(f"{run.result.rps:,.0f}" for run in outcome.runs)
                print(f"  {outcome.name:<28}{shown}")

    print(
        "\nCPU during each measured run, in % of one core: the process under test (SUT) and"
        "\nits CPU time per request, the load side (wrk, backend fake upstream, redis), how"
        "\nbusy each core was, softirq (loopback TCP, charged to no process), 'other' (busy"
        "\ntime none of these explain: other work on the machine) and hypervisor steal"
    )
    print(
        f"{'target':<28}{'SUT':>6}{'us/req':>8}{'wrk':>6}{'upstr':>6}{'redis':>6}"
        f"{'cpu0':>6}{'cpu1':>6}{'sirq':>6}{'other':>6}{'steal':>6}"
    )

    def cell(value: float | None, width: int = 6) -> str:
        return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"

    for name, run in medians.items():
        p, c = run.cpu_percent, run.core_percent
        print(
            f"{name:<28}{cell(p['sut'])}{cell(p['sut_us_per_request'], 8)}"
            f"{cell(p.get('wrk'))}{cell(p.get('upstream'))}{cell(p.get('redis'))}"
            f"{cell(c.get('cpu0'))}{cell(c.get('cpu1'))}{cell(c['softirq'])}"
            f"{cell(c['other'])}{cell(c['steal'])}"
        )

    noisy = [name for name, run in medians.items() if run.core_percent["other"] > NOISE_LIMIT]
    if noisy:
        print(
            f"\n!!! other work on the machine took more than {NOISE_LIMIT}% of a core during: "
            f"{', '.join(noisy)}.\n!!! Those figures are disturbed: rerun on a quiet machine "
            "(or with --rounds 3)."
        )
    out["noisy"] = noisy

    def figure(name: str, what: str) -> float | None:
        run = medians.get(name)
        if run is None:
            return None
        if what == "cpu_us":
            return run.cpu_percent["sut_us_per_request"]
        return float(getattr(run.result, what))

    pairs = [
        ("gateway pass-through / upstream direct (req/s)", "gateway pass-through",
         "upstream direct", "rps", None),
        ("gateway pass-through / nginx (req/s)", "gateway pass-through",
         "nginx proxy_pass", "rps", None),
        # The admission budget, on the fair pair: the same GET, the same upstream
        # answer; the only difference is the admission decision in Redis.
        ("client GET (redis) / pass-through (req/s), target >= 0.90",
         "gateway client GET (redis)", "gateway pass-through", "rps", lambda v: v >= 0.9),
        ("client GET (redis) p99 / pass-through p99, target <= 1.20",
         "gateway client GET (redis)", "gateway pass-through", "p99_ms", lambda v: v <= 1.2),
        # The POST adds a request body to forward, which pass-through has not.
        ("client POST (redis) / pass-through (req/s)", "gateway client (redis)",
         "gateway pass-through", "rps", None),
        ("client POST (redis) p99 / pass-through p99", "gateway client (redis)",
         "gateway pass-through", "p99_ms", None),
        ("client POST (embedded) / client POST (redis) (req/s)", "gateway client (embedded)",
         "gateway client (redis)", "rps", None),
        ("client (redis) / pass-through, SUT CPU per request", "gateway client (redis)",
         "gateway pass-through", "cpu_us", None),
        ("client GET (redis) / pass-through, SUT CPU per request",
         "gateway client GET (redis)", "gateway pass-through", "cpu_us", None),
    ]  # fmt: skip
    print("\nRatios")
    out["ratios"] = {}
    for label, top, bottom, what, met in pairs:
        value = ratio(figure(top, what), figure(bottom, what))
        out["ratios"][label] = value
        verdict = ""
        if value is not None and met is not None:
            verdict = "  met" if met(value) else "  MISSED"
        if any(name in medians and medians[name].result.errors for name in (top, bottom)):
            verdict = "  INVALID: requests failed"
        shown = f"{value:.2f}x" if value is not None else "n/a"
        print(f"  {label:<62}{shown:>8}{verdict}")
    if rounds == 1:
        # Measured on the 2-core development VM: one round's req/s moved by up
        # to 15% between identical runs, with no other work on the machine.
        print("  (one round: repeat runs differ by up to ~15%; --rounds 3 before deciding)")

    figures = bench.redis_figures
    if figures is not None:
        print("\nRedis during 'gateway client (redis)' (INFO commandstats delta, measured runs)")
        print(
            f"  redis commands per client request: {figures.per_request:.2f} "
            f"(target 1.00; {figures.client_commands} client commands / "
            f"{figures.requests} requests wrk counted)"
        )
        print(
            f"  EVALSHA per request: {figures.evalsha / max(figures.requests, 1):.3f}; "
            f"per gateway decision: {figures.evalsha / max(figures.decisions, 1):.3f} "
            f"({figures.decisions} decisions; wrk leaves out requests in flight at its end)"
        )
        print(f"  commands run inside admit.lua (counted by Redis too): {figures.script_commands}")
        if figures.other:
            print(f"  other client commands: {figures.other}")
        out["redis"] = {**asdict(figures), "commands_per_request": figures.per_request}

    for note in bench.notes:
        print(f"\nnote: {note}")
    out["notes"] = bench.notes
    return out, status


def git_revision() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per target (10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up seconds (2; 0: none)")
    parser.add_argument("--quick", action="store_true", help="3 s per target, 1 s warm-up")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measured runs per target; the one with the median req/s is reported (1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("GATEWAY_WORKERS") or 1),
        help="gateway worker processes (default: $GATEWAY_WORKERS or 1)",
    )
    parser.add_argument("--sut-cpus", default="0", help="CPUs for what is measured (0)")
    parser.add_argument("--load-cpus", default="1", help="CPUs for wrk, backend, redis (1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and configs")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads < 1 or args.threads > args.connections:
        parser.error("--threads must be between 1 and --connections")
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1 or args.workers < 1:
        parser.error("--duration, --rounds and --workers must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if find_tool("wrk") is None:
        print(f"scripts/bench: wrk not found; {INSTALL_HINT}", file=sys.stderr)
        return 1
    if not args.no_pin and find_tool("taskset") is None:
        print("scripts/bench: taskset not found (util-linux); or pass --no-pin", file=sys.stderr)
        return 1
    layout = (
        "not pinned"
        if args.no_pin
        else f"system under test on CPU {args.sut_cpus}; wrk, backend fake upstream and "
        f"redis-server on CPU {args.load_cpus}"
    )
    load_start = os.getloadavg()[0]
    print(
        f"scripts/bench: wrk -t{args.threads} -c{args.connections}, {args.duration:g}s per target "
        f"after {args.warmup:g}s warm-up, {args.rounds} round(s); gateway workers={args.workers}\n"
        f"layout: {layout}; load average {load_start:.2f} at start"
    )
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-"))
    bench = Bench(args, workdir)
    try:
        bench.run()
    except BenchError as exc:
        print(f"\nscripts/bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        bench.stop_all()
        if args.keep_temp:
            print(f"temporary files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    data, status = report(bench, layout)
    load_end = os.getloadavg()[0]
    print(f"\nload average {load_end:.2f} at end")
    if args.json is not None:
        data["loadavg"] = {"start": load_start, "end": load_end}
        data["revision"] = git_revision()
        data["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
