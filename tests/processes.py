"""Child processes on free local ports: what the tests and the benchmarks share.

Nothing here imports the gateway, so ``tests/harness.py`` (which re-exports
these names) and the ``bench`` package start, wait for and stop their
processes the same way: a free port, a log file rather than a pipe (a chatty
child can never block on a full pipe), a poll for readiness with a deadline,
and SIGTERM then SIGKILL. ``ServerProcess`` is that for an HTTP server with
a ``/healthz``: the gateway (``tests/harness.py``) and the self-hosted
example's servers (``tests/chatkit_server.py``) are subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.01  # readiness poll interval
#: How long a started server may take to answer its first probe. A bound on a
#: hang, not a synchronisation (a process that exits fails the wait at once):
#: on two cores shared by parallel workers and other jobs, the ChatKit server
#: alone took 30 s to import its SDKs.
STARTUP_TIMEOUT = 90.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, for a server to bind.

    Not one the kernel picks (binding port 0): it hands the same ports to
    every process, for outgoing connections too, so between this check and
    the server's bind another test, an xdist worker or a client could take
    it ("address already in use"). Instead a random port below the kernel's
    ephemeral range, from this worker's own share of it.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = range(_PORTS.start + int(worker or 0) % workers, _PORTS.stop, workers)
    for _ in range(200):
        port = random.choice(share)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {share}")


def _private_ports() -> range:
    """Ports below Linux's ephemeral range (ip_local_port_range), above 10000."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 20000))


_PORTS = _private_ports()


def find_tool(name: str) -> str | None:
    """A binary on PATH, or in /usr/sbin (Debian's nginx), which root's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def http_request(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request on a fresh connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: Callable[[], str],
    interval: float = POLL_SECONDS,
) -> None:
    """Poll ``ready`` until it holds; TimeoutError naming ``what()`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what()}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[bytes], *, timeout: float, group: bool = False) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps the process.

    With ``group`` the SIGKILL goes to the process group, for a child started
    in its own session whose workers (uvicorn, nginx) must go with it.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    return proc.wait()


def gateway_env(
    upstream_url: str,
    *,
    port: int,
    redis_url: str | None = None,
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The gateway's environment: ``base`` without any ``GATEWAY_*``, plus ours.

    Stale ``GATEWAY_*`` variables from the developer's shell would otherwise
    change what a test exercises or a benchmark measures.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    env = {k: v for k, v in env.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"  # so the log shows lines as they happen
    env["GATEWAY_HOST"] = "127.0.0.1"
    env["GATEWAY_PORT"] = str(port)
    env["GATEWAY_UPSTREAM_URL"] = upstream_url
    if redis_url is not None:
        env["GATEWAY_REDIS_URL"] = redis_url
    env.update(extra or {})
    return env


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run on the given CPUs (taskset execs it: the pid stays the command's)."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


class Service:
    """A long-running child in its own session, its output in ``workdir/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        workdir: Path,
        cpus: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name.replace(' ', '-')}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            pinned(cpus, argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=REPO_ROOT,
            start_new_session=True,
        )

    def wait_ready(self, ready: Callable[[], bool], *, timeout: float = 30.0) -> None:
        """Poll ``ready``; RuntimeError with the log's tail if the child exits first."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            return ready()

        wait_until(up, timeout=timeout, what=lambda: f"{self.name}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """This process and its descendants (uvicorn and nginx workers)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def stop(self, grace: float = 15.0) -> None:
        terminate(self.proc, timeout=grace, group=True)
        self._log.close()


class ServerProcess:
    """An HTTP server as a child process on ``port``, ready (``GET /healthz`` 200) on return.

    Use ``with`` from synchronous code and ``async with`` from a test whose event
    loop also runs what the child talks to: the async variants never block that
    loop, so those servers keep answering while the child starts and drains.
    ``output()`` still answers after stop(), over every run; start() runs it again.
    """

    #: Who the messages name when the process does not come up.
    name = "the server"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        port: int,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.startup_timeout = startup_timeout
        self._argv = list(argv)
        self._env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._earlier_output = ""  # from runs already stopped

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started: call start() or astart()")
        return self._proc

    def _command(self) -> list[str]:
        """The argv of the next run (a subclass may add per-run arguments)."""
        return self._argv

    def _spawn(self) -> None:
        # A file, not a pipe: a chatty child can never block on a full pipe.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _release()
        self._proc = subprocess.Popen(
            self._command(),
            env=self._env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            self._release()
            raise RuntimeError(
                f"{self.name} exited with code {code} before /healthz answered 200.\n"
                f"command: {self._argv}\n--- output ---\n{self.output()}"
            )

    def _healthy(self) -> bool:
        self._check_alive()
        try:
            return http_request(self.port, "GET", "/healthz", host=self.host, timeout=1)[0] == 200
        except OSError:
            return False

    async def _ahealthy(self) -> bool:
        self._check_alive()
        request = f"GET /healthz HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
        try:
            reply = await raw_http(self.host, self.port, request.encode(), timeout=1)
        except (OSError, TimeoutError):
            return False
        return reply.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))

    def _describe(self) -> str:
        return f"{self.name}'s /healthz on {self.base_url}\n--- output ---\n{self.output()}"

    def start(self) -> Self:
        self._spawn()
        try:
            wait_until(self._healthy, timeout=self.startup_timeout, what=self._describe)
        except BaseException:
            self.stop()
            raise
        return self

    async def astart(self) -> Self:
        """Like start(), without blocking this event loop."""
        self._spawn()
        try:
            async with asyncio.timeout(self.startup_timeout):
                while not await self._ahealthy():  # noqa: ASYNC110 - nothing to await but a poll
                    await asyncio.sleep(POLL_SECONDS)
        except TimeoutError:
            await self.astop()
            raise TimeoutError(f"timed out waiting for {self._describe()}") from None
        except BaseException:
            await self.astop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM and wait (SIGKILL after ``grace`` seconds); returns the exit code."""
        if self._proc is None:
            return 0
        code = terminate(self._proc, timeout=grace)
        self._release()
        return code

    async def astop(self, grace: float = 10.0) -> int:
        """Like stop(), waiting in a thread so this event loop keeps running."""
        if self._proc is None:
            return 0
        code = await asyncio.to_thread(terminate, self._proc, timeout=grace)
        self._release()
        return code

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._release()

    def close(self) -> None:
        """The same as stop(), for ``contextlib.closing``."""
        self.stop()

    def _release(self) -> None:
        """Keep what the run printed and close its file; the process has exited."""
        if self._log is not None:
            self._earlier_output += self._current_output()
            self._log.close()
            self._log = None

    def _current_output(self) -> str:
        if self._log is None:
            return ""
        # pread leaves the shared file offset alone: the child keeps appending.
        size = os.fstat(self._log.fileno()).st_size
        return os.pread(self._log.fileno(), size, 0).decode(errors="replace")

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far, over every run."""
        return self._earlier_output + self._current_output()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()


@contextlib.asynccontextmanager
async def connection(
    host: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A fresh TCP connection, closed on exit even when the server has reset it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw_http(
    host: str,
    port: int,
    data: bytes,
    *,
    read_until_close: bool = True,
    timeout: float = 5.0,  # noqa: ASYNC109 - part of the helper's contract
) -> bytes:
    """Write ``data`` verbatim on a fresh connection and return the raw reply.

    With ``read_until_close`` false, return after one complete response
    (Content-Length or chunked framing; interim 1xx responses are included).
    A reset by the server ends the read; what arrived before it is returned.
    """
    reply, _ = await raw_upload(
        host, port, data, (), read_until_close=read_until_close, timeout=timeout
    )
    return reply


async def raw_upload(
    host: str,
    port: int,
    head: bytes,
    chunks: Iterable[bytes],
    *,
    read_until_close: bool = True,
    timeout: float = 20.0,  # noqa: ASYNC109 - part of the helper's contract
) -> tuple[bytes, int]:
    """Write ``head`` then ``chunks`` on a fresh connection while reading the reply.

    Reading while writing sees an answer the server sends before it has read
    everything (a refusal of a huge head or body), and the count of chunk bytes
    written shows how much it took in first. Returns (raw reply, bytes of
    ``chunks`` written); the reply is read as ``raw_http`` reads it.
    """
    received = bytearray()
    written = 0
    async with connection(host, port) as (reader, writer):

        async def send() -> None:
            nonlocal written
            # The server may answer and close before it has read everything.
            with contextlib.suppress(ConnectionError):
                writer.write(head)
                await writer.drain()
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                    written += len(chunk)

        sender = asyncio.create_task(send())
        try:
            async with asyncio.timeout(timeout):
                try:
                    if read_until_close:
                        while data := await reader.read(65536):
                            received += data
                    else:
                        await _read_response(reader, received)
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    return bytes(received), written


async def _read_response(reader: asyncio.StreamReader, out: bytearray) -> None:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        out += head
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status >= 200 or status == 101:
            break
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if status in (204, 304) or status < 200:
        return
    if "chunked" in fields.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                # Trailer section, ended by an empty line.
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    out += trailer
                out += b"\r\n"
                return
            out += await reader.readexactly(size + 2)
    elif "content-length" in fields:
        out += await reader.readexactly(int(fields["content-length"]))
    else:
        while chunk := await reader.read(65536):
            out += chunk
