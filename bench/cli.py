"""The gateway's performance targets, each against its baseline, in one run.

Run it as ``scripts/bench`` (it needs the project's venv). It starts every
process itself on free 127.0.0.1 ports and drives them with wrk (64
connections unless ``--connections``) and, for streams, ``bench/sse.py``:

- ``upstream direct``, ``nginx proxy_pass``: the fake ChatKit API alone and
  behind nginx, for scale;
- ``minimal proxy``: the ~40-line raw-ASGI + aiohttp proxy of
  ``bench/clients.py``, the baseline of the throughput, latency and memory
  targets;
- ``gateway pass-through`` (no decision), ``gateway client (redis)`` (a small
  JSON POST decided in Redis), ``gateway client GET (redis)``, ``gateway
  client (embedded)``, ``gateway issued turn`` and ``gateway issued read``
  (issuer mode: ``POST /chatkit`` with a secret the gateway minted, its
  envelope read and classed, identity headers added);
- ``... c1``: the same POST over one connection (added latency, pauses);
- ``gateway 401 unknown secret``, ``gateway 429 over limit``: floods of
  rejections, and ``gateway client under 401 flood``: admitted traffic
  measured while a second wrk floods 401s;
- ``gateway 1 worker`` / ``2 workers``: everything on both cores;
- idle SSE streams through one worker (RSS per stream, descriptors after they
  close) and streams at one event per second (each event's delay, direct and
  through the gateway).

Behind every proxy, nginx answers ``?bench=1`` with the fake upstream's
constant body and passes the rest (session creates) to the fake, so every
row gets the same answer and the load core does not saturate first. The
system under test runs on ``--sut-cpus`` (CPU 0); wrk, the upstreams and
redis-server on ``--load-cpus`` (CPU 1). With ``--rounds`` the gateway's rows
alternate within each round and each row is the round with the median
throughput. The report ends with every target, its ratio and PASS or MISS.

Temporary files (logs, configs, wrk scripts) live in a directory under
$TMPDIR, removed at the end unless ``--keep-temp``. Exit status: 0 success,
1 wrk is missing or a process or target failed, 2 bad arguments, 3 some request
was answered unexpectedly or failed on the socket (the figures are then not
comparable). Runs disturbed by other work on the machine are flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import BenchError
from bench.report import markdown, report
from bench.targets import INSTALL_HINT, PARTS, Bench
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
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="idle SSE streams held at once (10000; quick 2000)",
    )
    parser.add_argument(
        "--paced-streams",
        type=int,
        default=None,
        help="streams receiving one event per second (1000; quick 200)",
    )
    parser.add_argument(
        "--paced-seconds", type=float, default=None, help="how long they run (10; quick 4)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated parts to run, of: {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="also write docs/performance.md's tables here"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and configs")
    args = parser.parse_args(argv)
    resolve_durations(args)
    if args.streams is None:
        args.streams = 2000 if args.quick else 10_000
    if args.paced_streams is None:
        args.paced_streams = 200 if args.quick else 1000
    if args.paced_seconds is None:
        args.paced_seconds = 4.0 if args.quick else 10.0
    args.only = set(PARTS) if args.only is None else set(args.only.split(","))
    if not args.only <= set(PARTS):
        parser.error(f"--only takes some of: {', '.join(PARTS)}")
    if args.threads < 1 or args.threads > args.connections:
        parser.error("--threads must be between 1 and --connections")
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1 or args.workers < 1:
        parser.error("--duration, --rounds and --workers must be >= 1, --warmup >= 0")
    return args


def fit_streams(args: argparse.Namespace) -> str | None:
    """Raise the descriptor limit the children inherit to what the streams need,
    or hold fewer streams; returns a note when it had to.

    Every stream is two descriptors in the gateway (client and upstream) and
    one each in the driver and the upstream. The gateway admits connections up
    to half its limit less a reserve (gateway/protocol.py). Raising the hard
    limit needs CAP_SYS_RESOURCE, which even root may lack in a container.
    """
    need = 2 * args.streams + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
        return None
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fitted = max((hard - 1024) // 2, 0)
    note = (
        f"descriptor limit {hard} and it cannot be raised here: {fitted:,} idle streams "
        f"instead of {args.streams:,} (raise the hard limit of `ulimit -n` for more)"
    )
    args.streams = fitted
    return note


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fd_note = fit_streams(args)
    if find_tool("wrk") is None:
        print(f"scripts/bench: wrk not found; {INSTALL_HINT}", file=sys.stderr)
        return 1
    if not args.no_pin and find_tool("taskset") is None:
        print("scripts/bench: taskset not found (util-linux); or pass --no-pin", file=sys.stderr)
        return 1
    layout = (
        "not pinned"
        if args.no_pin
        else f"system under test on CPU {args.sut_cpus}; wrk, the nginx and fake upstreams "
        f"and redis-server on CPU {args.load_cpus}"
    )
    load_start = os.getloadavg()[0]
    print(
        f"scripts/bench: wrk -t{args.threads} -c{args.connections}, {args.duration:g}s per target "
        f"after {args.warmup:g}s warm-up, {args.rounds} round(s); gateway workers={args.workers}\n"
        f"layout: {layout}; load average {load_start:.2f} at start"
    )
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-"))
    bench = Bench(args, workdir)
    if fd_note is not None:
        print(f"note: {fd_note}")
        bench.notes.append(fd_note)
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
    if args.markdown is not None:
        args.markdown.write_text(markdown(bench, data))
        print(f"tables written to {args.markdown}")
    if args.json is not None:
        data["loadavg"] = {"start": load_start, "end": load_end}
        data["revision"] = git_revision()
        data["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
