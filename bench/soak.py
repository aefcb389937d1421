"""A long soak of mixed traffic with faults on a schedule; the gateway's promises checked.

Two gateway replicas share a Redis (AOF, fsync always); the fake upstream
plays OpenAI's hosted API. Client tasks send JSON and SSE requests with
sessions' secrets through either replica while a scheduler, in turn:

- cancels a session through one replica and creates a replacement;
- pauses Redis (SIGSTOP) for 2 s, and restarts it (SIGTERM, AOF replay);
- makes the upstream reset connections and answer 500 for a while.

At the end it reports, and exits non-zero unless:

- no request sent after a cancel was answered (``stored``) was admitted;
- no session was certainly over-admitted: ``limit + 1`` admissions whose
  send-to-answer intervals all fit inside one window (sound: it never flags
  a legal schedule, since each admission happened inside its interval);
- the replicas' RSS and open descriptors ended flat (growth within bounds).

Run: ``scripts/soak`` (10 minutes) or ``scripts/soak --minutes 1``. Traffic
goes to 127.0.0.1 only and every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
import openai
from openai import AsyncOpenAI

from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, RedisServer

API_KEY = "sk-soak"


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
        self.report = Report()
        self.deadline = 0.0

    async def run(self) -> int:
        with RedisServer(appendonly=True, appendfsync="always") as redis:
            async with FakeUpstream(record=False) as fake:
                env = {
                    "GATEWAY_WINDOW_SECONDS": str(self.args.window),
                    "GATEWAY_REDIS_TIMEOUT": "0.5",
                    "GATEWAY_UPSTREAM_READ_TIMEOUT": "5",
                    "GATEWAY_LOG_LEVEL": "warning",
                }
                a = GatewayProcess(fake.url, redis_url=redis.url, env=env)
                b = GatewayProcess(fake.url, redis_url=redis.url, env=env)
                await asyncio.gather(a.astart(), b.astart())
                try:
                    await self._soak(redis, fake, (a, b))
                finally:
                    await asyncio.gather(a.astop(), b.astop())
        return self._verdict()

    async def _soak(
        self, redis: RedisServer, fake: FakeUpstream, replicas: tuple[GatewayProcess, ...]
    ) -> None:
        for _ in range(self.args.sessions):
            await self._new_session(replicas[0])
        self.deadline = time.monotonic() + self.args.minutes * 60
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            tasks = [
                asyncio.create_task(self._client(http, replicas)) for _ in range(self.args.clients)
            ]
            tasks.append(asyncio.create_task(self._rotate(replicas)))
            tasks.append(asyncio.create_task(self._faults(redis, fake)))
            tasks.append(asyncio.create_task(self._watch(replicas)))
            await asyncio.gather(*tasks)

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
                self.report.rss_kb[gateway.url].append(rss)
                self.report.fds[gateway.url].append(fds)
            if time.monotonic() >= self.deadline:
                return
            await asyncio.sleep(min(10, max(self.deadline - time.monotonic(), 0.1)))

    # -- the verdict -----------------------------------------------------------------

    def _verdict(self) -> int:
        by_session: dict[str, list[Sample]] = defaultdict(list)
        for sample in self.report.samples:
            if sample.status == 200:
                by_session[sample.session].append(sample)
        every = {s.id: s for s in [*self.sessions.values(), *self.retired]}
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
            f"soak: {self.args.minutes} min, {self.args.clients} clients, 2 replicas, "
            f"window {self.args.window} s, {len(every)} sessions ({len(self.retired)} cancelled)"
        )
        print(f"requests: {total}  by status: {dict(sorted(self.report.statuses.items()))}")
        print(
            f"faults injected: {len(self.report.faults)} ({', '.join(self.report.faults[:6])}...)"
        )
        print(f"revoked secrets admitted after a stored cancel: {revoked_admitted}")
        print(f"admitted after a cancel answered 'pending' (documented window): {pending_admitted}")
        print(f"sessions certainly over-admitted: {over}")
        flat = True
        for url, series in self.report.rss_kb.items():
            fds = self.report.fds[url]
            growth = series[-1] - series[0]
            print(
                f"{url}: RSS {series[0] / 1024:.1f} -> {series[-1] / 1024:.1f} MiB "
                f"(max {max(series) / 1024:.1f}), fds {fds[0]} -> {fds[-1]} (max {max(fds)})"
            )
            # Flat: no more than 10 MiB of growth after warm-up, descriptors back near start.
            flat = flat and growth < 10 * 1024 and fds[-1] <= fds[0] + 10
        print(f"RSS and fds flat: {'yes' if flat else 'NO'}")
        ok = revoked_admitted == 0 and over == 0 and flat
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=24)
    parser.add_argument("--window", type=int, default=10, help="GATEWAY_WINDOW_SECONDS")
    parser.add_argument("--cancel-every", type=float, default=2.0, dest="cancel_every")
    parser.add_argument("--fault-every", type=float, default=20.0, dest="fault_every")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    return asyncio.run(Soak(args).run())


if __name__ == "__main__":
    sys.exit(main())
