"""Real processes and sockets for tests: Redis, a Redis Cluster, the gateway.

Everything here starts genuine binaries on free local ports and waits for them
to answer before returning, so a test never races a server that is still
booting. Polling lives here too, in one helper (``eventually``): a test waits
for what it needs to be true, never for a fixed time, because a process that
has not bound its port or drained its queue yet cannot tell us when it will.

Beside them, the requests tests make over and over: a client call
(``converse``), a session through the gateway (``create_session``, or with the
official SDK ``sdk_create``/``sdk_cancel``/``openai_sdk``), a Prometheus scrape
(``scrape``/``metric_value``) and the check that no secret reached a log
(``assert_never_logged``). Raw-socket helpers (``raw_http``, ``raw_upload``,
``connection``) come from ``tests/processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, Self, TypeVar

import aiohttp
import openai
import redis
import redis.asyncio
import redis.asyncio.cluster
from openai.types.beta.chatkit import ChatSession
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import (
    POLL_SECONDS,
    REPO_ROOT,
    STARTUP_TIMEOUT,
    ServerProcess,
    connection,
    free_port,
    gateway_env,
    raw_http,
    raw_upload,
    terminate,
    wait_until,
)

# Re-exported: tests import every process helper from here.
__all__ = [
    "REPO_ROOT",
    "GatewayProcess",
    "RedisCluster",
    "RedisServer",
    "Replicas",
    "Samples",
    "Served",
    "assert_never_logged",
    "cancel_session",
    "collecting",
    "connection",
    "converse",
    "create_session",
    "eventually",
    "fill_redis",
    "free_port",
    "gateway_env",
    "metric_value",
    "open_stream",
    "openai_sdk",
    "raw_http",
    "raw_upload",
    "redis_key_contents",
    "running",
    "scrape",
    "sdk_cancel",
    "sdk_create",
    "subscribed",
    "until_closed",
    "wall_clock_reach",
]

_POLL = POLL_SECONDS
_INSTALL_REDIS = (
    "redis-server was not found on PATH. The test suite needs a real Redis: install it "
    "(Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`)."
)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline for a poll, not for one await
    what: str | Callable[[], str] = "the condition",
    interval: float = _POLL,
) -> float:
    """Poll ``condition`` (plain or async) until it holds; return the seconds it took.

    The one way a test waits for something nothing notifies it about. Fails the
    test with ``what`` (a callable is evaluated at failure, e.g. a process's
    output so far) when the condition is still false after ``timeout``.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        held = condition()
        if not isinstance(held, bool):
            held = await held
        if held:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"after {timeout}s still not true: {described}")
        await asyncio.sleep(interval)


async def wall_clock_reach(when: float) -> None:
    """Return once ``time.time()`` has passed ``when``.

    For Redis, which decides with its own ``TIME``: the same system clock this
    machine reads, and one no test can move. There is nothing to wait *for*
    here but time itself.
    """
    while (left := when - time.time()) > 0:  # noqa: ASYNC110 - waiting on the clock itself
        await asyncio.sleep(min(left, 0.05))


async def redis_key_contents(client: redis.asyncio.Redis, key: bytes) -> tuple[bytes, bytes]:
    """A key's type and every name and value in it, joined by NUL bytes.

    What a test searches for data that must never be at rest (a secret).
    """
    # redis-py annotates replies as ``bytes | str`` (it cannot know about
    # decode_responses); a client without it answers bytes.
    raw: Any = client
    kind: bytes = await raw.type(key)
    parts: list[bytes]
    if kind == b"string":
        parts = [await raw.get(key) or b""]
    elif kind == b"hash":
        parts = [b for kv in (await raw.hgetall(key)).items() for b in kv]
    elif kind == b"zset":
        parts = list(await raw.zrange(key, 0, -1))
    elif kind == b"stream":
        parts = [b for _, entry in await raw.xrange(key) for kv in entry.items() for b in kv]
    else:
        parts = [await raw.dump(key) or b""]
    return kind, b"\x00".join(parts)


async def fill_redis(client: redis.asyncio.Redis, start: int = 0) -> int:
    """Write ``filler:<n>`` keys until a ``maxmemory`` Redis refuses, to the last bytes.

    Returns the next free filler number. Call it again before each step that
    must find Redis full: Redis frees client buffers now and then, and a write
    could fit the room so freed.
    """
    n = start
    for size in (65536, 1024, 64):
        while True:
            try:
                await client.set(f"filler:{n}", b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                break
            n += 1
    return n


Item = TypeVar("Item")


@contextlib.asynccontextmanager
async def collecting(feed: AsyncIterator[Item]) -> AsyncIterator[list[Item]]:
    """What ``feed`` yields, appended to the list in the background while the block runs.

    On exit the reader is cancelled and the feed closed (an async generator's
    ``aclose``), so a subscription never outlives its test.
    """
    items: list[Item] = []

    async def read() -> None:
        async for item in feed:
            items.append(item)

    reader = asyncio.create_task(read())
    try:
        yield items
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        close = getattr(feed, "aclose", None)
        if close is not None:
            await close()


async def subscribed(client: redis.asyncio.Redis, channel: str) -> bool:
    """Whether anyone listens on ``channel``: pub/sub drops what is published before."""
    counts: list[tuple[bytes, int]] = await client.pubsub_numsub(channel)  # type: ignore[assignment]
    return counts[0][1] >= 1


def _flags(options: Mapping[str, str]) -> list[str]:
    """``{"port": "1"}`` -> ``["--port", "1"]``, the way redis-server takes config."""
    return [item for name, value in options.items() for item in (f"--{name}", value)]


class RedisServer:
    """A private ``redis-server`` on a free port, in its own temporary directory."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError(_INSTALL_REDIS)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._close_log()
        self._log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - lives with the process
        options = {
            "port": str(self.port),
            "bind": self.host,
            "dir": str(self.dir),
            "daemonize": "no",
            "save": "",
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
        }
        self.proc = subprocess.Popen(
            ["redis-server", *_flags(options), *self.extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._paused = False
        wait_until(self._answers, timeout=self.startup_timeout, what=self._describe)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early:\n{self.log_text()}")
        try:
            with redis.Redis(host=self.host, port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:  # includes BusyLoadingError (AOF replay)
            return False

    def _describe(self) -> str:
        return f"redis-server on port {self.port} to answer PING:\n{self.log_text()}"

    def log_text(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM): with AOF on, everything written survives."""
        if self.proc is not None:
            terminate(self.proc, timeout=10.0)
        self._paused = False
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: only what appendfsync already flushed survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._paused = False
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("cannot pause a redis-server that is not running")
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self.proc is not None and self._paused:
            self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same directory."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Undo whatever a previous test did to the server: resume or restart it."""
        self.resume()
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def flushall(self) -> None:
        with redis.Redis(host=self.host, port=self.port, socket_timeout=5) as client:
            client.flushall()

    def client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """An asyncio client; the caller must ``await client.aclose()``."""
        return redis.asyncio.Redis(host=self.host, port=self.port, **kwargs)

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisCluster:
    """Primaries (``masters``), each with ``replicas`` replicas, joined into one cluster.

    ``node_timeout_ms`` is ``cluster-node-timeout``: how long a silent primary
    goes before the others mark it failed and its replica is elected, so it
    bounds how long a failover test runs.
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        extra: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                options = {
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": str(node_timeout_ms),
                    # Explicit bus port: port+10000 may be taken or above 65535.
                    "cluster-port": str(free_port()),
                    **(extra or {}),
                }
                self.nodes.append(RedisServer(extra_args=_flags(options)))
            addresses = [f"{node.host}:{node.port}" for node in self.nodes]
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=startup_timeout,
            )
            wait_until(
                lambda: (
                    all(self._state_ok(node) for node in self.nodes)
                    and self._replicas_linked(replicas * masters)
                ),
                timeout=startup_timeout,
                what=lambda: "cluster_state:ok on every node, every replica linked",
            )
        except BaseException:
            self.stop()
            raise

    def _replicas_linked(self, expected: int) -> bool:
        """Whether ``expected`` replicas have finished their first sync."""
        linked = 0
        for node in self.nodes:
            with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
                info = client.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                linked += 1
        return linked == expected

    def alive(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.proc is not None and node.proc.poll() is None]

    def primary_of(self, key: str | bytes) -> RedisServer:
        """The node that serves ``key``'s slot now, as a running node's CLUSTER SLOTS says."""
        node = self.alive()[0]
        with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            ranges = client.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in ranges:
            if int(start) <= slot <= int(end):
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(f"no node serves slot {slot}")

    def serves(self, key: str | bytes, node: RedisServer) -> bool:
        """Whether ``node`` serves ``key``'s slot now; False mid-failover, when
        CLUSTER SLOTS briefly lists no node for it."""
        try:
            return self.primary_of(key) is node
        except LookupError:
            return False

    def state_ok(self) -> bool:
        """cluster_state:ok on every running node."""
        return all(self._state_ok(node) for node in self.alive())

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
            info = client.execute_command("CLUSTER INFO")
        # redis-py parses the reply into a dict; older versions return the text.
        if isinstance(info, dict):
            return bool(info.get("cluster_state") == "ok")
        return b"cluster_state:ok" in info if isinstance(info, bytes) else False

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """URL of one node; cluster clients discover the rest from it."""
        return f"redis://{self.nodes[0].host}:{self.nodes[0].port}"

    def client(self) -> redis.asyncio.cluster.RedisCluster:
        """An asyncio cluster client; the caller must ``await client.aclose()``."""
        node = self.nodes[0]
        return redis.asyncio.cluster.RedisCluster(host=node.host, port=node.port)

    def stop(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisSentinels:
    """A master, one replica and ``count`` sentinels (``redis-server --sentinel``) watching them.

    ``down_after_ms`` is how long the master may be silent before a sentinel
    calls it down; with a quorum of two that starts the failover, so it
    bounds how long a failover test runs.
    """

    MASTER_NAME = "gateway-master"

    def __init__(
        self, *, count: int = 3, down_after_ms: int = 1000, startup_timeout: float = 30.0
    ) -> None:
        self.sentinels: list[tuple[subprocess.Popen[bytes], int]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="redis-sentinel-test-"))
        self.servers: list[RedisServer] = []
        try:
            master = RedisServer()
            self.servers.append(master)
            replica = RedisServer(extra_args=["--replicaof", master.host, str(master.port)])
            self.servers.append(replica)
            wait_until(
                lambda: self._link_up(replica),
                timeout=startup_timeout,
                what=lambda: "the replica to sync with the master",
            )
            for n in range(count):
                port = free_port()
                conf = self.dir / f"sentinel-{n}.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {self.MASTER_NAME} {master.host} {master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.MASTER_NAME} {down_after_ms}\n"
                    f"sentinel failover-timeout {self.MASTER_NAME} 10000\n"
                )
                log = open(self.dir / f"sentinel-{n}.log", "ab")  # noqa: SIM115 - closed by Popen's end
                proc = subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
                )
                log.close()
                self.sentinels.append((proc, port))
            wait_until(
                lambda: all(self._sees_everyone(port, count) for _, port in self.sentinels),
                timeout=startup_timeout,
                what=lambda: "every sentinel to know the replica and the other sentinels",
            )
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _link_up(replica: RedisServer) -> bool:
        with redis.Redis(host=replica.host, port=replica.port, socket_timeout=1) as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    def _sees_everyone(self, port: int, count: int) -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
                state = client.execute_command("SENTINEL", "MASTER", self.MASTER_NAME)
        except redis.exceptions.RedisError:
            return False
        if isinstance(state, list):
            state = dict(zip(state[::2], state[1::2], strict=True))
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in state.items()
        }
        return int(fields["num-slaves"]) >= 1 and int(fields["num-other-sentinels"]) == count - 1

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for _, port in self.sentinels]

    @property
    def setting(self) -> str:
        """GATEWAY_REDIS_SENTINELS for these sentinels."""
        return ",".join(f"{host}:{port}" for host, port in self.addresses)

    def master(self) -> RedisServer:
        """The server the first answering sentinel names as master now."""
        for host, port in self.addresses:
            try:
                with redis.Redis(host=host, port=port, socket_timeout=1) as client:
                    _, master_port = client.sentinel_get_master_addr_by_name(self.MASTER_NAME)
            except redis.exceptions.RedisError:
                continue
            return next(s for s in self.servers if s.port == int(master_port))
        raise LookupError("no sentinel answers")

    def stop(self) -> None:
        for proc, _ in self.sentinels:
            terminate(proc, timeout=5.0)
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class GatewayProcess(ServerProcess):
    """The gateway as a subprocess (``python -m gateway serve``), ready on return.

    Use ``with`` from synchronous code and ``async with`` from a test whose event
    loop also runs the fake upstream: the async variants never block that loop,
    so the upstream keeps answering while the gateway starts and drains.
    """

    name = "the gateway"

    def __init__(
        self,
        upstream_url: str,
        *,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        command: Sequence[str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        port = port or free_port()
        # ``{port}`` in a custom command is replaced, for stand-ins in harness tests.
        argv = command or [sys.executable, "-m", "gateway", "serve"]
        super().__init__(
            [arg.replace("{port}", str(port)) for arg in argv],
            env=gateway_env(upstream_url, port=port, redis_url=redis_url, extra=env),
            port=port,
            startup_timeout=startup_timeout,
        )

    @property
    def url(self) -> str:
        return self.base_url


#: A module's two gateways on one store, replica A then replica B.
Replicas = tuple[GatewayProcess, GatewayProcess]


class Served(Protocol):
    """Anything with a base URL: a gateway process, or a test's wrapper of one."""

    @property
    def url(self) -> str: ...


async def converse(
    http: aiohttp.ClientSession, gateway: Served, secret: str
) -> tuple[int, str | None]:
    """One client-traffic request with ``secret``: (status, error code or None)."""
    async with http.post(
        f"{gateway.url}/v1/chatkit/conversation",
        json={"type": "threads.list", "params": {}},
        headers={"Authorization": f"Bearer {secret}", "OpenAI-Beta": "chatkit_beta=v1"},
    ) as response:
        body = await response.json()
        return response.status, body["error"]["code"] if response.status >= 400 else None


#: A Prometheus scrape: each sample's value by its name and its set of labels.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample the gateway at ``url`` shows on ``/metrics``."""
    # A fresh connection per scrape, so with several workers any of them answers.
    async with http.get(f"{url}/metrics", headers={"Connection": "close"}) as response:
        text = await response.text()
        assert response.status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample with exactly these labels; None if the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())))


async def create_session(
    http: aiohttp.ClientSession,
    gateway_url: str,
    *,
    limit: int | None = None,
    user: str = "u1",
    api_key: str = "sk-test",
) -> dict[str, Any]:
    """Create a session through the gateway, so it learns it; the upstream's answer.

    Without ``limit`` the session has no rate limit of its own (the default applies).
    """
    body: dict[str, Any] = {"user": user, "workflow": {"id": "wf_1"}}
    if limit is not None:
        body["rate_limits"] = {"max_requests_per_1_minute": limit}
    async with http.post(
        f"{gateway_url}/v1/chatkit/sessions",
        headers={"Authorization": f"Bearer {api_key}"},
        json=body,
    ) as response:
        if response.status != 200:
            raise AssertionError(
                f"session create answered {response.status}: {await response.text()}"
            )
        session: dict[str, Any] = await response.json()
    return session


async def cancel_session(
    http: aiohttp.ClientSession, gateway_url: str, session_id: str, *, api_key: str = "sk-test"
) -> None:
    """Cancel a session through the gateway; fails unless it answers 200."""
    async with http.post(
        f"{gateway_url}/v1/chatkit/sessions/{session_id}/cancel",
        headers={"Authorization": f"Bearer {api_key}"},
    ) as response:
        if response.status != 200:
            raise AssertionError(f"cancel answered {response.status}: {await response.text()}")


async def open_stream(
    http: aiohttp.ClientSession, gateway: Served, secret: str, *, events: int
) -> aiohttp.ClientResponse:
    """A client SSE stream of ``events`` events 0.1 s apart, its first event already read.

    The fake upstream streams it; the caller reads the rest (``until_closed``).
    """
    response = await http.post(
        f"{gateway.url}/v1/chatkit/conversation?events={events}&interval=0.1",
        json={"type": "threads.create", "params": {}},
        headers={"Authorization": f"Bearer {secret}", "Accept": "text/event-stream"},
    )
    assert response.status == 200, response.status
    assert (await response.content.readline()).startswith(b"data: ")
    return response


async def until_closed(response: aiohttp.ClientResponse) -> tuple[int, float]:
    """(events read in all, monotonic time the stream ended)."""
    seen = 1
    try:
        async for line in response.content:
            seen += line.startswith(b"data: ")
    except aiohttp.ClientPayloadError:
        pass  # cut off mid-body: what closing a stream looks like to a client
    finally:
        response.release()
    return seen, time.monotonic()


Processes = TypeVar("Processes", bound=Sequence[ServerProcess])


@contextlib.asynccontextmanager
async def running(processes: Processes) -> AsyncIterator[Processes]:
    """Start servers (gateways, ChatKit servers) in parallel; stop every one, whatever happens."""
    results = await asyncio.gather(*(p.astart() for p in processes), return_exceptions=True)
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield processes
    finally:
        await asyncio.gather(*(p.astop() for p in processes))


def openai_sdk(gateway: Served, api_key: str, **options: Any) -> openai.AsyncOpenAI:
    """The official SDK as server code uses it, pointed at ``gateway``.

    No retries unless ``options`` ask for them, so one call is one request.
    Use it as ``async with openai_sdk(...) as client``.
    """
    settings: dict[str, Any] = {"max_retries": 0, "timeout": 30, **options}
    return openai.AsyncOpenAI(api_key=api_key, base_url=f"{gateway.url}/v1", **settings)


async def sdk_create(gateway: Served, api_key: str, **params: Any) -> ChatSession:
    """A session created through ``gateway`` with the official SDK (one request)."""
    async with openai_sdk(gateway, api_key) as client:
        return await client.beta.chatkit.sessions.create(**params)


async def sdk_cancel(gateway: Served, api_key: str, session_id: str) -> ChatSession:
    """A session cancelled through ``gateway`` with the official SDK (one request)."""
    async with openai_sdk(gateway, api_key) as client:
        return await client.beta.chatkit.sessions.cancel(session_id)


def assert_never_logged(
    processes: Iterable[ServerProcess], secrets: Iterable[str], what: str = "a secret"
) -> None:
    """None of ``secrets`` is in any process's output so far (the secret is not shown)."""
    secrets = list(secrets)
    for process in processes:
        output = process.output()
        leaked = sum(secret in output for secret in secrets)
        assert not leaked, f"{what} in the log of {process.name} on {process.base_url}"
