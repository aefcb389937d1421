"""The benchmark's own instruments: the paced SSE upstream and stream driver,
and the verdicts of the performance targets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import Target
from tests.processes import REPO_ROOT, Service, free_port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _drive(port: int, *args: str) -> dict[str, object]:
    argv = [sys.executable, "-m", "bench.sse", "drive", "--port", str(port), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    line = next(x for x in done.stdout.splitlines() if x.startswith("SSE_JSON "))
    figures: dict[str, object] = json.loads(line.removeprefix("SSE_JSON "))
    return figures


def test_paced_streams_are_measured_event_by_event_in_the_steady_state(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "bench.sse", "serve", "--port", str(port)]
    upstream = Service("sse upstream", argv, workdir=tmp_path)
    try:
        upstream.wait_ready(lambda: _accepts(port))
        figures = _drive(
            port, "--path", "/s?interval=0.1", "--streams", "20",
            "--seconds", "1", "--settle", "0.2",
        )  # fmt: skip
    finally:
        upstream.stop()
    assert figures["opened"] == 20
    assert figures["failed"] == 0
    # 20 streams at 10 events/s for one second, give or take the window's edges;
    # the first event of each stream (which carries the request) is not counted.
    assert 150 <= int(str(figures["events"])) <= 250
    assert 0 <= float(str(figures["p50_ms"])) < 100


def test_a_stream_refused_by_the_server_counts_as_failed() -> None:
    # Nothing listens: every connection is refused.
    figures = _drive(free_port(), "--path", "/s", "--streams", "3", "--seconds", "0")
    assert figures["opened"] == 0
    assert figures["failed"] == 3


@pytest.mark.parametrize(
    ("value", "invalid", "verdict"),
    [
        (0.85, False, "PASS"),  # meets ">= 0.8"
        (0.75, False, "MISS"),  # falls short
        (None, False, "n/a"),  # not measured in this run
        (0.85, True, "INVALID"),  # some request failed: the ratio means nothing
    ],
)
def test_target_verdicts(value: float | None, invalid: bool, verdict: str) -> None:
    target = Target("1 throughput", "a / b", value, ">= 0.80x", lambda v: v >= 0.8, invalid)
    assert target.verdict == verdict


def test_a_target_without_a_goal_is_information() -> None:
    assert Target("4 under a flood", "a / b", 0.6, "(info)", None).verdict == "info"
