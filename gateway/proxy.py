"""The forwarding path: a raw ASGI app, because it is the hot path.

Measured here, starlette's Request/StreamingResponse halved throughput next to
plain ASGI messages, so this module speaks ASGI directly. For each request:

1. vet the raw target and headers, match the route table (deny by default);
2. for client traffic, the admission decision (``Gatekeeper``);
3. forward with streaming both ways, never buffering a body, except the small
   JSON answers of session create and cancel, which the gateway must read
   (to learn or revoke) before the caller sees them.

A client that goes away cancels the upstream request at any point, and the
pooled upstream connection is closed rather than reused half-written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from gateway.admission import Gatekeeper
from gateway.auth import SecretHasher
from gateway.errors import (
    AuthError,
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    StoreUnavailable,
    StreamAborted,
    UpstreamTimeout,
    error_response_headers,
)
from gateway.headers import (
    check_limits,
    client_response_headers,
    content_length,
    header_value,
    is_cors_preflight,
    request_id,
    upstream_request_headers,
)
from gateway.metrics import Metrics
from gateway.registry import (
    SESSION_ID,
    Unlearnable,
    decoded_body,
    secret_hash_from_cancel,
    session_from_response,
)
from gateway.revocation import Revoker
from gateway.routes import Kind, Match, RouteTable, check_raw_path
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.upstream import BodyTooLarge, ClientDisconnected, translate_errors

logger = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

Scope = dict[str, Any]
Receive = Any
Send = Any

#: Session create/cancel answers are small JSON; anything larger is passed
#: through unread (and counted), never buffered without bound.
MAX_CONTROL_BODY = 1024 * 1024
#: How many recently created sessions each replica remembers (id -> hash, about
#: 150 bytes each) for cancels that arrive while the store is unreachable.
RECENT_SESSIONS = 100_000


class _Exchange:
    """One request/response in flight: what was sent, and why it may be cut short."""

    __slots__ = ("_send", "aborted", "request_id", "started", "status", "task", "watcher")

    def __init__(self, send: Send, rid: bytes) -> None:
        self._send = send
        self.request_id = rid
        self.started = False
        self.status = 0
        self.aborted: str | None = None  # "disconnect" | "write_timeout" | "revoked"
        self.task = asyncio.current_task()
        self.watcher: asyncio.Future[Any] | None = None

    def abort(self, reason: str) -> None:
        if self.aborted is None and self.task is not None:
            self.aborted = reason
            self.task.cancel()

    def close_revoked(self) -> None:
        self.abort("revoked")

    def watch_disconnect(self, receive: Receive) -> None:
        """After the request body is consumed, a disconnect cancels the exchange."""
        if self.watcher is None:
            self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.abort("disconnect")

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, chunk: bytes, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def error(self, exc: GatewayError) -> None:
        body = exc.body()
        headers = error_response_headers(exc, body)
        headers.append((b"x-request-id", self.request_id))
        await self.start(exc.status, headers)
        await self.body(body, False)


class Proxy:
    """ASGI app that forwards the allowed ChatKit routes to the upstream."""

    def __init__(
        self,
        *,
        settings: Settings,
        session: aiohttp.ClientSession,
        store: Store,
        gatekeeper: Gatekeeper,
        revoker: Revoker,
        hasher: SecretHasher,
        metrics: Metrics,
        routes: RouteTable | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._store = store
        self._gatekeeper = gatekeeper
        self._revoker = revoker
        self._hasher = hasher
        self._metrics = metrics
        self._routes = routes or RouteTable()
        self._upstreams = {"default": settings.upstream_url, **settings.upstreams}
        self._max_body = settings.max_body_bytes
        self._write_timeout = settings.upstream_write_timeout
        self._access_log = settings.access_log
        # Sessions this replica saw created, newest last: lets a cancel find
        # the secret's hash even when the store is down at that moment.
        self._recent_sessions: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        exchange = _Exchange(send, request_id(headers))
        kind = "rejected"
        started = time.perf_counter() if self._access_log else 0.0
        try:
            match = self._route(scope, headers)
            kind = match.route.kind.value
            await self._forward(scope, receive, exchange, match, headers)
        except GatewayError as exc:
            if exchange.started:
                raise StreamAborted(exc.message) from exc
            await exchange.error(exc)
            self._metrics.count_request(kind, exc.status)
        except ClientDisconnected:
            # The upload was cut short; aiohttp closed the upstream connection.
            self._metrics.client_disconnects.inc()
        except asyncio.CancelledError:
            if exchange.aborted is None:
                raise
            # Our own cancellation: swallow it so the server sees a normal end.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await self._aborted(exchange)
        finally:
            exchange.stop_watching()
            if self._access_log:
                # The path without its query: a query string may carry anything.
                access_log.info(
                    "%s %s %d %s %.1fms rid=%s%s",
                    scope["method"],
                    scope["path"],
                    exchange.status,
                    kind,
                    (time.perf_counter() - started) * 1000,
                    exchange.request_id.decode("latin-1"),
                    f" aborted={exchange.aborted}" if exchange.aborted else "",
                )

    async def _aborted(self, exchange: _Exchange) -> None:
        reason = exchange.aborted
        if reason == "disconnect":
            self._metrics.client_disconnects.inc()
            return
        if exchange.started:
            raise StreamAborted(f"response cut off: {reason}")
        if reason == "write_timeout":
            await exchange.error(UpstreamTimeout("The upstream stopped reading the request body."))
        elif reason == "revoked":
            # Revoked while we waited for the upstream: the request goes no further.
            await exchange.error(
                AuthError("This client secret has been revoked.", code="client_secret_revoked")
            )

    def _route(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> Match:
        if scope.get("extensions", {}).get("gateway.absolute_form"):
            raise BadRequest("Absolute-form request targets are not accepted.")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        check_raw_path(raw_path)
        match = self._routes.match(scope["method"], raw_path.decode("ascii"))
        check_limits(
            headers, max_bytes=self._settings.max_header_bytes, max_count=self._settings.max_headers
        )
        return match

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        exchange: _Exchange,
        match: Match,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        length = content_length(headers)
        if length is not None and length > self._max_body:
            raise PayloadTooLarge(f"The request body exceeds {self._max_body} bytes.")
        has_body = (length or 0) > 0 or (
            length is None and header_value(headers, b"transfer-encoding") is not None
        )
        kind = match.route.kind
        if kind is not Kind.CLIENT or is_cors_preflight(scope["method"], headers):
            cancel_hash = None
            if kind is Kind.SESSION_CANCEL:
                cancel_hash = await self._resolve_for_cancel(match.params["session_id"])
            await self._exchange(
                scope, receive, exchange, match, headers, has_body, [], cancel_hash
            )
            return
        secret_hash, extra = await self._gatekeeper.check(headers)
        if secret_hash is None:  # report-only mode let a malformed secret through
            await self._exchange(scope, receive, exchange, match, headers, has_body, extra, None)
            return
        # From admission on, a revocation of this secret anywhere ends the
        # exchange: with a 401 while the upstream has not answered yet, by
        # cutting the stream off once it has.
        self._revoker.track(secret_hash, exchange.close_revoked)
        try:
            await self._exchange(scope, receive, exchange, match, headers, has_body, extra, None)
        finally:
            self._revoker.untrack(secret_hash, exchange.close_revoked)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        exchange: _Exchange,
        match: Match,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
        extra: list[tuple[bytes, bytes]],
        cancel_hash: str | None,
    ) -> None:
        """Forward the request and relay the answer (or act on it, for control routes)."""
        kind = match.route.kind
        client = scope.get("client")
        out_headers = upstream_request_headers(
            headers,
            client_ip=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            request_id=exchange.request_id,
            trust_forwarded=self._settings.trust_forwarded_headers,
        )
        if kind is Kind.SESSION_CREATE or kind is Kind.SESSION_CANCEL:
            # The gateway must read these answers: ask for them uncompressed
            # (the official SDKs send Accept-Encoding: gzip).
            out_headers = [(n, v) for n, v in out_headers if n != b"accept-encoding"]
            out_headers.append((b"accept-encoding", b"identity"))
        query = scope.get("query_string", b"")
        target = self._upstreams[match.route.upstream] + scope["raw_path"].decode("ascii")
        if query:
            target += "?" + query.decode("latin-1")
        body = self._body(receive, exchange) if has_body else None
        if body is None:
            exchange.watch_disconnect(receive)

        with translate_errors():
            async with self._session.request(
                scope["method"],
                URL(target, encoded=True),
                headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in out_headers],
                data=body,
                allow_redirects=False,
                compress=None,
            ) as response:
                response_headers = client_response_headers(
                    response.raw_headers, request_id=exchange.request_id
                )
                if kind is Kind.SESSION_CREATE or kind is Kind.SESSION_CANCEL:
                    await self._control(
                        exchange, response, response_headers, kind, match, cancel_hash
                    )
                else:
                    if extra:
                        response_headers.extend(extra)
                    await self._stream(exchange, response, response_headers)
        self._metrics.count_request(kind.value, response.status)

    async def _stream(
        self,
        exchange: _Exchange,
        response: aiohttp.ClientResponse,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        await exchange.start(response.status, headers)
        try:
            async for chunk in response.content.iter_any():
                await exchange.body(chunk, True)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._metrics.upstream_errors.labels("mid_stream").inc()
            raise StreamAborted("upstream failed mid-response") from exc
        await exchange.body(b"", False)

    async def _control(
        self,
        exchange: _Exchange,
        response: aiohttp.ClientResponse,
        headers: list[tuple[bytes, bytes]],
        kind: Kind,
        match: Match,
        cancel_hash: str | None,
    ) -> None:
        """Session create/cancel: read the (small) answer, act on it, then reply.

        The action (learning or revoking) completes before the caller sees the
        answer, so a secret is usable, or revoked, the moment it is returned.
        """
        chunks: list[bytes] = []
        size = 0
        complete = response.content_length is None or response.content_length <= MAX_CONTROL_BODY
        if complete:
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_CONTROL_BODY:
                    complete = False
                    break
        body = b"".join(chunks) if complete else None
        if 200 <= response.status < 300:
            parsed = None
            if body is None:
                self._metrics.sessions_unparsed.labels("too_large").inc()
            else:
                encoding = response.headers.get("content-encoding")
                parsed = decoded_body(body, encoding, limit=MAX_CONTROL_BODY)
                if parsed is None:
                    self._metrics.sessions_unparsed.labels("encoding").inc()
            # Shielded: once the upstream has acted, a client that goes away
            # must not stop the gateway from recording it.
            if kind is Kind.SESSION_CREATE:
                await asyncio.shield(self._learn(parsed))
            else:
                await asyncio.shield(
                    self._revoke_cancelled(match.params["session_id"], cancel_hash, parsed, headers)
                )
        await exchange.start(response.status, headers)
        if body is not None:
            await exchange.body(body, False)
            return
        for seen in chunks:
            await exchange.body(seen, True)
        await self._stream_rest(exchange, response)

    async def _stream_rest(self, exchange: _Exchange, response: aiohttp.ClientResponse) -> None:
        async for chunk in response.content.iter_any():
            await exchange.body(chunk, True)
        await exchange.body(b"", False)

    async def _learn(self, body: bytes | None) -> None:
        if body is None:
            return  # too large or in an encoding we do not read; counted
        try:
            record = session_from_response(
                body,
                hasher=self._hasher,
                default_limit=self._settings.default_max_requests_per_1_minute,
            )
        except Unlearnable as exc:
            self._metrics.sessions_unparsed.labels(exc.reason).inc()
            logger.warning("Session-create response not learned: %s", exc.reason)
            return
        self._remember(record.session_id, record.secret_hash)
        try:
            born_revoked = await self._store.register(record)
        except StoreUnavailable as exc:
            # The caller still gets its session; requests with that secret will
            # be refused as unknown until it is recreated. Counted and logged.
            self._metrics.sessions_unparsed.labels("store_unavailable").inc()
            logger.error("Session %s not registered: %s", record.session_id, exc)
            return
        self._metrics.sessions_registered.inc()
        if born_revoked:
            self._revoker.close_streams(record.secret_hash)
            logger.info("Session %s was cancelled before it was registered", record.session_id)

    async def _resolve_for_cancel(self, session_id: str) -> str | None:
        """Look the secret up before forwarding, so a store failure after the
        upstream succeeded can still be enforced locally by hash."""
        if not SESSION_ID.match(session_id):
            return None
        try:
            found = await self._store.secret_hash_for(session_id)
        except StoreUnavailable:
            found = None
        return found or self._recent_sessions.get(session_id)

    def _remember(self, session_id: str, secret_hash: str) -> None:
        self._recent_sessions[session_id] = secret_hash
        if len(self._recent_sessions) > RECENT_SESSIONS:
            self._recent_sessions.popitem(last=False)

    async def _revoke_cancelled(
        self,
        session_id: str,
        known_hash: str | None,
        body: bytes | None,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        echoed = secret_hash_from_cancel(body, hasher=self._hasher) if body else None
        hashes: set[str | None] = {h for h in (known_hash, echoed) if h is not None} or {None}
        sid = session_id if SESSION_ID.match(session_id) else None
        stored = True
        for secret_hash in hashes:
            result = await self._revoker.revoke(
                secret_hash=secret_hash, session_id=sid, reason="cancel"
            )
            stored = stored and result is not None
        headers.append((b"x-chatkit-gateway-revocation", b"stored" if stored else b"pending"))

    async def _body(self, receive: Receive, exchange: _Exchange) -> AsyncIterator[bytes]:
        """The request body as it arrives; raises (never ends early) on a disconnect."""
        loop = asyncio.get_running_loop()
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.aborted = "disconnect"
                raise ClientDisconnected("client disconnected during the upload")
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if received > self._max_body:
                raise BodyTooLarge(f"The request body exceeds {self._max_body} bytes.")
            more = message.get("more_body", False)
            if not more:
                exchange.watch_disconnect(receive)
            if chunk:
                # aiohttp resumes this generator once the chunk is written; if
                # the upstream stops reading for too long, give up with a 504.
                timer = loop.call_later(self._write_timeout, exchange.abort, "write_timeout")
                try:
                    yield chunk
                finally:
                    timer.cancel()
            if not more:
                return
