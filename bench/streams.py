"""The stream targets of ``scripts/bench``: idle SSE streams and paced ones.

Driven by :mod:`bench.sse` (the paced upstream and the stream driver) through
a gateway in issuer mode, whose workflow's upstream is that paced server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench import BenchError
from bench.memory import open_fds, rss_bytes, settle
from tests.processes import Service, free_port, pinned

if TYPE_CHECKING:
    from bench.targets import Bench

STREAM_WORKFLOW = "wf_stream"


def stream_gateway(bench: Bench, sse_port: int, streams: int) -> tuple[Service, int]:
    return bench.gateway(
        "gateway (streams)",
        bench.backend_port,
        bench.redis_url,
        workers=1,
        extra={
            "GATEWAY_WORKFLOWS": json.dumps(
                {STREAM_WORKFLOW: {"upstream": f"http://127.0.0.1:{sse_port}/stream"}}
            ),
            # One upstream connection per open stream: the pool must hold them all.
            "GATEWAY_UPSTREAM_MAX_CONNECTIONS": str(streams + 64),
            # Held to the streams (the automatic cap is half the descriptor limit).
            "GATEWAY_MAX_CONNECTIONS": str(streams + 64),
        },
    )


def sse_upstream(bench: Bench) -> tuple[Service, int]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.sse", "serve", "--port", str(port)]
    service = Service("sse upstream", argv, cpus=bench.load_cpus, workdir=bench.workdir)

    def up() -> bool:
        try:
            with socket_to(port):
                return True
        except OSError:
            return False

    return bench.start(service, up), port


def drive(
    bench: Bench,
    port: int,
    path: str,
    secret: str | None,
    streams: int,
    *,
    hold: bool,
    seconds: float = 0,
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.sse", "drive", "--port", str(port), "--path", path,
            "--streams", str(streams), "--seconds", str(seconds)]  # fmt: skip
    if secret is not None:
        argv += ["--secret", secret]
    if hold:
        argv.append("--hold")
    return subprocess.Popen(
        pinned(bench.load_cpus, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def idle_streams(bench: Bench) -> None:
    """Idle SSE streams through one worker: memory per stream, and
    descriptors back where they were once the streams close."""
    count = bench.args.streams
    sse, sse_port = sse_upstream(bench)
    gw, port = stream_gateway(bench, sse_port, count)
    try:
        secret = bench.issued_secret(port, STREAM_WORKFLOW)
        # Warm the worker up with a few streams first, so what is measured
        # is per stream, not the first stream's imports and pools.
        warm = drive(bench, port, "/chatkit?interval=3600", secret, 50, hold=False, seconds=0.5)
        _figures(warm, "warm-up streams")
        rss_before = settle(lambda: rss_bytes(gw), timeout=5)
        fds_before = settle(lambda: open_fds(gw), timeout=5)
        print(f"  {count:,} idle streams: opening ...", end="", flush=True)
        driver = drive(bench, port, "/chatkit?interval=3600", secret, count, hold=True)
        line = driver.stdout.readline() if driver.stdout else ""
        if not line.startswith("OPEN"):
            driver.kill()
            raise BenchError(f"stream driver failed: {line!r} {driver.communicate()[1]}")
        rss_open = rss_bytes(gw)
        fds_open = open_fds(gw)
        print(f" {line.split()[1]} open, closing ...", end="", flush=True)
        if driver.stdin is not None:
            driver.stdin.write("\n")
            driver.stdin.flush()
        figures = _figures(driver, "idle streams")
        fds_after = settle(lambda: open_fds(gw), timeout=15, target=fds_before)
        rss_after = rss_bytes(gw)
        print(" done", flush=True)
        bench.idle_streams = IdleStreams(
            streams=count,
            opened=int(figures["opened"]),  # type: ignore[call-overload]
            failed=int(figures["failed"]),  # type: ignore[call-overload]
            open_seconds=float(figures["open_seconds"]),  # type: ignore[arg-type]
            rss_before=rss_before,
            rss_open=rss_open,
            rss_after=rss_after,
            fds_before=fds_before,
            fds_open=fds_open,
            fds_after=fds_after,
        )
    finally:
        bench.stop(gw)
        bench.stop(sse)


def paced_streams(bench: Bench) -> None:
    """Streams at one event per second: each event's delay, straight from
    the upstream and through the gateway (added = the difference)."""
    count = bench.args.paced_streams
    seconds = bench.args.paced_seconds
    sse, sse_port = sse_upstream(bench)
    gw, port = stream_gateway(bench, sse_port, count)
    try:
        secret = bench.issued_secret(port, STREAM_WORKFLOW)
        for name, target, path, auth in (
            ("direct", sse_port, "/stream?interval=1", None),
            ("gateway", port, "/chatkit?interval=1", secret),
        ):
            print(f"  {count:,} streams at 1 event/s, {name}: {seconds:g}s ...", end="")
            driver = drive(bench, target, path, auth, count, hold=False, seconds=seconds)
            bench.paced[name] = _figures(driver, f"paced streams ({name})")
            print(f" p99 {bench.paced[name]['p99_ms']} ms", flush=True)
    finally:
        bench.stop(gw)
        bench.stop(sse)


def _figures(driver: subprocess.Popen[str], what: str) -> dict[str, object]:
    out, err = driver.communicate(timeout=300)
    line = next((x for x in out.splitlines() if x.startswith("SSE_JSON ")), None)
    if driver.returncode != 0 or line is None:
        raise BenchError(f"{what}: the stream driver failed ({driver.returncode}):\n{err[-2000:]}")
    figures: dict[str, object] = json.loads(line.removeprefix("SSE_JSON "))
    if figures["failed"]:
        raise BenchError(f"{what}: {figures['failed']} streams failed to open:\n{err[-2000:]}")
    return figures


def socket_to(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=1)


@dataclass
class IdleStreams:
    streams: int
    opened: int
    failed: int
    open_seconds: float
    rss_before: int
    rss_open: int
    rss_after: int
    fds_before: int
    fds_open: int
    fds_after: int

    @property
    def kb_per_stream(self) -> float:
        return (self.rss_open - self.rss_before) / 1024 / max(self.opened, 1)
