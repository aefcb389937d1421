"""A connection flood, run as its own process: ``python -m tests.flood HOST PORT [options]``.

Connections that hold a slot and ask for nothing, each reconnected as soon as
the server closes it: ``--silent`` ones send nothing, ``--dripping`` ones send
a byte of a request head that never ends every ``--interval`` seconds. With
``--rate``, connections are opened at most that many a second in all (a
Slowloris tool's connection rate); without it, as fast as they can be.

A process of its own, like a real attacker's machine: in the test's process
its reconnect loop would also delay the legitimate client it is measured
against. It prints ``connects N`` each time N reaches a multiple of
``--report``, and when its standard input closes it stops and prints one JSON
line: the connections closed by the server, by kind and by the status of
what they read before (0: nothing, or a reset), and the error codes seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
from collections import Counter

#: What a dripping connection sends, a byte at a time: never a complete head.
DRIP = b"GET /v1/chatkit/threads HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 65536
_CODE = re.compile(rb'"code":"([a-z_]+)"')


class Flood:
    def __init__(self, host: str, port: int, *, interval: float, report: int, rate: float) -> None:
        self.host = host
        self.port = port
        self.interval = interval
        self.report = report
        self.rate = rate
        self._next_slot = 0.0
        self.connects = 0
        self.failed_connects = 0
        self.closes: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()

    async def attacker(self, drip: bool) -> None:
        kind = "dripping" if drip else "silent"
        while True:
            await self._pace()
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.failed_connects += 1
                continue
            self.connects += 1
            if self.connects % self.report == 0:
                print(f"connects {self.connects}", flush=True)
            try:
                reply = await self._hold(reader, writer, drip)
            finally:
                writer.close()
            status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
            self.closes[f"{kind} {status}"] += 1
            for code in _CODE.findall(reply):
                self.codes[code.decode()] += 1

    async def _pace(self) -> None:
        """Wait for this connection's slot under ``rate`` (the attack's pace)."""
        if self.rate:
            loop = asyncio.get_running_loop()
            slot = max(self._next_slot, loop.time())
            self._next_slot = slot + 1 / self.rate
            await asyncio.sleep(slot - loop.time())

    async def _hold(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drip: bool
    ) -> bytes:
        """Hold the connection until the server closes it; what it said meanwhile."""
        reply = b""
        head = iter(DRIP)
        with contextlib.suppress(ConnectionError):
            while True:
                if drip:
                    writer.write(bytes([next(head)]))
                try:
                    # The attack's pace: a silent connection just waits to be closed.
                    async with asyncio.timeout(self.interval if drip else None):
                        chunk = await reader.read(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                reply += chunk
        return reply

    def summary(self) -> dict[str, object]:
        return {
            "connects": self.connects,
            "failed_connects": self.failed_connects,
            "closes": dict(self.closes),
            "codes": dict(self.codes),
        }


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--silent", type=int, default=300)
    parser.add_argument("--dripping", type=int, default=0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--report", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0, help="connections a second at most")
    args = parser.parse_args(argv)
    flood = Flood(args.host, args.port, interval=args.interval, report=args.report, rate=args.rate)
    kinds = [False] * args.silent + [True] * args.dripping
    tasks = [asyncio.create_task(flood.attacker(drip)) for drip in kinds]
    # Runs until standard input closes.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(flood.summary()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
