"""Driving a target with wrk, and reading its exact figures back."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench import BenchError
from tests.processes import find_tool, pinned


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


def add_load_arguments(parser: argparse.ArgumentParser, *, per: str, sut: str, load: str) -> None:
    """The options both benchmarks take: wrk's load, timing, rounds, CPUs, output.

    ``per`` names what is timed; ``sut`` and ``load`` what runs on each CPU set.
    """
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--duration", type=int, default=None, help=f"seconds per {per} (10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up seconds (2; 0: none)")
    parser.add_argument("--quick", action="store_true", help=f"3 s per {per}, 1 s warm-up")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measured runs per target; the one with the median req/s is reported (1)",
    )
    parser.add_argument("--sut-cpus", default="0", help=f"CPUs for {sut} (0)")
    parser.add_argument("--load-cpus", default="1", help=f"CPUs for {load} (1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")


def resolve_durations(args: argparse.Namespace) -> None:
    """Fill in --duration and --warmup from --quick where they were not given."""
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
