"""Which upstream HTTP client makes the fastest proxy (measured, not assumed).

Run it as ``scripts/bench-clients``. It measures minimal raw-ASGI reverse
proxies that differ only in their upstream client, under the server the
gateway uses (uvicorn, uvloop, httptools, one worker, access log off), then the
real gateway's pass-through route as the last row:

1. ``aiohttp``: one shared ``aiohttp.ClientSession`` (pooled, trust_env off,
   auto_decompress off);
2. ``httpx2``: one shared ``httpx2.AsyncClient``, if importable;
3. ``httpx``: the same code on ``httpx.AsyncClient``, if importable;
4. ``gateway``: ``python -m gateway serve``, ``GET /v1/chatkit/threads``.

Every proxy forwards the method, path and query, the headers less hop-by-hop
ones and Host, and the request body as a stream, and streams the response back.
wrk drives ``GET /v1/chatkit/threads?bench=1`` (the fake upstream answers any
route with one small constant body). The proxy under test is pinned to CPU 0;
wrk and the fake upstream share CPU 1. ``us/req`` is the proxy's CPU time
(utime + stime from /proc) over the measured run divided by the requests wrk
counted. Rounds alternate between targets; each row is the round with the
median req/s. Exit status: 0 success, 1 a tool or process failed, 3 some
request failed (the figures are then not comparable).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
PATH = "/v1/chatkit/threads?bench=1"
HEADERS = {"Authorization": "Bearer sk-bench"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# What every candidate shares; each adds start(), stop() and forward().
PROXY_COMMON = """
import os

UPSTREAM = os.environ["BENCH_UPSTREAM"]
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
       b"transfer-encoding", b"upgrade", b"host"}


def forwardable(headers):
    named = {t.strip().lower() for n, v in headers if n.lower() == b"connection"
             for t in v.split(b",")}
    return [(n, v) for n, v in headers if n.lower() not in HOP and n.lower() not in named]


async def request_body(receive):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away during the upload")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
    target = UPSTREAM + scope["raw_path"].decode("latin-1")
    if scope["query_string"]:
        target += "?" + scope["query_string"].decode("latin-1")
    framed = any(n in (b"content-length", b"transfer-encoding") for n, _ in scope["headers"])
    body = request_body(receive) if framed else None
    await forward(scope["method"], target, forwardable(scope["headers"]), body, send)
"""

# Appended last: the server settings of gateway/server.py, minus its own protocol class.
RUNNER = """

if __name__ == "__main__":
    import sys
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                lifespan="on", proxy_headers=False, server_header=False, date_header=False,
                access_log=False, log_level="warning", ws="none")
"""

PROXY_AIOHTTP = """
import aiohttp
from multidict import CIMultiDict
from yarl import URL

session = None


async def start():
    global session
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60),
        auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
        # Forward the caller's headers only, as the httpx candidates do.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


async def stop():
    await session.close()


async def forward(method, target, headers, body, send):
    sent = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)
    url = URL(target, encoded=True)
    async with session.request(method, url, headers=sent, data=body,
                               allow_redirects=False) as response:
        await send({"type": "http.response.start", "status": response.status,
                    "headers": forwardable(response.raw_headers)})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
"""

# Identical for httpx and httpx2: only the imported module differs.
PROXY_HTTPX = """
import MODULE as httpx

client = None


async def start():
    global client
    client = httpx.AsyncClient(
        trust_env=False, follow_redirects=False,
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
        timeout=httpx.Timeout(60.0, connect=10.0, pool=10.0),
    )
    for name in list(client.headers):  # no default Accept, User-Agent, ...
        del client.headers[name]


async def stop():
    await client.aclose()


async def forward(method, target, headers, body, send):
    request = client.build_request(method, target, headers=headers, content=body)
    response = await client.send(request, stream=True)
    try:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": forwardable(response.headers.raw)})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        await response.aclose()
    await send({"type": "http.response.body", "body": b""})
"""

# done() prints exact percentiles as JSON (wrk's text output rounds them).
WRK_LUA = """
wrk.headers["Authorization"] = "Bearer sk-bench"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,'
    .. '"p99_us":%d,"errors":%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", PATH, headers=HEADERS)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Service:
    """A child process pinned to some CPUs, its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], cpus: str, workdir: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # taskset execs the command, so this pid is the server process itself.
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpus, *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def wait_ready(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                get(port)
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout:g}s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def cpu_ticks(self) -> int:
        """utime + stime of the process, all threads, in clock ticks."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def core_busy() -> dict[str, list[int]]:
    """Per CPU: (busy, total) jiffies since boot, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in values[:8]]
            out[name] = [sum(ticks) - ticks[3] - ticks[4], sum(ticks)]
    return out


@dataclass
class Run:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float
    core_percent: dict[str, float]


@dataclass
class Target:
    name: str
    port: int
    service: Service
    warmup_errors: int = 0
    runs: list[Run] = field(default_factory=list)

    @property
    def median(self) -> Run:
        """The round with the median req/s (the lower one of an even count)."""
        ranked = sorted(self.runs, key=lambda run: run.rps)
        return ranked[(len(ranked) - 1) // 2]


def run_wrk(args: argparse.Namespace, port: int, seconds: int, script: Path) -> dict[str, int]:
    argv = ["taskset", "-c", args.load_cpus, "wrk", f"-t{args.threads}", f"-c{args.connections}"]
    argv += [f"-d{seconds}s", "--timeout=10s", f"--script={script}"]
    done = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    figures: dict[str, int] = json.loads(line.removeprefix("BENCH_JSON "))
    return figures


def measure(args: argparse.Namespace, target: Target, script: Path) -> Run:
    cores, ticks = core_busy(), target.service.cpu_ticks()
    raw = run_wrk(args, target.port, args.duration, script)
    used_us = (target.service.cpu_ticks() - ticks) / CLK_TCK * 1e6
    after = core_busy()
    percent = {
        cpu: 100 * (after[cpu][0] - busy) / max(after[cpu][1] - total, 1)
        for cpu, (busy, total) in cores.items()
    }
    return Run(
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        requests=raw["requests"],
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=raw["errors"],
        cpu_us_per_request=used_us / max(raw["requests"], 1),
        core_percent=percent,
    )


def start_targets(args: argparse.Namespace, workdir: Path, upstream: int) -> list[Target]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "BENCH_"))}
    env.update(PYTHONUNBUFFERED="1", BENCH_UPSTREAM=f"http://127.0.0.1:{upstream}")
    candidates = [("aiohttp", PROXY_AIOHTTP)]
    for module in ("httpx2", "httpx"):
        if importlib.util.find_spec(module) is None:
            print(f"  {module}: not importable in {sys.executable}, not measured")
        else:
            candidates.append((module, PROXY_HTTPX.replace("MODULE", module)))
    targets = []
    for name, code in candidates:
        path = workdir / f"proxy_{name}.py"
        path.write_text(PROXY_COMMON + code + RUNNER)
        port = free_port()
        argv = [sys.executable, str(path), str(port)]
        targets.append(Target(name, port, Service(name, argv, args.sut_cpus, workdir, env)))
    port = free_port()
    gateway_env = dict(env, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port))
    gateway_env.update(GATEWAY_UPSTREAM_URL=env["BENCH_UPSTREAM"], GATEWAY_WORKERS="1")
    gateway_env.update(GATEWAY_LOG_LEVEL="warning")
    argv = [sys.executable, "-m", "gateway", "serve"]
    targets.append(
        Target("gateway", port, Service("gateway", argv, args.sut_cpus, workdir, gateway_env))
    )
    return targets


def bench(args: argparse.Namespace, workdir: Path, services: list[Service]) -> list[Target]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)]
    upstream = Service("upstream", argv, args.load_cpus, workdir, dict(os.environ))
    services.append(upstream)
    upstream.wait_ready(port)
    expected = get(port)
    targets = start_targets(args, workdir, port)
    services.extend(target.service for target in targets)
    script = workdir / "bench.lua"
    script.write_text(WRK_LUA)
    for target in targets:
        target.service.wait_ready(target.port)
        if get(target.port) != expected:  # a proxy that answers something else is no proxy
            raise BenchError(f"{target.name} answered {get(target.port)!r}, not {expected!r}")
        if args.warmup:
            target.warmup_errors = run_wrk(args, target.port, args.warmup, script)["errors"]
    for round_ in range(1, args.rounds + 1):
        for target in targets:  # alternate, so drift on the machine hits every target
            run = measure(args, target, script)
            target.runs.append(run)
            shown = f" ({run.errors} ERRORS)" if run.errors else ""
            print(f"  round {round_} {target.name}: {run.rps:,.0f} req/s{shown}", flush=True)
            if run.errors:
                print(target.service.tail())
    return targets


def report(targets: list[Target]) -> dict[str, object]:
    print(
        f"\n{'target':<10}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}{'us/req':>8}"
        f"{'cpu0%':>7}{'cpu1%':>7}   req/s of every round"
    )
    for t in targets:
        m = t.median
        rounds = ", ".join(f"{run.rps:,.0f}" for run in t.runs)
        errors = sum(run.errors for run in t.runs) + t.warmup_errors
        print(
            f"{t.name:<10}{m.rps:>9,.0f}{m.p50_ms:>8.2f}{m.p99_ms:>8.2f}{errors:>8}"
            f"{m.cpu_us_per_request:>8.0f}{m.core_percent.get('cpu0', 0):>7.0f}"
            f"{m.core_percent.get('cpu1', 0):>7.0f}   {rounds}"
        )
    base = targets[0].median
    print(f"\nratios against {targets[0].name} (req/s higher is better, the rest lower)")
    print(f"{'target':<10}{'req/s':>8}{'p50':>8}{'p99':>8}{'us/req':>8}")
    ratios: dict[str, dict[str, float]] = {}
    for t in targets[1:]:
        m = t.median
        ratios[t.name] = {
            "rps": m.rps / base.rps,
            "p50": m.p50_ms / max(base.p50_ms, 1e-9),
            "p99": m.p99_ms / max(base.p99_ms, 1e-9),
            "cpu_us_per_request": m.cpu_us_per_request / max(base.cpu_us_per_request, 1e-9),
        }
        print(f"{t.name:<10}" + "".join(f"{v:>7.2f}x" for v in ratios[t.name].values()))
    return {
        "targets": {
            t.name: {
                "median": asdict(t.median),
                "rounds": [asdict(run) for run in t.runs],
                "warmup_errors": t.warmup_errors,
            }
            for t in targets
        },
        "ratios_vs_aiohttp": ratios,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per run (10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up seconds (2)")
    parser.add_argument("--quick", action="store_true", help="3 s per run, 1 s warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="measured runs per target (1)")
    parser.add_argument("--sut-cpus", default="0", help="CPUs for the proxy under test (0)")
    parser.add_argument("--load-cpus", default="1", help="CPUs for wrk and the upstream (1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"scripts/bench-clients: {', '.join(missing)} not found", file=sys.stderr)
        return 1
    print(
        f"scripts/bench-clients: wrk -t{args.threads} -c{args.connections}, GET {PATH}, "
        f"{args.duration}s per run after {args.warmup}s warm-up, {args.rounds} round(s)\n"
        f"proxy under test on CPU {args.sut_cpus}; wrk and fake upstream on CPU "
        f"{args.load_cpus}; load average {os.getloadavg()[0]:.2f} at start"
    )
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-clients-"))
    services: list[Service] = []
    try:
        targets = bench(args, workdir, services)
    except BenchError as exc:
        print(f"\nscripts/bench-clients: {exc}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    data = report(targets)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    if args.json is not None:
        data["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"figures written to {args.json}")
    failed = sum(t.warmup_errors + sum(run.errors for run in t.runs) for t in targets)
    if failed:
        print(f"\n!!! {failed} request(s) failed: the figures are not comparable")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
