"""Which upstream HTTP client makes the fastest proxy (measured, not assumed).

Run it as ``scripts/bench-clients`` (``python -m bench.clients``). It measures
minimal raw-ASGI reverse proxies that differ only in their upstream client,
under the server the gateway uses (uvicorn, uvloop, httptools, one worker, access log off), then the
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
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import BenchError
from bench.cpu import CpuWatch
from bench.probe import answers, http_request
from bench.wrk import (
    Request,
    WrkParams,
    add_load_arguments,
    resolve_durations,
    run_wrk,
    wrk_script,
)
from tests.processes import Service, free_port, gateway_env

PATH = "/v1/chatkit/threads?bench=1"
REQUEST = Request("GET", PATH, "Bearer sk-bench")

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


def get(port: int) -> tuple[int, bytes]:
    status, _, body = http_request(port, REQUEST.method, PATH, REQUEST.headers())
    return status, body


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


def wrk_params(args: argparse.Namespace) -> WrkParams:
    return WrkParams(
        connections=args.connections,
        threads=args.threads,
        duration=args.duration,
        warmup=args.warmup,
    )


def measure(args: argparse.Namespace, target: Target, script: Path) -> Run:
    watch = CpuWatch({"sut": [target.service]})
    url = f"http://127.0.0.1:{target.port}{PATH}"
    result = run_wrk(url, script, wrk_params(args), seconds=args.duration, cpus=args.load_cpus)
    procs, cores = watch.percent(result.seconds)
    return Run(
        rps=result.rps,
        requests=result.requests,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        cpu_us_per_request=procs["sut"] / 100 * 1e6 / max(result.rps, 1e-9),
        core_percent={k: v for k, v in cores.items() if k.startswith("cpu")},
    )


def start(service: Service, port: int) -> None:
    try:
        service.wait_ready(answers(port))
    except (RuntimeError, TimeoutError) as exc:
        raise BenchError(str(exc)) from None


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
        service = Service(name, argv, cpus=args.sut_cpus, workdir=workdir, env=env)
        targets.append(Target(name, port, service))
    port = free_port()
    extra = {"GATEWAY_WORKERS": "1", "GATEWAY_LOG_LEVEL": "warning"}
    env = gateway_env(env["BENCH_UPSTREAM"], port=port, extra=extra, base=env)
    argv = [sys.executable, "-m", "gateway", "serve"]
    service = Service("gateway", argv, cpus=args.sut_cpus, workdir=workdir, env=env)
    targets.append(Target("gateway", port, service))
    return targets


def bench(args: argparse.Namespace, workdir: Path, services: list[Service]) -> list[Target]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)]
    upstream = Service("upstream", argv, cpus=args.load_cpus, workdir=workdir)
    services.append(upstream)
    start(upstream, port)
    expected = get(port)
    targets = start_targets(args, workdir, port)
    services.extend(target.service for target in targets)
    script = wrk_script(REQUEST, workdir / "bench.lua")
    for target in targets:
        start(target.service, target.port)
        if get(target.port) != expected:  # a proxy that answers something else is no proxy
            raise BenchError(f"{target.name} answered {get(target.port)!r}, not {expected!r}")
        if args.warmup:
            url = f"http://127.0.0.1:{target.port}{PATH}"
            warm = run_wrk(url, script, wrk_params(args), seconds=args.warmup, cpus=args.load_cpus)
            target.warmup_errors = warm.errors
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
    add_load_arguments(parser, per="run", sut="the proxy under test", load="wrk and the upstream")
    args = parser.parse_args(argv)
    resolve_durations(args)
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
