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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import BenchError
from bench.report import report
from bench.targets import INSTALL_HINT, Bench
from bench.wrk import add_load_arguments, resolve_durations
from tests.processes import REPO_ROOT, find_tool


def git_revision() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO_ROOT,
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
    add_load_arguments(parser, per="target", sut="what is measured", load="wrk, backend, redis")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("GATEWAY_WORKERS") or 1),
        help="gateway worker processes (default: $GATEWAY_WORKERS or 1)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and configs")
    args = parser.parse_args(argv)
    resolve_durations(args)
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
