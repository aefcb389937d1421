"""The forwarding path: a raw ASGI app, because it is the hot path.

Measured here, starlette's Request/StreamingResponse halved throughput next to
plain ASGI messages, so this module speaks ASGI directly. For each request:

1. vet the raw target and headers, match the route table (deny by default);
2. for client traffic, the admission decision (``Gatekeeper``);
3. forward with streaming both ways, never buffering a body, except session
   create and cancel: their small JSON bodies are read whole and handed to
   :class:`~gateway.sessions.SessionControl`, which decides what they mean.

A client that goes away cancels the upstream request at any point, and the
pooled upstream connection is closed rather than reused half-written; a
session call alone runs to its end, since the upstream may already have acted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from gateway.admission import Admission, Gatekeeper
from gateway.chatkit import (
    Envelope,
    RequestClass,
    error_event,
    may_be_transcribe,
    needs,
    parse_envelope,
    requested_model,
)
from gateway.cors import CorsPolicy
from gateway.errors import (
    AuthError,
    BadRequest,
    ClientDisconnected,
    GatewayError,
    PayloadTooLarge,
    RateLimited,
    StreamAborted,
    UpstreamTimeout,
    error_response_headers,
)
from gateway.head import RequestHead, request_head
from gateway.headers import (
    CORS_HEADERS,
    PREFLIGHT_WITHOUT,
    RATE_LIMIT_HEADERS,
    check_limits,
    client_response_headers,
    header_value,
    is_cors_preflight,
    request_id,
    upstream_request_headers,
)
from gateway.identity import PREFIX as IDENTITY_PREFIX
from gateway.identity import IdentityHeaders
from gateway.metrics import Metrics
from gateway.model.budgets import BudgetKey
from gateway.model.metering import BudgetExceeded
from gateway.model.routes import ModelRequest, ModelUpstream, prepare
from gateway.model.tokens import HEADER as MODEL_TOKEN_HEADER
from gateway.model.usage import StreamMeter, Usage, body_usage
from gateway.ratelimit import Identity
from gateway.revocation import Revoker
from gateway.routes import ISSUED_PREFIX, Kind, Match, RouteTable, check_raw_path
from gateway.sessions import MAX_CONTROL_BODY, Answer, SessionControl
from gateway.settings import Settings
from gateway.telemetry import RequestTelemetry, Telemetry
from gateway.types import Headers, Message, Receive, Scope, Send
from gateway.upstream import translate_errors

logger = logging.getLogger(__name__)

#: How long an exchange runs before a task starts watching for the client's
#: disconnect. Most answers come sooner and never need one (see watch_disconnect).
WATCH_AFTER = 0.05
#: Vetted and matched request targets, remembered: a page's traffic is a few
#: paths over and over, and checking and matching one cost ~4% of a request.
#: Bounded in count and path length, so a spray of made-up paths cannot grow it.
MATCH_CACHE_SIZE = 1024
MATCH_CACHE_PATH_BYTES = 256
#: An upload's body is the file in multipart framing (boundaries, part
#: headers): this much beyond the session's max_file_size is framing.
MULTIPART_SLACK = 16 * 1024


class _Exchange:
    """One request/response in flight: the request as the server handed it
    over, what was sent back, and why it may be cut short."""

    __slots__ = (
        "_send",
        "aborted",
        "always",
        "complete",
        "head",
        "headers",
        "match",
        "receive",
        "request_id",
        "scope",
        "started",
        "status",
        "task",
        "tel",
        "watch_timer",
        "watcher",
    )

    #: The route, once matched (before that nothing reads it).
    match: Match

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        head: RequestHead,
        rid: bytes,
        tel: RequestTelemetry,
    ) -> None:
        self.scope = scope
        self.receive = receive
        self._send = send
        self.head = head
        self.headers: Headers = scope["headers"]
        self.request_id = rid
        self.tel = tel
        #: Headers every answer carries, the gateway's own errors included (CORS).
        self.always: Headers = []
        self.started = False
        self.complete = False
        self.status = 0
        self.aborted: str | None = None  # "disconnect" | "write_timeout" | "revoked"
        self.task = asyncio.current_task()
        self.watcher: asyncio.Future[None] | None = None
        self.watch_timer: asyncio.TimerHandle | None = None

    def abort(self, reason: str) -> None:
        if self.aborted is None and self.task is not None:
            self.aborted = reason
            self.task.cancel()

    def close_revoked(self) -> None:
        self.abort("revoked")

    def watch_disconnect(self) -> None:
        """After the request body is consumed, a disconnect cancels the exchange.

        The watching task starts once the exchange has lasted ``WATCH_AFTER``
        (a disconnect before then is seen at that point): a task per request
        cost a loop turn and two task steps of CPU, for answers that nearly
        all come sooner; a timer that is cancelled costs next to nothing.
        """
        if self.watcher is None and self.watch_timer is None:
            loop = asyncio.get_running_loop()
            self.watch_timer = loop.call_later(WATCH_AFTER, self._start_watching)

    def _start_watching(self) -> None:
        self.watch_timer = None
        if self.task is not None:
            self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        receive = self.receive
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            # Cancelled by stop_watching (a stream cut by a revocation, a
            # write timeout or the upstream): end normally. A task that ends
            # cancelled keeps its CancelledError, whose traceback's frames
            # hold this exchange, which holds the task: a reference cycle
            # per cut stream, with the connection's transport and buffers
            # in it, that only a full collection frees; and the streams are
            # old enough by then to sit in the oldest generation, which the
            # gateway's thresholds collect very rarely. Nothing awaits this
            # task, so nobody misses the cancellation.
            return
        self.abort("disconnect")

    def stop_watching(self) -> None:
        """The exchange is over: from now on a disconnect changes nothing."""
        self.task = None  # makes abort() a no-op
        if self.watch_timer is not None:
            self.watch_timer.cancel()
        # Once the response is complete the server's receive() answers at once,
        # so the watcher ends by itself. Cancelling it would leave its
        # CancelledError, traceback and frames (and with them this exchange)
        # in a reference cycle that only the garbage collector frees: ~40
        # objects per request, and a gen-0 collection of 6-11 ms every few
        # hundred requests, which was the one-connection p99.
        if self.watcher is not None and not self.complete:
            self.watcher.cancel()

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status
        if self.always:
            headers = headers + self.always
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, chunk: bytes, more: bool) -> None:
        self.tel.bytes_out += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})
        if not more:
            self.complete = True

    async def error(self, exc: GatewayError) -> None:
        body = exc.body()
        headers = error_response_headers(exc, body)
        headers.append((b"x-request-id", self.request_id))
        await self.start(exc.status, headers)
        await self.body(body, False)


@dataclass(slots=True)
class _Reading:
    """What a model call's answer reported, as far as it got."""

    usage: Usage | None = None


@dataclass(slots=True)
class Outbound:
    """One request for the upstream, ready to send."""

    method: str
    url: URL
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes] | bytes | None


class Proxy:
    """ASGI app that forwards the allowed ChatKit routes to the upstream."""

    def __init__(
        self,
        *,
        settings: Settings,
        session: aiohttp.ClientSession,
        gatekeeper: Gatekeeper,
        revoker: Revoker,
        sessions: SessionControl,
        metrics: Metrics,
        routes: RouteTable,
        telemetry: Telemetry,
        model: ModelUpstream | None = None,
    ) -> None:
        self._session = session
        self._model = model
        self._gatekeeper = gatekeeper
        self._revoker = revoker
        self._sessions = sessions
        self._metrics = metrics
        self._routes = routes
        self._matched: dict[tuple[str, bytes], Match] = {}
        # What the hot path needs from the settings, read once.
        self._upstreams = {"default": settings.upstream_url, **settings.upstreams}
        self._max_body = settings.max_body_bytes
        self._max_header_bytes = settings.max_header_bytes
        self._max_headers = settings.max_headers
        self._write_timeout = settings.upstream_write_timeout
        self._trust_forwarded = settings.trust_forwarded_headers
        self._telemetry = telemetry
        self._workflows = {name: w.upstream for name, w in settings.workflows.items()}
        self._policies = {name: w.policy for name, w in settings.workflows.items()}
        self._max_envelope = settings.chatkit_max_envelope_bytes
        self._max_transcribe = settings.chatkit_max_transcribe_bytes
        self._envelope_bound = max(self._max_envelope, self._max_transcribe)
        key = settings.identity_signing_key
        self._identity = IdentityHeaders(
            signing_key=key.get_secret_value().encode() if key else None,
            issuer=settings.identity_issuer,
            ttl_seconds=settings.identity_assertion_ttl_seconds,
        )
        origins = settings.cors_origin_list
        self._cors = CorsPolicy(origins) if origins else None
        # Upstream headers the gateway states itself on client routes.
        self._client_drop = RATE_LIMIT_HEADERS | (CORS_HEADERS if self._cors else frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # What the request says, read once (by the protocol, as it parsed);
        # the header list itself is walked once more, to build the upstream's.
        head = request_head(scope)
        rid = request_id(head.request_id)
        exchange = _Exchange(
            scope, receive, send, head, rid, self._telemetry.begin(scope, rid, head)
        )
        kind = "rejected"
        try:
            exchange.match = self._route(scope, head)
            kind = exchange.match.route.kind.value
            await self._handle(exchange)
        except GatewayError as exc:
            exchange.tel.failed(exc, started=exchange.started)
            if exchange.started:
                raise StreamAborted(exc.message) from exc
            # Answered, never logged: its traceback's frames (the raiser's
            # holds the error in a local) would keep it and this exchange in a
            # reference cycle for the garbage collector, per 401 and 429.
            exc.__traceback__ = None
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
            exchange.tel.finish(kind, exchange.status, exchange.aborted)

    async def _aborted(self, exchange: _Exchange) -> None:
        reason = exchange.aborted
        if reason == "disconnect":
            self._metrics.client_disconnects.inc()
            return
        if exchange.started:
            raise StreamAborted(f"response cut off: {reason}")
        if reason == "write_timeout":
            error = UpstreamTimeout("The upstream stopped reading the request body.")
            exchange.tel.failed(error, started=False)
            await exchange.error(error)
        elif reason == "revoked":
            # Revoked while we waited for the upstream: the request goes no further.
            await exchange.error(
                AuthError("This client secret has been revoked.", code="client_secret_revoked")
            )

    def _route(self, scope: Scope, head: RequestHead) -> Match:
        if scope.get("extensions", {}).get("gateway.absolute_form"):
            raise BadRequest("Absolute-form request targets are not accepted.")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        method: str = scope["method"]
        match = self._matched.get((method, raw_path))
        if match is None:
            check_raw_path(raw_path)
            match = self._routes.match(method, raw_path.decode("ascii"))
            if len(raw_path) <= MATCH_CACHE_PATH_BYTES:
                if len(self._matched) >= MATCH_CACHE_SIZE:
                    self._matched.clear()
                self._matched[(method, raw_path)] = match
        if not head.checked:
            # The gateway's protocol holds every head to these limits as it
            # reads it; another server (plain uvicorn) may not have.
            check_limits(head, max_bytes=self._max_header_bytes, max_count=self._max_headers)
        return match

    async def _handle(self, exchange: _Exchange) -> None:
        head = exchange.head
        match = exchange.match
        if head.problem is not None:
            raise BadRequest(head.problem)
        length = head.content_length
        if length is not None and length > self._max_body:
            raise PayloadTooLarge(f"The request body exceeds {self._max_body} bytes.")
        has_body = (length or 0) > 0 or (length is None and head.chunked)
        kind = match.route.kind
        if kind is Kind.MODEL and self._model is not None:
            await self._model_call(exchange, length, self._model)
            return
        if kind is Kind.SESSION_CREATE or kind is Kind.SESSION_CANCEL:
            await self._session_call(exchange, has_body, length)
            return
        if kind is not Kind.CLIENT and kind is not Kind.ISSUED:
            outbound = self._outbound(exchange, None)
            if has_body:
                outbound.body = await self._request_body(exchange)
            await self._forward(exchange, outbound, kind, [])
            return
        cors = self._cors
        origin = head.origin if cors is not None else None
        if is_cors_preflight(head):
            if cors is not None:
                await self._preflight(exchange, cors, origin)
                return
            outbound = self._outbound(exchange, None, without=PREFLIGHT_WITHOUT)
            await self._forward(exchange, outbound, kind, [])
            return
        if cors is not None:
            exchange.always = cors.response_headers(origin)
        envelope: Envelope | None = None
        body: bytes | None = None
        cls = need = ""
        declared = upload_limit = 0
        model: str | None = None
        secret = self._gatekeeper.secret(head) if kind is Kind.ISSUED else None
        if secret is not None:
            # What an issued request counts against depends on what it is.
            if match.route.pattern == ISSUED_PREFIX and exchange.scope["method"] == "POST":
                body = await self._envelope_body(exchange, length)
                envelope = parse_envelope(
                    body, max_bytes=self._max_envelope, max_transcribe_bytes=self._max_transcribe
                )
                cls = envelope.cls.value
                exchange.tel.cls = cls
                need, declared = needs(envelope)
                model = requested_model(envelope)
            else:
                cls = exchange.tel.cls = RequestClass.UPLOAD.value
                need = "upload"
        mint = None
        if self._model is not None and envelope is not None and envelope.cls is RequestClass.TURN:
            mint = self._model.tokens.mint  # granted by the admission step itself
        try:
            admission = await exchange.tel.admission(
                self._gatekeeper.check(
                    head, cls, need, declared, model, mint, exchange.request_id.decode(), secret
                )
            )
        except RateLimited as exc:
            policy = self._policies.get(exc.workflow_id)
            exchange.tel.workflow = exc.workflow_id
            if policy is None or policy.limit_answer != "chatkit" or cls != RequestClass.TURN:
                raise
            await self._limit_event(exchange, exc, kind)
            return
        if admission.identity is not None and admission.identity.app:
            exchange.tel.app = admission.identity.app  # the access log names the app
        if kind is Kind.ISSUED:
            outbound = self._issued_outbound(exchange, admission)
            if admission.identity is not None:
                exchange.tel.workflow = admission.identity.workflow_id
                if need == "upload" and admission.identity.max_file_bytes:
                    # The file's bytes, whatever its attachments.create declared.
                    upload_limit = admission.identity.max_file_bytes + MULTIPART_SLACK
                    if length is not None and length > upload_limit:
                        raise _file_too_large(upload_limit)
        else:
            if admission.identity is not None and admission.identity.workflow_id in self._workflows:
                # An issued secret is for its workflow's server, never the hosted API.
                raise _not_for_this_route()
            outbound = self._outbound(exchange, None)
        secret_hash = admission.secret_hash
        if body is not None:  # the envelope, read before admission: sent as it came
            outbound.body = body
            has_body = False
            exchange.watch_disconnect()
        if secret_hash is None:  # report-only mode let a malformed secret through
            if has_body:
                outbound.body = await self._request_body(exchange)
            await self._forward(exchange, outbound, kind, admission.headers)
            return
        # From admission on, a revocation of this secret anywhere ends the
        # exchange: with a 401 while the upstream has not answered yet, by
        # cutting the stream off once it has.
        self._revoker.track(secret_hash, exchange.close_revoked)
        token: str | None = None
        try:
            if has_body:
                outbound.body = await self._request_body(exchange, upload_limit)
            if (
                self._model is not None
                and envelope is not None
                and envelope.cls is RequestClass.TURN
                and admission.identity is not None
            ):
                identity = admission.identity
                # A turn is refused while a budget of its session or user is spent.
                try:
                    await self._model.metering.turn_room(
                        BudgetKey(identity.workflow_id, identity.user, identity.session_id)
                    )
                except BudgetExceeded as exc:
                    # Refused after admission counted it: undone, so the
                    # refused turn consumes no quota (a second round trip,
                    # for refused turns only).
                    await self._gatekeeper.unadmit(admission)
                    policy = self._policies.get(identity.workflow_id)
                    if policy is None or policy.limit_answer != "chatkit":
                        raise
                    await self._limit_event(exchange, exc, kind)
                    return
                token = admission.model_token
                if token is None:  # an untagged secret: its own round trip
                    token = await self._model.tokens.issue(
                        secret_hash, admission.identity, request_id=exchange.request_id.decode()
                    )
                outbound.headers.append((MODEL_TOKEN_HEADER.decode(), token))
            await self._forward(exchange, outbound, kind, admission.headers)
        finally:
            self._revoker.untrack(secret_hash, exchange.close_revoked)
            if token is not None and self._model is not None:
                self._model.tokens.end(token)
                if admission.identity is not None:
                    identity = admission.identity
                    self._model.metering.audit_turn(
                        BudgetKey(identity.workflow_id, identity.user, identity.session_id),
                        exchange.request_id.decode(),
                    )

    async def _envelope_body(self, exchange: _Exchange, length: int | None) -> bytes:
        """A ``POST /chatkit`` body (a ChatKit envelope), whole, within its bound.

        The body is held before the secret is known to be valid, so only an
        envelope that opens as an ``input.transcribe`` may grow past the
        ordinary bound to the transcribe one (see ``may_be_transcribe``).
        """
        bound = self._envelope_bound
        if length is not None and length > bound:
            raise PayloadTooLarge(f"A ChatKit request body is at most {bound} bytes.")
        small = self._max_envelope
        head = b""
        decided = bound <= small
        chunks: list[bytes] = []
        size = 0
        receive = exchange.receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.aborted = "disconnect"
                raise ClientDisconnected("client disconnected during the request body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            exchange.tel.bytes_in = size
            if not decided and len(head) < 256:
                head += chunk[: 256 - len(head)]
            if size > small and not decided:
                decided = True  # once: the head says what this body may grow to
                if not may_be_transcribe(head):
                    bound = small
            if size > bound:
                raise PayloadTooLarge(f"A ChatKit request body is at most {bound} bytes.")
            if not message.get("more_body", False):
                if not chunks:
                    return chunk  # the common case: the whole envelope in one message
                chunks.append(chunk)
                return b"".join(chunks)
            chunks.append(chunk)

    async def _limit_event(self, exchange: _Exchange, exc: RateLimited, kind: Kind) -> None:
        """Refuse a turn as a ChatKit server would: 200 and one ``error`` event,
        which the widget shows in the conversation (with a retry). Still a
        rejection: the rate-limit headers, the outcome in logs and metrics."""
        exchange.tel.failed(exc, started=False)
        body = error_event(exc.message)
        headers: Headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", exchange.request_id),
            *exc.headers,
        ]
        await exchange.start(200, headers)
        await exchange.body(body, False)
        self._metrics.count_request(kind.value, 200)

    async def _preflight(self, exchange: _Exchange, cors: CorsPolicy, origin: bytes | None) -> None:
        """Answer a CORS preflight here: it carries no secret, so nothing is forwarded."""
        match = exchange.match
        status, answer = cors.preflight(
            origin, match.route.methods, exchange.head.preflight_headers
        )
        answer.append((b"x-request-id", exchange.request_id))
        await exchange.start(status, answer)
        await exchange.body(b"", False)
        self._metrics.count_request(match.route.kind.value, status)

    def _issued_outbound(self, exchange: _Exchange, admission: Admission) -> Outbound:
        """The request for the session's own ChatKit server, with its identity stated."""
        identity: Identity | None = admission.identity
        upstream = self._workflows.get(identity.workflow_id) if identity is not None else None
        if identity is None or upstream is None:
            raise _not_for_this_route()
        out_headers = self._upstream_headers(
            exchange,
            # The gateway states the identity itself (gateway/identity.py).
            vouched=True,
            # Servers build upload URLs from the host the client used: the gateway's.
            forwarded_host=exchange.head.host,
        )
        scope = exchange.scope
        path = scope["raw_path"].decode("ascii")[len(ISSUED_PREFIX) :]
        outbound = _outbound_to(scope, upstream + path, out_headers, None)
        outbound.headers += self._identity(identity, request_id=exchange.request_id)
        return outbound

    def _outbound(
        self,
        exchange: _Exchange,
        body: AsyncIterator[bytes] | bytes | None,
        *,
        without: frozenset[bytes] = frozenset(),
    ) -> Outbound:
        scope = exchange.scope
        out_headers = self._upstream_headers(exchange, without=without)
        target = self._upstreams[exchange.match.route.upstream] + scope["raw_path"].decode("ascii")
        return _outbound_to(scope, target, out_headers, body)

    def _upstream_headers(
        self,
        exchange: _Exchange,
        *,
        without: frozenset[bytes] = frozenset(),
        vouched: bool = False,
        forwarded_host: bytes | None = None,
    ) -> Headers:
        """The client's headers as the upstream gets them, less ``without``.

        ``vouched``: the upstream takes the gateway's word for who the user is
        (an issued session's ChatKit server, or the model), so the client's
        credentials (a secret or a model token) go, and so does any claim to
        an identity: only the gateway states one.
        """
        if vouched:
            without = without | _CLIENT_CREDENTIALS if without else _CLIENT_CREDENTIALS
        scope = exchange.scope
        client = scope.get("client")
        return upstream_request_headers(
            exchange.headers,
            connection=exchange.head.connection,
            client_ip=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            request_id=exchange.request_id,
            trust_forwarded=self._trust_forwarded,
            forwarded_host=forwarded_host,
            without=without,
            without_prefix=IDENTITY_PREFIX if vouched else None,
        )

    def _request(self, outbound: Outbound, tel: RequestTelemetry) -> Any:
        """aiohttp's request context manager (also awaitable)."""
        return self._session.request(
            outbound.method,
            outbound.url,
            headers=tel.sending(outbound.headers),
            data=outbound.body,
            allow_redirects=False,
            compress=None,
        )

    async def _forward(
        self, exchange: _Exchange, outbound: Outbound, kind: Kind, extra: Headers
    ) -> None:
        """Send the request and stream the answer back as it arrives."""
        if outbound.body is None:
            exchange.watch_disconnect()
        with translate_errors():
            async with self._request(outbound, exchange.tel) as response:
                exchange.tel.answered(kind.value, response)
                if extra or exchange.always:
                    headers = client_response_headers(
                        response.raw_headers,
                        request_id=exchange.request_id,
                        drop=self._client_drop,
                    )
                    headers.extend(extra)
                else:
                    headers = client_response_headers(
                        response.raw_headers, request_id=exchange.request_id
                    )
                await exchange.start(response.status, headers)
                async for chunk in response.content.iter_any():
                    await exchange.body(chunk, True)
                await exchange.body(b"", False)
        self._metrics.count_request(kind.value, response.status)

    # -- model calls ----------------------------------------------------------------

    async def _model_call(
        self, exchange: _Exchange, length: int | None, model: ModelUpstream
    ) -> None:
        """A ChatKit server's call to the model, with the turn's model token.

        Refused (401) before anything is read or forwarded unless the token
        is valid; tracked under the session's secret from then on, so a
        revocation anywhere cuts it like the turn itself.
        """
        grant = await model.tokens.check(exchange.headers)
        if length is not None and length > model.max_body:
            raise PayloadTooLarge(f"A model request body is at most {model.max_body} bytes.")
        self._revoker.track(grant.secret_hash, exchange.close_revoked)
        try:
            body = await self._read_body(exchange.receive, limit=model.max_body)
            exchange.tel.bytes_in = len(body)
            request = prepare(exchange.scope["path"], body)
            call = await model.metering.open(grant, request, body)
            exchange.watch_disconnect()
            # The real key replaces the model token.
            out_headers = self._upstream_headers(exchange, vouched=True)
            outbound = _outbound_to(
                exchange.scope, model.origin + request.route, out_headers, request.body
            )
            outbound.headers = model.request_headers(outbound.headers)
            reading = _Reading()
            try:
                await self._forward_model(exchange, outbound, request.route, request, reading)
            finally:
                # Cut or not: the usage seen, else a 2xx charges its reservation.
                call.finish(reading.usage, answered=200 <= exchange.status < 300)
        finally:
            self._revoker.untrack(grant.secret_hash, exchange.close_revoked)

    async def _forward_model(
        self,
        exchange: _Exchange,
        outbound: Outbound,
        route: str,
        request: ModelRequest,
        reading: _Reading,
    ) -> None:
        """Forward a model call and stream its answer back, reading its usage
        on the way into ``reading`` (none from an error answer or a cut stream)."""
        with translate_errors():
            async with self._request(outbound, exchange.tel) as response:
                exchange.tel.answered(Kind.MODEL.value, response)
                headers = client_response_headers(
                    response.raw_headers, request_id=exchange.request_id
                )
                await exchange.start(response.status, headers)
                ok = 200 <= response.status < 300
                if ok and response.content_type == "text/event-stream":
                    meter = StreamMeter(route, hide_usage=request.hide_usage)
                    async for chunk in response.content.iter_any():
                        passed = meter.feed(chunk)
                        reading.usage = meter.usage
                        if passed:
                            await exchange.body(passed, True)
                    rest = meter.rest()
                    reading.usage = meter.usage
                    await exchange.body(rest, False)
                else:
                    kept: list[bytes] = []
                    async for chunk in response.content.iter_any():
                        if ok:
                            kept.append(chunk)
                        await exchange.body(chunk, True)
                    if ok:
                        reading.usage = body_usage(route, b"".join(kept))
                    await exchange.body(b"", False)
        self._metrics.count_request(Kind.MODEL.value, response.status)

    # -- session create and cancel -------------------------------------------------

    async def _session_call(self, exchange: _Exchange, has_body: bool, length: int | None) -> None:
        if length is not None and length > MAX_CONTROL_BODY:
            raise PayloadTooLarge(f"A session request body is at most {MAX_CONTROL_BODY} bytes.")
        body = await self._read_body(exchange.receive) if has_body else b""
        exchange.tel.bytes_in = len(body)
        exchange.watch_disconnect()
        match = exchange.match
        headers = exchange.headers

        async def forward() -> Answer:
            # Built only when forwarded: an issuer answers without the upstream.
            outbound = self._outbound(exchange, body or None, without=_ENCODING)
            # The gateway must read these answers: ask for them uncompressed
            # (the official SDKs send Accept-Encoding: gzip).
            outbound.headers.append(("accept-encoding", "identity"))
            return await self._read_answer(outbound, exchange, match.route.kind)

        if match.route.kind is Kind.SESSION_CREATE:
            call = self._sessions.create(headers, body, forward)
        else:
            call = self._sessions.cancel(match.params["session_id"], headers, forward)
        answer = await _to_completion(call)
        exchange.tel.app = answer.app
        if header_value(answer.headers, b"x-request-id") is None:
            answer.headers.append((b"x-request-id", exchange.request_id))
        await exchange.start(answer.status, answer.headers)
        if answer.rest is None:
            await exchange.body(answer.body, False)
        else:
            try:
                await exchange.body(answer.body, True)
                with translate_errors():
                    async for chunk in answer.rest:
                        await exchange.body(chunk, True)
                await exchange.body(b"", False)
            finally:
                if answer.release is not None:
                    answer.release()
        self._metrics.count_request(match.route.kind.value, answer.status)

    async def _read_answer(self, outbound: Outbound, exchange: _Exchange, kind: Kind) -> Answer:
        """The upstream's answer to a session call, read whole unless it is too large."""
        with translate_errors():
            response: aiohttp.ClientResponse = await self._request(outbound, exchange.tel)
            exchange.tel.answered(kind.value, response)
            try:
                headers = client_response_headers(
                    response.raw_headers, request_id=exchange.request_id
                )
                declared = response.content_length
                chunks: list[bytes] = []
                size = 0
                if declared is None or declared <= MAX_CONTROL_BODY:
                    async for chunk in response.content.iter_any():
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > MAX_CONTROL_BODY:
                            break
                    else:
                        response.release()
                        return Answer(response.status, headers, b"".join(chunks))
            except BaseException:
                response.close()
                raise
        return Answer(
            response.status,
            headers,
            b"".join(chunks),
            rest=response.content.iter_any(),
            release=response.close,
        )

    async def _read_body(self, receive: Receive, *, limit: int = MAX_CONTROL_BODY) -> bytes:
        """A session call's (or a model call's) whole request body, at most ``limit`` bytes."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("client disconnected during the request body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                what = "session" if limit == MAX_CONTROL_BODY else "model"
                raise PayloadTooLarge(f"A {what} request body is at most {limit} bytes.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _request_body(
        self, exchange: _Exchange, file_limit: int = 0
    ) -> AsyncIterator[bytes] | bytes:
        """The request body: whole when it came in one piece, as ChatKit's small
        JSON bodies do, else streamed as it arrives.

        Whole, aiohttp sends it with the request head from a bytes payload;
        streamed, it pulls it through an async iterator, which measured ~10%
        of the gateway's CPU per small POST.
        """
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.aborted = "disconnect"
            raise ClientDisconnected("client disconnected during the upload")
        if message.get("more_body", False):
            return self._body(exchange, message, file_limit)
        chunk: bytes = message.get("body", b"")
        exchange.tel.bytes_in = len(chunk)
        if len(chunk) > self._max_body:
            raise PayloadTooLarge(f"The request body exceeds {self._max_body} bytes.")
        if file_limit and len(chunk) > file_limit:
            raise _file_too_large(file_limit)
        exchange.watch_disconnect()
        return chunk

    async def _body(
        self, exchange: _Exchange, message: Message, file_limit: int = 0
    ) -> AsyncIterator[bytes]:
        """The request body as it arrives, from its first ``message`` on; raises
        (never ends early) on a disconnect, and past ``file_limit`` bytes (an
        upload's file size; 0: none) before the read that crosses it is sent."""
        loop = asyncio.get_running_loop()
        received = 0
        while True:
            if message["type"] == "http.disconnect":
                exchange.aborted = "disconnect"
                raise ClientDisconnected("client disconnected during the upload")
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            exchange.tel.bytes_in = received
            if received > self._max_body:
                raise PayloadTooLarge(f"The request body exceeds {self._max_body} bytes.")
            if file_limit and received > file_limit:
                raise _file_too_large(file_limit)
            more = message.get("more_body", False)
            if not more:
                exchange.watch_disconnect()
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
            message = await exchange.receive()


def _outbound_to(
    scope: Scope, target: str, headers: Headers, body: AsyncIterator[bytes] | bytes | None
) -> Outbound:
    """The request for ``target`` (the client's query appended), as aiohttp takes it."""
    query = scope.get("query_string", b"")
    if query:
        target += "?" + query.decode("latin-1")
    try:
        # aiohttp writes header strings as UTF-8, so a value goes out as the
        # bytes that came in only if it is UTF-8 (ASCII included). Any other
        # bytes (obs-text, RFC 9110 5.5) would reach the upstream changed:
        # refused instead. Names are tokens, so ASCII (the parser ensures it).
        out_headers = [(n.decode("ascii"), v.decode("utf-8")) for n, v in headers]
    except UnicodeDecodeError:
        raise BadRequest("A request header value is neither ASCII nor UTF-8.") from None
    return Outbound(scope["method"], URL(target, encoded=True), out_headers, body)


_ENCODING = frozenset({b"accept-encoding"})
#: What the client sent that the issued route's upstream must not see: the
#: secret is the gateway's business, the identity is stated by the gateway.
_CLIENT_CREDENTIALS = frozenset({b"authorization"})


def _file_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The upload exceeds this session's file size limit ({limit} bytes with "
        "multipart framing; chatkit_configuration.file_upload.max_file_size).",
        code="file_too_large",
    )


def _not_for_this_route() -> AuthError:
    return AuthError("This client secret is not valid on this route.", code="invalid_client_secret")


async def _to_completion(call: Awaitable[Answer]) -> Answer:
    """Await a session call that the caller's departure must not interrupt.

    Once forwarded, the upstream may act whatever the caller does; the gateway
    has to see the answer and act on it (learn, revoke). Bounded by the
    upstream timeouts.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_release_unread)
        raise


def _release_unread(task: asyncio.Future[Answer]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    release = task.result().release
    if release is not None:
        release()
