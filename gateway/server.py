"""Running the gateway under uvicorn (uvloop event loop, httptools parser).

The connection-level defences live in :mod:`gateway.protocol`, the process
lifecycle (signals, draining, workers) in :mod:`gateway.lifecycle`.
"""

from __future__ import annotations

import logging
import logging.config
import signal
from types import FrameType

from gateway.capacity import budget
from gateway.lifecycle import GatewayConfig, raise_fd_limit, run
from gateway.logs import log_config
from gateway.metrics import shared_across_workers
from gateway.protocol import HttpLimits
from gateway.settings import Settings

logger = logging.getLogger("gateway")


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; returns after a graceful shutdown."""
    config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(config)
    # uvicorn drains on SIGTERM/SIGINT, restores the handlers it found and then
    # raises the signal again, so with the default handlers a clean shutdown
    # would still end as "killed by SIGTERM". Ours turns it into exit status 0
    # (and also covers a signal that arrives before uvicorn installs its own).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    fd_limit = raise_fd_limit()
    limits = HttpLimits.from_settings(settings, fd_limit=fd_limit)
    logger.info(
        "File-descriptor limit %d: at most %d client connections per worker (listen backlog %d)",
        fd_limit,
        limits.max_connections,
        limits.backlog,
    )
    safe = budget(fd_limit).safe_max_connections
    if limits.max_connections > safe:
        logger.warning(
            "GATEWAY_MAX_CONNECTIONS=%d is more than the %d connections that %d descriptors "
            "leave room for: in a connection flood accept() may fail before connections "
            "are shed (raise the descriptor limit, or unset the setting)",
            limits.max_connections,
            safe,
            fd_limit,
        )
    # Metrics from several workers are summed in a directory they share.
    with shared_across_workers(settings.workers):
        run(
            GatewayConfig(
                "gateway.app:create_app",
                limits=limits,
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=settings.workers,
                loop="uvloop",
                http="gateway.protocol:GatewayHttpProtocol",
                timeout_keep_alive=settings.client_keepalive_timeout,
                # Start-up failures must stop the process ("auto" would serve anyway).
                lifespan="on",
                # uvicorn would otherwise trust X-Forwarded-* from loopback peers.
                proxy_headers=False,
                server_header=False,
                # Proxied responses carry the upstream's Date; the gateway's own
                # responses add theirs (errors.error_response_headers).
                date_header=False,
                access_log=False,
                log_config=config,
                log_level=settings.log_level,
                # The protocol ends what is still open when the grace period is
                # over; uvicorn's own deadline (which cancels tasks, logging an
                # error for each) is only a backstop behind it.
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
                ws="none",
            )
        )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
