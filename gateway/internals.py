"""The non-public parts of uvicorn and redis-py the gateway relies on, in one list.

The connection defences subclass uvicorn's httptools protocol (``protocol.py``)
and read its per-connection and per-request state; the worker supervisor
subclasses uvicorn's (``lifecycle.py``); admissions and revocations drive
redis-py's connections directly (``store/redis/``). None of that is public
API, so a release may rename any of it. An override whose hook was renamed is
never called, and a gateway started that way would serve without its
defences. So :func:`missing` looks up every name below in the installed
packages, and ``chatkit-gateway serve`` refuses to start, with one line naming
the package, its version and the name, when one is gone.

``INTERNALS`` maps an owner (``module:Class``, or ``module:`` for a module's own
names) to the names used on it. A name is found on the class or on an instance
made the way the gateway gets one (a protocol that parsed a request, a
connection pool, a cluster node: nothing connects anywhere), so attributes set
in ``__init__`` are checked too. ``name(param)`` also requires the method to
take a keyword argument ``param``. ``tests/test_internals.py`` walks
``gateway/`` and fails when a use is not listed here.

aiohttp is used through its public API only.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

_PROTOCOL = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
_CYCLE = "uvicorn.protocols.http.httptools_impl:RequestResponseCycle"

INTERNALS: dict[str, tuple[str, ...]] = {
    # gateway/protocol.py: GatewayHttpProtocol. The hooks it overrides (a
    # renamed hook would silently stop being called), then the state it reads.
    _PROTOCOL: (
        "__init__(_loop)",
        "connection_made",
        "connection_lost",
        "data_received",
        "shutdown",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
        "send_400_response",
        "_unset_keepalive_if_required",
        "app_state",
        "client",
        "connections",
        "cycle",
        "expect_100_continue",
        "flow",
        "headers",
        "limit_concurrency",
        "logger",
        "loop",
        "parser",
        "scope",
        "transport",
        "url",
    ),
    # The request cycle the protocol makes per request: its transport is
    # swapped for the lingering one, its flags read and set.
    _CYCLE: (
        "disconnected",
        "keep_alive",
        "message_event",
        "more_body",
        "response_complete",
        "response_started",
        "transport",
    ),
    "uvicorn.protocols.http.httptools_impl:": ("STATUS_LINE",),
    "uvicorn.protocols.http.flow_control:FlowControl": ("pause_reading", "read_paused"),
    # gateway/lifecycle.py: GatewayConfig, GatewaySupervisor and run().
    "uvicorn.config:Config": ("load", "bind_socket", "workers"),
    "uvicorn.supervisors.multiprocess:Multiprocess": (
        "__init__(sockets)",
        "handle_hup",
        "handle_int",
        "handle_term",
        "sockets",
    ),
    # gateway/lifecycle.py and the admin/metrics listeners (gateway/admin.py).
    "uvicorn.server:Server": ("serve(sockets)", "should_exit", "started"),
    # gateway/store/redis/sender.py, replicated.py, feed.py: connections made
    # from a pool's recipe and driven by hand (one write, one read per batch).
    "redis.asyncio.connection:ConnectionPool": ("connection_class", "connection_kwargs"),
    "redis.asyncio.connection:Connection": (
        "can_read",
        "connect",
        "disconnect(nowait)",
        "host",
        "pack_commands",
        "port",
        "read_response(timeout)",
        "send_packed_command(check_health)",
    ),
    "redis.asyncio.sentinel:SentinelConnectionPool": (
        "get_master_address",
        "master_address",
        "sentinel_manager",
        "service_name",
    ),
    "redis.asyncio.sentinel:Sentinel": ("sentinels",),
    "redis.asyncio.cluster:RedisCluster": ("nodes_manager",),
    "redis.asyncio.cluster:NodesManager": ("initialize", "move_slot"),
    "redis.asyncio.cluster:ClusterNode": (
        "acquire_connection",
        "connection_class",
        "connection_kwargs",
        "name",
        "release",
    ),
    "redis.asyncio.client:PubSub": ("connection",),
}


def names() -> Iterator[tuple[str, str, str]]:
    """Every listed use as (owner, name, keyword argument or "")."""
    for owner, entries in INTERNALS.items():
        for entry in entries:
            name, _, param = entry.partition("(")
            yield owner, name, param.rstrip(")")


def missing() -> str | None:
    """The first listed name the installed packages lack, as one line; None if all are there."""
    instances = _instances()
    for owner, name, param in names():
        module_name, _, class_name = owner.partition(":")
        package = module_name.partition(".")[0]
        where = f"{module_name}.{class_name or name}"
        try:
            module = importlib.import_module(module_name)
            target: Any = getattr(module, class_name) if class_name else module
        except (ImportError, AttributeError):
            return _line(package, where)
        if class_name:
            where = f"{class_name}.{name}"
        instance = instances.get(owner)
        if not hasattr(target, name) and not (instance is not None and hasattr(instance, name)):
            return _line(package, where)
        if param and not _accepts(getattr(target, name), param):
            return _line(package, f"{where}({param}=...)")
    return None


def _line(package: str, name: str) -> str:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "not installed"
    return (
        f"{package} {version} lacks {name}, which the gateway relies on; "
        f"install a {package} release that pyproject.toml declares"
    )


def _accepts(function: Callable[..., Any], param: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return param in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _instances() -> dict[str, Any]:
    """An instance of each owner class whose instances carry the attributes.

    Made in a private event loop, as the gateway makes them, without any I/O.
    What a changed class does not let us make is left out, and the names its
    instances would carry are then reported missing. uvicorn's loggers are
    muted meanwhile: a probe that fails halfway must not log a traceback
    before the one line that says why the gateway does not start.
    """
    made: dict[str, Any] = {}
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn.access")]
    muted = [log.disabled for log in loggers]
    loop = asyncio.new_event_loop()
    try:
        for log in loggers:
            log.disabled = True
        for make in (_protocol, _supervisor, _redis):
            try:
                loop.run_until_complete(make(made))
            except Exception:  # noqa: S112 - a class that changed shape: its names are reported
                continue
    finally:
        loop.close()
        for log, disabled in zip(loggers, muted, strict=True):
            log.disabled = disabled
    return made


class _ProbeTransport(asyncio.Transport):
    """A transport that keeps what is written: uvicorn's own tests drive the protocol so."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _protocol(made: dict[str, Any]) -> None:
    """A protocol that parsed one request, and that request's cycle and flow control."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app, log_config=None, lifespan="off", ws="none", http="httptools")
    state = ServerState()
    protocol = made[_PROTOCOL] = HttpToolsProtocol(
        config, state, {}, _loop=asyncio.get_running_loop()
    )
    try:
        protocol.connection_made(_ProbeTransport())
        made["uvicorn.protocols.http.flow_control:FlowControl"] = protocol.flow
        protocol.data_received(b"GET / HTTP/1.1\r\nhost: probe\r\n\r\n")
        made[_CYCLE] = protocol.cycle
    finally:
        await asyncio.gather(*state.tasks, return_exceptions=True)
        protocol.connection_lost(None)


async def _supervisor(made: dict[str, Any]) -> None:
    from uvicorn.config import Config
    from uvicorn.server import Server
    from uvicorn.supervisors import Multiprocess

    config = made["uvicorn.config:Config"] = Config("gateway.app:create_app", log_config=None)
    made["uvicorn.server:Server"] = Server(config)
    made["uvicorn.supervisors.multiprocess:Multiprocess"] = Multiprocess(config, sockets=[])


async def _redis(made: dict[str, Any]) -> None:
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import Connection, ConnectionPool
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    pool = ConnectionPool()
    # Any: redis-py types these constructors in some releases only, and an
    # ignore comment would be an unused-ignore error under the others.
    sentinel_class: Any = Sentinel
    sentinel_pool_class: Any = SentinelConnectionPool
    sentinel = sentinel_class([])
    made.update(
        {
            "redis.asyncio.connection:ConnectionPool": pool,
            "redis.asyncio.connection:Connection": Connection(),
            "redis.asyncio.sentinel:Sentinel": sentinel,
            "redis.asyncio.sentinel:SentinelConnectionPool": sentinel_pool_class("probe", sentinel),
            "redis.asyncio.cluster:ClusterNode": ClusterNode("127.0.0.1", 6379),
            # Not initialised, so it holds no connection and needs no closing.
            "redis.asyncio.cluster:RedisCluster": RedisCluster(host="127.0.0.1", port=6379),
            "redis.asyncio.client:PubSub": PubSub(pool),
        }
    )
    await pool.aclose()
