"""The benchmark's own instruments: the paced SSE upstream and stream driver,
and the verdicts of the performance targets."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bench.report import Target
from bench.soak_streams import Cancel, Stream, StreamKeeper, cutoffs
from tests.fake_upstream import FakeUpstream
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


# -- the scale soak's stream instruments (bench/soak_streams.py) ----------------------


def _stream(session: str, sent: float, ended: float | None, status: int = 200) -> Stream:
    return Stream(session, "r", sent, status=status, ended=ended)


@pytest.mark.parametrize(
    ("stream", "cancel", "expected"),
    [
        # Closed 0.5 s after the cancel's answer: in time.
        (_stream("s", 1, 10.5), Cancel("s", 9, 10, False), {"delays": [0.5]}),
        # Closed 2.5 s after it: late.
        (_stream("s", 1, 12.5), Cancel("s", 9, 10, False), {"delays": [2.5], "late": [2.5]}),
        # The cut reached the client before the cancel's own answer: no delay.
        (_stream("s", 1, 9.5), Cancel("s", 9, 10, False), {"delays": [0.0]}),
        # Sent before the answer, admitted after it: must be cut all the same.
        (_stream("s", 9.9, 11), Cancel("s", 9, 10, False), {"delays": [1.0]}),
        # Still open when the soak ended: a failure of its own.
        (_stream("s", 1, None), Cancel("s", 9, 10, False), {"open_at_end": 1}),
        # Ended before the cancel was sent: not the cancel's doing, and unexplained.
        (_stream("s", 1, 5), Cancel("s", 9, 10, False), {"unexplained": 1}),
        # Another session's cancel explains nothing.
        (_stream("t", 1, 11), Cancel("s", 9, 10, False), {"unexplained": 1}),
        # A refused stream was never admitted: nothing to cut.
        (_stream("s", 1, 1.1, status=401), Cancel("s", 9, 10, False), {}),
        # A cancel answered "pending" is counted apart (the documented window).
        (_stream("s", 1, 13), Cancel("s", 9, 10, True), {"pending_delays": [3.0]}),
    ],
)
def test_stream_cutoffs_are_measured_from_the_cancels_answer(
    stream: Stream, cancel: Cancel, expected: dict[str, object]
) -> None:
    found = cutoffs([stream], [cancel], limit=2.0)
    assert {k: v for k, v in vars(found).items() if v} == expected


def test_a_stream_held_to_the_end_of_the_soak_is_not_unexplained() -> None:
    held = _stream("s", 1, 20)
    held.held = True
    assert not any(vars(cutoffs([held], [], limit=2.0)).values())


async def test_the_keeper_fills_its_population_replacing_streams_that_fail(
    upstream: FakeUpstream,
) -> None:
    # Straight at the fake upstream, which resets the first two: the keeper
    # only needs a server that streams.
    upstream.inject("reset", path_prefix="/v1/chatkit/conversation", times=2)
    async with aiohttp.ClientSession() as http:
        keeper = StreamKeeper(
            http,
            [upstream.url],
            lambda: [("cksess_1", "ek_1")],
            target=5,
            interval=60,
            rng=random.Random(1),
        )
        try:
            await keeper.fill(within=10)
            assert keeper.open == 5
            assert keeper.open_by_replica[upstream.url] == 5
            assert upstream.active == 5
        finally:
            await keeper.close()
    failed = [s for s in keeper.streams if s.status != 200]
    assert len(failed) == 2
    assert all(s.ended is not None and not s.held for s in failed)
    assert sum(s.held for s in keeper.streams) == 5
    assert keeper.open == 0
