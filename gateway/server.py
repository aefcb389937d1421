"""Running the gateway under uvicorn (uvloop event loop, httptools parser)."""

from __future__ import annotations

import logging
import logging.config
import signal
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import BadRequest, error_response_headers
from gateway.logs import log_config
from gateway.metrics import shared_across_workers
from gateway.settings import Settings


class GatewayHttpProtocol(HttpToolsProtocol):
    """httptools protocol that tells the app about absolute-form targets.

    uvicorn reduces ``GET http://host/path`` to its path, so the app could
    not refuse it; the gateway accepts origin-form targets only (RFC 9112
    3.2.1: absolute-form is for requests to proxies, which this is not).
    """

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if not self.url.startswith(b"/"):
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions["gateway.absolute_form"] = True

    def send_400_response(self, msg: str) -> None:
        # The parser refused the request before the app saw it (raw control or
        # non-ASCII bytes in the target, broken framing); answer in the same
        # OpenAI shape as every other response the gateway makes itself.
        error = BadRequest(msg)
        body = error.body()
        head = b"".join(n + b": " + v + b"\r\n" for n, v in error_response_headers(error, body))
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\n" + head + b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


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
    with shared_across_workers(settings.workers):
        _run(settings, config)


def _run(settings: Settings, config: dict[str, Any]) -> None:
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="gateway.server:GatewayHttpProtocol",
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
        timeout_graceful_shutdown=30,
        ws="none",
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
