"""The serving process's life: descriptors, signals, draining, workers.

    start-up   the file-descriptor soft limit is raised to the hard limit: each
               client connection and each upstream connection is one descriptor
    SIGTERM    drain: every process stops listening at once (new connections are
    SIGINT     refused), requests in flight get GATEWAY_SHUTDOWN_GRACE_SECONDS,
               then their connections close; ``draining`` is set meanwhile
    SIGHUP     logged and ignored, whatever the worker count: settings are read
               once at start-up, so new settings take a restart (rolling update)

With ``GATEWAY_WORKERS`` > 1 the listening socket is shared by the supervisor
and the workers, and the kernel keeps accepting connections on it until the
last process closes its copy: the supervisor closes its own as soon as it is
told to stop, instead of when it exits, so nothing queues unanswered.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import threading
from collections import Counter
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway.capacity import ConnectionTable

if TYPE_CHECKING:
    from gateway.protocol import GatewayHttpProtocol, HttpLimits

logger = logging.getLogger("gateway")

#: Set when this process begins its graceful shutdown; ``/readyz`` answers 503
#: from then on (a load balancer still probing it takes it out of rotation).
draining = threading.Event()

_SIGHUP_IGNORED = (
    "SIGHUP ignored: settings are read once at start-up; restart the gateway "
    "(a rolling update) to change them"
)
#: uvicorn's exit status for a worker that could not start.
_STARTUP_FAILURE = 3


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit; 2**20 is its usual nr_open.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("Could not raise the file-descriptor limit to %d: %s", target, exc)
            return soft
        return target
    return soft


def _log_sighup(signum: int, frame: FrameType | None) -> None:
    logger.info(_SIGHUP_IGNORED)


class GatewayConfig(uvicorn.Config):
    """uvicorn's configuration plus what :class:`~gateway.protocol.GatewayHttpProtocol` reads.

    Built in the supervisor and copied into each worker, so the per-client
    connection counts and the table of connections below are per worker, like
    every other connection limit.
    """

    def __init__(self, app: Any, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(app, backlog=limits.backlog, **kwargs)
        self.limits = limits
        self.connections_by_client: Counter[str] = Counter()
        self.connection_table: ConnectionTable[GatewayHttpProtocol] = ConnectionTable(
            limits.max_connections, max_lingering=max(1, limits.backlog // 4)
        )

    def load(self) -> None:
        super().load()
        # Runs in every serving process (the single one, or each worker)
        # before it serves; uvicorn itself only handles SIGINT and SIGTERM.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, _log_sighup)


class GatewaySupervisor(Multiprocess):
    """uvicorn's worker supervisor: stops listening at once, ignores SIGHUP."""

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()

    def handle_hup(self) -> None:
        logger.info(_SIGHUP_IGNORED)

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()


def run(config: GatewayConfig) -> None:
    """Serve until SIGTERM/SIGINT (what ``uvicorn.run`` does, with our supervisor)."""
    server = uvicorn.Server(config)
    if config.workers > 1:
        GatewaySupervisor(config, sockets=[config.bind_socket()]).run()
        return
    server.run()
    if not server.started:
        sys.exit(_STARTUP_FAILURE)
