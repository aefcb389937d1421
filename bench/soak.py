"""A long soak of mixed traffic with faults on a schedule; the gateway's promises checked.

Two gateway replicas share a Redis (AOF, fsync always); the fake upstream
plays OpenAI's hosted API. Client tasks send JSON and SSE requests with
sessions' secrets through any replica while a scheduler, in turn:

- cancels a session through one replica and creates a replacement;
- pauses Redis (SIGSTOP) for 2 s, and restarts it (SIGTERM, AOF replay);
- makes the upstream reset connections and answer 500 for a while.

At the end it reports, and exits non-zero unless:

- no request sent after a cancel was answered (``stored``) was admitted;
- no session was certainly over-admitted: ``limit + 1`` admissions whose
  send-to-answer intervals all fit inside one window (sound: it never flags
  a legal schedule, since each admission happened inside its interval);
- the replicas' RSS and open descriptors ended flat (growth within bounds).

``--scale`` runs three replicas and, beside that traffic, holds 5,000 SSE
streams open (``--streams``) on sessions of their own, one of which is
cancelled every few seconds and replaced (bench/soak_streams.py). It also
fails unless every admitted stream of a cancelled session was closed,
whichever replica served it, within 2 s of the cancel's answer.

Run: ``scripts/soak`` (10 minutes), ``scripts/soak --minutes 1``, or
``scripts/soak --scale``. Traffic goes to 127.0.0.1 only and every loop is
bounded by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
import openai
from openai import AsyncOpenAI

from bench.soak_streams import Cancel, Stream, StreamKeeper, cutoffs
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisServer

API_KEY = "sk-soak"
#: Descriptors the soak's process needs per stream: its client socket and the
#: fake upstream's end of the replica's upstream connection.
FDS_PER_STREAM = 2
#: Seconds between samples of the replicas' RSS and descriptors.
WATCH_SECONDS = 10


@dataclass
class Session:
    id: str
    secret: str
    limit: int
    cancelled_at: float | None = None  # when the cancel's 200 arrived
    pending: bool = False  # the cancel's revocation was answered "pending"


@dataclass
class Sample:
    session: str
    sent: float
    answered: float
    status: int


@dataclass
class Report:
    samples: list[Sample] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    faults: list[str] = field(default_factory=list)
    errors: int = 0
    rss_kb: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    fds: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    cancels: list[Cancel] = field(default_factory=list)  # of stream sessions


def _proc_figures(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sessions: dict[str, Session] = {}
        self.retired: list[Session] = []
        self.stream_sessions: dict[str, Session] = {}
        self.keeper: StreamKeeper | None = None
        self.fd_limit = 0  # the replicas' soft RLIMIT_NOFILE
        self.report = Report()
        self.deadline = 0.0

    async def run(self) -> int:
        if self.args.streams:
            _raise_fd_limit(FDS_PER_STREAM * self.args.streams + 4096)
        with RedisServer(appendonly=True, appendfsync="always") as redis:
            async with FakeUpstream(record=False) as fake:
                env = {
                    "GATEWAY_WINDOW_SECONDS": str(self.args.window),
                    "GATEWAY_REDIS_TIMEOUT": "0.5",
                    # Longer than the pause between a held stream's events.
                    "GATEWAY_UPSTREAM_READ_TIMEOUT": str(
                        max(5, 3 * self.args.stream_interval if self.args.streams else 0)
                    ),
                    "GATEWAY_LOG_LEVEL": "warning",
                }
                replicas = [
                    GatewayProcess(fake.url, redis_url=redis.url, env=env)
                    for _ in range(self.args.replicas)
                ]
                await asyncio.gather(*(r.astart() for r in replicas))
                self.fd_limit = _fd_limit(replicas[0].proc.pid)
                try:
                    await self._soak(redis, fake, tuple(replicas))
                finally:
                    await asyncio.gather(*(r.astop() for r in replicas))
        return self._verdict()

    async def _soak(
        self, redis: RedisServer, fake: FakeUpstream, replicas: tuple[GatewayProcess, ...]
    ) -> None:
        for _ in range(self.args.sessions):
            await self._new_session(replicas[0])
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            tasks = []
            if self.args.streams:
                await self._open_streams(http, replicas)
            self.deadline = time.monotonic() + self.args.minutes * 60
            if self.keeper is not None:
                tasks.append(asyncio.create_task(self.keeper.keep(self.deadline)))
                tasks.append(asyncio.create_task(self._cancel_streams(replicas)))
            tasks += [
                asyncio.create_task(self._client(http, replicas)) for _ in range(self.args.clients)
            ]
            tasks.append(asyncio.create_task(self._rotate(replicas)))
            tasks.append(asyncio.create_task(self._faults(redis, fake)))
            tasks.append(asyncio.create_task(self._watch(replicas)))
            try:
                await asyncio.gather(*tasks)
            finally:
                if self.keeper is not None:
                    await self.keeper.close()

    # -- the scale soak's streams ------------------------------------------------------

    async def _open_streams(
        self, http: aiohttp.ClientSession, replicas: tuple[GatewayProcess, ...]
    ) -> None:
        count = max(1, self.args.streams // self.args.streams_per_session)
        for _ in range(count):
            await self._new_stream_session(replicas[len(self.stream_sessions) % len(replicas)])
        self.keeper = StreamKeeper(
            http,
            [r.url for r in replicas],
            lambda: [(s.id, s.secret) for s in self.stream_sessions.values()],
            target=self.args.streams,
            interval=self.args.stream_interval,
            rng=self.rng,
        )
        started = time.monotonic()
        await self.keeper.fill(within=max(120.0, self.args.streams / 20))
        print(
            f"soak: {self.args.streams} streams open after {time.monotonic() - started:.1f} s",
            flush=True,
        )

    async def _new_stream_session(self, gateway: GatewayProcess) -> None:
        # Far above what its streams need: a stream is refused only when revoked.
        limit = 10 * self.args.streams_per_session
        for _ in range(50):
            try:
                async with AsyncOpenAI(
                    api_key=API_KEY, base_url=f"{gateway.url}/v1", max_retries=0, timeout=5
                ) as client:
                    created = await client.beta.chatkit.sessions.create(
                        user=f"streamer_{self.rng.randrange(1000)}",
                        workflow={"id": "wf_soak_streams"},
                        rate_limits={"max_requests_per_1_minute": limit},
                    )
            except openai.OpenAIError:
                self.report.errors += 1
                await asyncio.sleep(0.2)
                continue
            session = Session(created.id, created.client_secret, limit)
            self.stream_sessions[created.id] = session
            return

    async def _cancel_streams(self, replicas: tuple[GatewayProcess, ...]) -> None:
        """Cancel a stream session every so often and replace it."""
        while time.monotonic() < self.deadline - 5:
            await asyncio.sleep(self.args.stream_cancel_every)
            victim = self.stream_sessions.pop(self.rng.choice(list(self.stream_sessions)))
            gateway = self.rng.choice(replicas)
            sent = time.monotonic()
            try:
                async with AsyncOpenAI(
                    api_key=API_KEY, base_url=f"{gateway.url}/v1", max_retries=3, timeout=5
                ) as client:
                    raw = await client.beta.chatkit.sessions.with_raw_response.cancel(victim.id)
            except openai.OpenAIError:  # not cancelled: back in play
                self.report.errors += 1
                self.stream_sessions[victim.id] = victim
                continue
            victim.cancelled_at = time.monotonic()
            victim.pending = raw.headers.get("x-chatkit-gateway-revocation") == "pending"
            self.report.cancels.append(Cancel(victim.id, sent, victim.cancelled_at, victim.pending))
            self.retired.append(victim)
            await self._new_stream_session(self.rng.choice(replicas))

    async def _new_session(self, gateway: GatewayProcess) -> None:
        limit = self.rng.choice((10, 30, 60))
        for _ in range(50):  # a fault may be on: retry within bounds
            try:
                async with AsyncOpenAI(
                    api_key=API_KEY, base_url=f"{gateway.url}/v1", max_retries=0, timeout=5
                ) as client:
                    created = await client.beta.chatkit.sessions.create(
                        user=f"user_{self.rng.randrange(8)}",
                        workflow={"id": "wf_soak"},
                        rate_limits={"max_requests_per_1_minute": limit},
                    )
            except openai.OpenAIError:  # any failure is retried, and counted
                self.report.errors += 1
                await asyncio.sleep(0.2)
                continue
            self.sessions[created.id] = Session(created.id, created.client_secret, limit)
            return

    async def _client(
        self, http: aiohttp.ClientSession, replicas: tuple[GatewayProcess, ...]
    ) -> None:
        while time.monotonic() < self.deadline:
            pool = list(self.sessions.values()) + self.retired[-20:]
            session = self.rng.choice(pool)
            gateway = self.rng.choice(replicas)
            stream = self.rng.random() < 0.2
            url = f"{gateway.url}/v1/chatkit/conversation"
            headers = {"Authorization": f"Bearer {session.secret}"}
            if stream:
                url += "?events=3&interval=0.05"
                headers["Accept"] = "text/event-stream"
            sent = time.monotonic()
            try:
                async with http.post(
                    url, json={}, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            answered = time.monotonic()
            self.report.statuses[status] += 1
            self.report.samples.append(Sample(session.id, sent, answered, status))
            await asyncio.sleep(self.rng.uniform(0, 0.02))

    async def _rotate(self, replicas: tuple[GatewayProcess, ...]) -> None:
        while time.monotonic() < self.deadline:
            await asyncio.sleep(self.args.cancel_every)
            victim = self.rng.choice(list(self.sessions.values()))
            gateway = self.rng.choice(replicas)
            try:
                async with AsyncOpenAI(
                    api_key=API_KEY, base_url=f"{gateway.url}/v1", max_retries=3, timeout=5
                ) as client:
                    raw = await client.beta.chatkit.sessions.with_raw_response.cancel(victim.id)
            except openai.OpenAIError:  # a failed cancel leaves the session in play
                self.report.errors += 1
                continue
            victim.cancelled_at = time.monotonic()
            victim.pending = raw.headers.get("x-chatkit-gateway-revocation") == "pending"
            del self.sessions[victim.id]
            self.retired.append(victim)
            await self._new_session(self.rng.choice(replicas))

    async def _faults(self, redis: RedisServer, fake: FakeUpstream) -> None:
        cycle = 0
        while time.monotonic() < self.deadline - 10:
            await asyncio.sleep(self.args.fault_every)
            kind = ("pause", "restart", "upstream")[cycle % 3]
            cycle += 1
            self.report.faults.append(f"{time.strftime('%H:%M:%S')} {kind}")
            if kind == "pause":
                redis.pause()
                await asyncio.sleep(2)
                redis.resume()
            elif kind == "restart":
                await asyncio.to_thread(redis.restart)
            else:
                fake.inject("reset", path_prefix="/v1/chatkit/conversation", times=20)
                fake.inject("status", status=500, path_prefix="/v1/chatkit/conversation", times=20)

    async def _watch(self, replicas: tuple[GatewayProcess, ...]) -> None:
        await asyncio.sleep(min(30, self.args.minutes * 15))  # warm-up before the baseline
        while True:
            for gateway in replicas:
                rss, fds = _proc_figures(gateway.proc.pid)
                if self.keeper is not None:
                    # Two per stream it relays (client and upstream side): the
                    # population moves by a cancelled session's streams at any
                    # moment, so what must stay flat is the rest.
                    fds -= 2 * self.keeper.open_by_replica[gateway.url]
                self.report.rss_kb[gateway.url].append(rss)
                self.report.fds[gateway.url].append(fds)
            if time.monotonic() >= self.deadline:
                return
            await asyncio.sleep(min(WATCH_SECONDS, max(self.deadline - time.monotonic(), 0.1)))

    # -- the verdict -----------------------------------------------------------------

    def _verdict(self) -> int:
        by_session: dict[str, list[Sample]] = defaultdict(list)
        for sample in self.report.samples:
            if sample.status == 200:
                by_session[sample.session].append(sample)
        streams = self.keeper.streams if self.keeper is not None else []
        for stream in streams:
            if stream.status == 200 and stream.started is not None:
                by_session[stream.session].append(
                    Sample(stream.session, stream.sent, stream.started, stream.status)
                )
        every = {
            s.id: s
            for s in [*self.sessions.values(), *self.stream_sessions.values(), *self.retired]
        }
        revoked_admitted = pending_admitted = over = 0
        for session_id, admitted in by_session.items():
            session = every[session_id]
            if session.cancelled_at is not None:
                late = [s for s in admitted if s.sent > session.cancelled_at]
                if session.pending:
                    pending_admitted += len(late)
                else:
                    revoked_admitted += len(late)
            admitted.sort(key=lambda s: s.sent)
            k = session.limit + 1
            for i in range(len(admitted) - k + 1):
                group = admitted[i : i + k]
                if max(s.answered for s in group) - group[0].sent < self.args.window:
                    over += 1
                    break
        total = len(self.report.samples)
        print(
            f"soak: {self.args.minutes} min, {self.args.clients} clients, "
            f"{self.args.replicas} replicas, window {self.args.window} s, "
            f"{len(every)} sessions ({len(self.retired)} cancelled)"
        )
        print(f"requests: {total}  by status: {dict(sorted(self.report.statuses.items()))}")
        print(
            f"faults injected: {len(self.report.faults)} ({', '.join(self.report.faults[:6])}...)"
        )
        print(f"revoked secrets admitted after a stored cancel: {revoked_admitted}")
        print(f"admitted after a cancel answered 'pending' (documented window): {pending_admitted}")
        print(f"sessions certainly over-admitted: {over}")
        flat = True
        besides = " besides 2 per open stream" if self.keeper is not None else ""
        for url, series in self.report.rss_kb.items():
            fds = self.report.fds[url]
            rss_growth, fd_growth = _growth(series), _growth(fds)
            print(
                f"{url}: RSS {series[0] / 1024:.1f} -> {series[-1] / 1024:.1f} MiB "
                f"(max {max(series) / 1024:.1f}), fds{besides} {fds[0]} -> {fds[-1]} "
                f"(max {max(fds)})"
            )
            # The trend, a sample a minute: a plateau and a leak end alike.
            print(
                "  RSS MiB by minute: "
                + " ".join(f"{kb / 1024:.1f}" for kb in series[:: 60 // WATCH_SECONDS])
            )
            # Flat: after warm-up, no more than 10 MiB (or 5 %) of growth, and
            # descriptors back near the start.
            flat = (
                flat
                and rss_growth < max(10 * 1024, series[0] // 20)
                and fd_growth <= max(10, fds[0] // 50)
            )
        print(f"RSS and fds flat: {'yes' if flat else 'NO'}")
        ok = revoked_admitted == 0 and over == 0 and flat
        if self.keeper is not None:
            ok = self._stream_verdict(streams) and ok
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1

    def _stream_verdict(self, streams: list[Stream]) -> bool:
        limit = self.args.cutoff
        found = cutoffs(streams, self.report.cancels, limit=limit)
        statuses: dict[int, int] = defaultdict(int)
        for stream in streams:
            statuses[stream.status] += 1
        held = sum(s.held for s in streams)
        print(
            f"streams: {self.args.streams} held open through {self.args.replicas} replicas "
            f"(an event every {self.args.stream_interval:g} s, a stream session cancelled "
            f"every {self.args.stream_cancel_every:g} s), descriptor limit {self.fd_limit}"
        )
        print(
            f"streams opened in all: {len(streams)}, by status: {dict(sorted(statuses.items()))}; "
            f"open at the end: {held}"
        )
        cancels = self.report.cancels
        stored = sum(not c.pending for c in cancels)
        print(
            f"stream sessions cancelled: {len(cancels)} ({stored} stored, "
            f"{len(cancels) - stored} answered 'pending')"
        )
        if found.delays:
            delays = sorted(found.delays)
            print(
                f"streams cut by a stored cancel: {len(delays)}, closed after its answer in "
                f"p50 {statistics.median(delays):.3f} s, "
                f"p99 {delays[int(0.99 * (len(delays) - 1))]:.3f} s, max {delays[-1]:.3f} s"
            )
        print(f"streams of a stored cancel closed later than {limit:g} s: {len(found.late)}")
        print(f"streams of a stored cancel still open at the end: {found.open_at_end}")
        if found.pending_delays or found.pending_open_at_end:
            worst = max(found.pending_delays, default=0.0)
            print(
                f"streams of a 'pending' cancel (documented window): {len(found.pending_delays)} "
                f"closed, max {worst:.3f} s; open at the end: {found.pending_open_at_end}"
            )
        print(f"streams that ended without a cancel of their session: {found.unexplained}")
        return not found.late and not found.open_at_end and bool(found.delays)


def _fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        row = next(row for row in limits if row.startswith("Max open files"))
    return int(row.split()[3])


def _growth(series: list[int]) -> int:
    """From the median of the first three samples to the median of the last three."""
    return int(statistics.median(series[-3:]) - statistics.median(series[:3]))


def _raise_fd_limit(needed: int) -> None:
    """The soak holds both client ends of its streams (and the fake upstream's
    ends); the replicas inherit the limit and raise their soft limit to it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard)))
    except (ValueError, OSError):  # not privileged: as far as the hard limit goes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=24)
    parser.add_argument("--window", type=int, default=10, help="GATEWAY_WINDOW_SECONDS")
    parser.add_argument("--cancel-every", type=float, default=2.0, dest="cancel_every")
    parser.add_argument("--fault-every", type=float, default=20.0, dest="fault_every")
    parser.add_argument("--seed", type=int, default=7)
    scale = parser.add_argument_group("scale", "the scale soak (--scale sets its defaults)")
    scale.add_argument(
        "--scale", action="store_true", help="3 replicas and 5,000 SSE streams held open"
    )
    scale.add_argument("--replicas", type=int, help="gateway replicas (default 2; --scale: 3)")
    scale.add_argument(
        "--streams", type=int, help="SSE streams held open (default 0; --scale: 5000)"
    )
    scale.add_argument("--streams-per-session", type=int, default=20, dest="streams_per_session")
    scale.add_argument(
        "--stream-interval", type=float, default=5.0, dest="stream_interval",
        help="seconds between a stream's events",
    )  # fmt: skip
    scale.add_argument(
        "--stream-cancel-every", type=float, default=3.0, dest="stream_cancel_every",
        help="seconds between cancels of a stream session",
    )  # fmt: skip
    scale.add_argument(
        "--cutoff", type=float, default=2.0,
        help="seconds within which a cancelled session's streams must close",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.replicas is None:
        args.replicas = 3 if args.scale else 2
    if args.streams is None:
        args.streams = 5000 if args.scale else 0
    return asyncio.run(Soak(args).run())


if __name__ == "__main__":
    sys.exit(main())
