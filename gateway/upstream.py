"""The shared upstream HTTP client, and the one place its errors are translated.

aiohttp's client, measured against httpx on this workload (docs/performance.md,
"Why raw ASGI and aiohttp"), proxies several times more requests per second at
a fraction of the tail latency. One pooled session per process; nothing is
taken from the environment (``trust_env=False``: no proxy variables, no
.netrc), no cookies are kept between callers, and bodies are never decoded or
re-encoded. An egress proxy is used only when ``GATEWAY_UPSTREAM_PROXY`` names
one: plain http upstreams are sent to it in absolute form, https ones through
CONNECT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.settings import Settings


def create_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_max_connections,  # aiohttp: 0 is no limit
        limit_per_host=0,
        ttl_dns_cache=60,
        keepalive_timeout=settings.upstream_keepalive_timeout,
        enable_cleanup_closed=False,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        # aiohttp's connect covers waiting for a pool slot and connecting.
        connect=settings.upstream_pool_timeout + settings.upstream_connect_timeout,
        sock_connect=settings.upstream_connect_timeout,
        sock_read=settings.upstream_read_timeout,
    )
    # Credentials in the proxy URL become Proxy-Authorization (aiohttp reads
    # the URL's userinfo), so they never need a separate setting.
    proxy = settings.upstream_proxy.get_secret_value() if settings.upstream_proxy else None
    return aiohttp.ClientSession(
        connector=connector,
        proxy=proxy,
        timeout=timeout,
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # The caller's headers are forwarded as they came; aiohttp adds none.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        read_bufsize=2**16,
        max_line_size=16 * 1024,
        max_field_size=16 * 1024,
    )


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen


def _drop_frames(exc: BaseException) -> None:
    """Forget where an upstream error was raised; its type and message stay.

    aiohttp keeps a response's error on the response's reader (to raise it
    again on the next read), and the traceback runs through that reader's
    frames and the proxy's: a reference cycle holding the client's
    connection too, per stream the upstream cuts or times out, that only a
    rare full collection would free. The gateway answers these errors, it
    does not log their tracebacks.
    """
    seen: BaseException | None = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map aiohttp's exceptions to the gateway's tree: the only place that does.

    It covers the whole exchange, the response body included; the proxy
    turns an error after the response started into a cut connection.
    Errors raised by our own request-body iterator arrive wrapped by aiohttp;
    they are unwrapped so a client disconnect or an oversized body is reported
    as what it is, not as an upstream failure.
    """
    try:
        yield
    except aiohttp.ClientError as exc:
        cause = _root_cause(exc)
        if isinstance(cause, (ClientDisconnected, GatewayError)):
            raise cause from None
        _drop_frames(exc)
        if isinstance(exc, aiohttp.ServerTimeoutError) or isinstance(cause, asyncio.TimeoutError):
            raise UpstreamTimeout("The upstream did not answer in time.") from exc
        raise UpstreamUnavailable("The upstream could not be reached.") from exc
    except TimeoutError as exc:
        _drop_frames(exc)
        raise UpstreamTimeout("The upstream did not answer in time.") from exc
