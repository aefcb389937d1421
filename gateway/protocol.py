"""The HTTP/1.1 connection: uvicorn's httptools protocol, hardened.

httptools (llhttp) parses; this subclass decides what a connection may cost
before the application sees a request, the way nginx and Envoy do:

- the request head is counted while it arrives, so a target over
  ``max_target_bytes`` is 414 and a header section over ``max_header_bytes`` or
  ``max_headers`` is 431 within one read of crossing the limit. uvicorn would
  buffer the whole head first, and httptools joins a header value that arrives
  in pieces with ``+=``, which is quadratic in the value's size;
- the whole head must arrive within ``client_header_timeout``; a body may not
  pause for ``client_body_timeout`` nor average less than
  ``client_body_min_rate`` after a grace period: 408, and the connection closes
  (Slowloris, and trickled uploads that would hold an upstream connection);
- Host must be present once in HTTP/1.1, well formed, and agree with an
  absolute-form target (RFC 9112 3.2); the only transfer coding is ``chunked``
  (RFC 9112 6.1: others are 501); an Upgrade is ignored and the request served
  as HTTP/1.1 (RFC 9110 7.8), except that one with a body is refused (400):
  llhttp would not read that body, so the request would wait for it forever;
- a chunked body's trailer fields are read and dropped, never added to the
  request's headers (RFC 9110 6.5.1): llhttp reports them like header fields,
  after the body, so they would change what the app sees depending on where
  the packets happened to break; their size counts against
  ``max_header_bytes`` (431);
- a response that starts before its request body was read ends the connection
  (``connection: close``): a refused body (413, 401...) is never read;
- a refusal of a pipelined request waits for the answers owed before it (RFC
  9112 9.3.2: in order), and nothing after it is read, so a request the client
  is told was refused is never handed to the app;
- at ``max_connections`` (per worker) a new connection makes room by closing
  others: those without a complete request head first, then idle keep-alive
  ones, never one in a request (:mod:`gateway.capacity`); the closed ones get
  408 where a byte can still be written. Over ``max_connections_per_client``
  a request is answered 503;
- on shutdown, requests in flight get ``shutdown_grace_seconds``, then their
  connections close: the application sees a client disconnect, so an SSE
  stream ends without an error in the log.

Every answer made here is an OpenAI-style error with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from gateway import head, lifecycle
from gateway.capacity import SHED_COUNTER, ConnectionTable, Shed, budget
from gateway.errors import (
    BadRequest,
    CodingNotImplemented,
    GatewayError,
    HeadersTooLarge,
    Overloaded,
    RequestTimeout,
    TargetTooLong,
    error_response_headers,
)

if TYPE_CHECKING:
    from gateway.settings import Settings

logger = logging.getLogger(__name__)

#: Bytes of a request line besides its target: method, two spaces, version, CRLF.
_REQUEST_LINE = 64
#: uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2); userinfo is not allowed.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")
#: Seconds a refused connection stays open, unread, for its answer to arrive.
_LINGER = 1.0
_LINGER_BYTES = 64 * 1024
#: What a connection closed to make room is told (see gateway.capacity).
_SHED_ANSWERS = {
    Shed.NO_HEAD: RequestTimeout(
        "The request head did not arrive in time: the connection was closed to make room."
    ),
    Shed.IDLE: RequestTimeout("The idle connection was closed to make room."),
    Shed.NO_ROOM: Overloaded("The gateway has too many open connections; retry shortly."),
}
_ACTED_ON = head.ACTED_ON
#: Fields whose repeated lines form one list; of the others, the first counts.
_LISTS = frozenset({head.TRANSFER_ENCODING, head.CONNECTION})
_HOST_BIT = 1 << head.HOST
_AUTHORIZATION_BIT = 1 << head.AUTHORIZATION


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one client connection may cost; see the module docstring."""

    max_target_bytes: int = 8192
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: int = 240
    body_min_rate_grace: float = 5.0
    max_connections: int = 10_000
    max_connections_per_client: int = 0
    shutdown_grace: float = 30.0
    backlog: int = 2048

    @classmethod
    def from_settings(cls, settings: Settings, *, fd_limit: int) -> HttpLimits:
        # The automatic cap leaves room for the upstream side and for what
        # accept() takes before the cap is applied (gateway.capacity.budget).
        room = budget(fd_limit, settings.max_connections)
        return cls(
            max_target_bytes=settings.max_target_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout=settings.client_header_timeout,
            body_timeout=settings.client_body_timeout,
            body_min_rate=settings.client_body_min_rate,
            body_min_rate_grace=settings.client_body_min_rate_grace,
            max_connections=room.max_connections,
            max_connections_per_client=settings.max_connections_per_client,
            shutdown_grace=settings.shutdown_grace_seconds,
            backlog=room.backlog,
        )


class _Refused(Exception):
    """Raised in a parser callback to stop llhttp at once; ``_refusal`` says why."""


class _CycleTransport:
    """The transport as a connection's request cycles see it.

    uvicorn closes the connection as soon as a response ends while the request
    body is still arriving (an app's 413, 401 or 429 before the upload is
    read). Closing a socket with unread input sends a reset, and a reset can
    destroy the answer before the client has read it. So that close lingers
    like the gateway's own refusals do: FIN after the answer, the rest of the
    body discarded, the socket closed when the client closes or a moment later.

    One per connection, handed to each cycle; writes go straight to the real
    transport. Only the newest cycle can still be receiving a body (a
    pipelined request is parsed after the body before it), so that is the one
    looked at. The protocol is held weakly: it holds the cycles that hold this.
    """

    __slots__ = ("_protocol", "_transport", "is_closing", "set_protocol", "write")

    def __init__(self, protocol: GatewayHttpProtocol, transport: asyncio.Transport) -> None:
        self.write = transport.write
        self.is_closing = transport.is_closing
        self.set_protocol = transport.set_protocol
        self._transport = transport
        self._protocol = weakref.ref(protocol)

    def close(self) -> None:
        protocol = self._protocol()
        cycle = protocol.cycle if protocol is not None else None
        if cycle is not None and cycle.more_body and not self._transport.is_closing():
            protocol._linger_after(cycle)  # type: ignore[union-attr]
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`HttpLimits`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if isinstance(config, lifecycle.GatewayConfig):
            self.limits: HttpLimits = config.limits
            self._clients: Counter[str] = config.connections_by_client
            self._table: ConnectionTable[GatewayHttpProtocol] = config.connection_table
            # The app's own settings: the head it gets was held to its limits.
            self._settings_limits = True
        else:  # served by plain uvicorn (``--http gateway.protocol:...``)
            self.limits = HttpLimits()
            self._clients = Counter()
            self._table = ConnectionTable(self.limits.max_connections)
            self._settings_limits = False
        # Our own cap answers in the OpenAI shape; uvicorn's would not.
        self.limit_concurrency = None
        limits = self.limits
        self._head_budget = limits.max_target_bytes + limits.max_header_bytes + _REQUEST_LINE
        self._body_tick = min(1.0, limits.body_timeout / 2, limits.body_min_rate_grace / 2)
        self._client_key: str | None = None
        self._over_capacity = False
        self._idle = False
        self._lingering = False
        self._refused = False
        self._discarded = 0
        self._refusal: GatewayError | None = None
        # A refusal that waits for the answers owed to earlier requests.
        self._deferred: GatewayError | None = None
        self._draining = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The request head being read.
        self._in_head = True
        self._head_bytes = 0
        self._head_deadline: float | None = None
        self._url_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        # The fields the gateway acts on (gateway/head.py), by slot: the first
        # value, or for a list-valued field every line joined; and a bit per
        # slot seen more than once.
        self._found: dict[int, bytes] = {}
        self._repeated = 0
        self._valid_host: bytes | None = None
        self._keep_alive = True
        # The request body being read.
        self._body_bytes = 0
        self._body_clock = False
        # A chunk header was read and no data since: what follows is either
        # that chunk's data or, after the last chunk, the trailer section.
        self._chunk_empty = False
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._body_bytes_at_tick = 0
        self._body_quiet_since = 0.0
        self._body_time = 0.0
        self._tick_at = 0.0

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._cycle_transport = _CycleTransport(self, transport)
        limits = self.limits
        now = self.loop.time()
        make_room = self._table.opened(self, now)
        if limits.max_connections_per_client and self.client is not None:
            key = self._client_key = self.client[0]
            self._clients[key] += 1
            # Counted now, refused once the head is in: the answer is a 503
            # the client can read, not a reset.
            if self._clients[key] > limits.max_connections_per_client:
                self._over_capacity = True
        self._head_deadline = now + limits.header_timeout
        self._arm(self._head_deadline)
        if make_room is not None:
            victim, reason = make_room
            victim.shed(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._table.closed(self)
        if self._lingering:
            self._lingering = False
            self._table.lingering -= 1
        self._release_client()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def shed(self, reason: Shed) -> None:
        """Close now, to make room for a new connection (see gateway.capacity).

        Not a lingering close: the descriptor is what the new connection
        needs. The answer goes first where a byte can still be written; the
        client has sent nothing unread (or nothing at all), so the close
        is a FIN after it, not a reset. A newcomer refused for want of room
        (:attr:`Shed.NO_ROOM`) is the exception, see gateway.capacity.
        """
        transport = self.transport
        if transport.is_closing():
            return
        count = self.app_state.get(SHED_COUNTER)
        if count is not None:
            count(reason.value)
        table = self._table
        if reason is Shed.NO_ROOM and table.lingering < table.max_lingering:
            # The newcomer itself, whose request may be in already: closing
            # on unread input would reset the answer away, so it lingers.
            table.lingering += 1
            self._lingering = True
            self._refuse(_SHED_ANSWERS[reason])
            return
        if not self._refused and not transport.get_write_buffer_size():
            self._write_error(_SHED_ANSWERS[reason])
        self._refused = True
        self._release_client()
        if transport.get_write_buffer_size():
            transport.abort()  # the client reads nothing: close() would wait on it
        else:
            transport.close()

    def _release_client(self) -> None:
        key = self._client_key
        if key is not None:
            self._client_key = None
            self._clients[key] -= 1
            if self._clients[key] <= 0:
                del self._clients[key]

    def data_received(self, data: bytes) -> None:
        if self._idle:
            self._idle = False
            self._table.head_started(self, self.loop.time())
        if self._refused:
            # Answered and closing: discard a little (to see the client's
            # FIN and close early), then stop reading altogether.
            self._discarded += len(data)
            if self._discarded > _LINGER_BYTES:
                self.flow.pause_reading()
            return
        self._unset_keepalive_if_required()
        view: bytes | memoryview = data
        while view:
            piece = view
            # While a head is arriving, feed at most what is left of its budget,
            # so an endless header value is never read past the limit.
            if self._in_head:
                budget = self._head_budget - self._head_bytes
                if budget <= 0:
                    self._refuse(self._head_too_large())
                    return
                if len(view) > budget:
                    piece = memoryview(view)[:budget]
                self._head_bytes += len(piece)
            trailing = not self._in_head and self._chunk_empty
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                # llhttp stops after a request that asked to upgrade; we did not
                # agree to (no 101), so what follows is HTTP/1.1 again.
                offset = upgrade.args[0] if upgrade.args else len(piece)
                view = memoryview(view)[offset:]
                continue
            except httptools.HttpParserError:
                error = self._refusal
                if error is None:
                    self.logger.warning("Invalid HTTP request received.")
                    error = BadRequest("Invalid HTTP request received.")
                if self._in_head:
                    self._refuse(error)
                else:  # the framing of the body being read is broken
                    self._end_body(error)
                return
            if trailing and self._chunk_empty and not self._in_head:
                # A whole read of nothing but trailer: counted, so that one
                # endless trailer field is refused instead of joined on and on.
                self._trailer_bytes += len(piece)
                if self._trailer_bytes > self.limits.max_header_bytes:
                    self._end_body(HeadersTooLarge(self._trailers_message()))
                    return
            if piece is view:
                break
            view = memoryview(view)[len(piece) :]
        if self._in_head:
            if self._head_bytes:
                if (
                    self._head_bytes - self._url_bytes
                    > self.limits.max_header_bytes + _REQUEST_LINE
                ):
                    self._refuse(HeadersTooLarge(self._headers_message()))
                    return
                if self._head_deadline is None:
                    self._head_deadline = self.loop.time() + self.limits.header_timeout
                    self._arm(self._head_deadline)
        elif not self._body_clock and self._reading_body():
            self._start_body_clock()

    def shutdown(self) -> None:
        if not lifecycle.draining.is_set():
            lifecycle.draining.set()
            logger.info(
                "Draining: requests in flight get %.0f s (GATEWAY_SHUTDOWN_GRACE_SECONDS)",
                self.limits.shutdown_grace,
            )
        self._draining = True
        super().shutdown()
        if not self.transport.is_closing():
            self.loop.call_later(self.limits.shutdown_grace, self._end_at_grace)

    def _end_at_grace(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self._answer_for(cycle, Overloaded("The gateway is shutting down; retry the request."))
        else:
            # A response is on its way (an SSE stream): cut it off. The app
            # sees a client disconnect, which it handles without an error.
            self.transport.abort()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._found = {}
        self._repeated = 0
        self._chunk_empty = False
        self._trailer_bytes = 0
        self._trailer_fields = 0

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_target_bytes:
            self._stop(
                TargetTooLong(f"The request target exceeds {self.limits.max_target_bytes} bytes.")
            )
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer field: llhttp reports it after the body. It must never
            # become a header (RFC 9110 6.5.1): the app may already have read
            # the header list, or may read it only later, so a trailer's
            # Authorization would count or not by where the packets broke.
            # Nothing here needs one, so it is dropped, not merged.
            self._trailer_fields += 1
            self._trailer_bytes += len(name) + len(value) + 4
            limits = self.limits
            if (
                self._trailer_fields > limits.max_headers
                or self._trailer_bytes > limits.max_header_bytes
            ):
                self._stop(HeadersTooLarge(self._trailers_message()))
            return
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        limits = self.limits
        if self._header_count > limits.max_headers or self._header_bytes > limits.max_header_bytes:
            self._stop(HeadersTooLarge(self._headers_message()))
        name = name.lower()
        # Inline, not a method per field: this runs for every header of every
        # request, and one dict probe settles most of them.
        slot = _ACTED_ON.get(name)
        if slot is not None:
            found = self._found
            prior = found.get(slot)
            if prior is None:
                found[slot] = value
            elif slot in _LISTS:
                # Lines of a list-valued field are one list (RFC 9110 5.3).
                found[slot] = prior + b"," + value
            else:
                self._repeated |= 1 << slot
            if slot == head.EXPECT and value.lower() == b"100-continue":
                self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._over_capacity:
            self._stop(Overloaded("The gateway has too many open connections; retry shortly."))
        self._check_framing()
        # uvicorn's part may refuse too: older httptools (0.6) reject a target
        # with obs-text bytes in its parse_url. Until it has made the cycle,
        # a refusal is of a head, which no cycle was made for; taken for the
        # body's, it would be answered to no cycle, and the client would hang.
        super().on_headers_complete()
        self._in_head = False
        self._head_deadline = None
        self._head_bytes = 0
        self._table.in_request(self)
        # uvicorn made the cycle with the raw transport; see _CycleTransport.
        self.cycle.transport = self._cycle_transport  # type: ignore[assignment]
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[head.EXTENSION] = self._request_head()
        if not self.url.startswith(b"/"):
            # uvicorn reduces ``GET http://host/path`` to its path; the app
            # refuses absolute-form targets (RFC 9112 3.2.1: those are for
            # proxies, which the gateway is not), so it must be told.
            extensions["gateway.absolute_form"] = True
        # Until the body is complete, an answer closes the connection: reading
        # on to reach the next request would read a body nobody wants.
        self._keep_alive = self.cycle.keep_alive
        self.cycle.keep_alive = False
        self._body_bytes = 0
        self._body_clock = False

    def _request_head(self) -> head.RequestHead:
        """What this head established, for the app (see gateway/head.py)."""
        found = self._found
        get = found.get
        length = get(head.CONTENT_LENGTH)
        authorization = get(head.AUTHORIZATION)
        # Positional (in RequestHead's field order): keywords cost three times
        # as much, once per request; a test compares it field by field.
        return head.RequestHead(
            self.scope["method"],
            self.url,
            get(head.HOST),
            # llhttp admits one Content-Length of digits, and not beside a
            # Transfer-Encoding; _check_framing admits only chunked.
            None if length is None else int(length),
            head.TRANSFER_ENCODING in found,
            authorization,
            0 if authorization is None else 2 if self._repeated & _AUTHORIZATION_BIT else 1,
            get(head.ORIGIN),
            get(head.PREFLIGHT_METHOD),
            get(head.PREFLIGHT_HEADERS),
            get(head.CONNECTION),
            get(head.UPGRADE),
            get(head.REQUEST_ID),
            get(head.TRACEPARENT),
            get(head.TRACESTATE),
            self._header_count,
            self._header_bytes,
            None,
            self._settings_limits,
        )

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._chunk_empty = False
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._chunk_empty = True

    def on_chunk_complete(self) -> None:
        self._chunk_empty = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if not cycle.response_started and not self._draining:
            cycle.keep_alive = self._keep_alive
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        error = self._deferred
        if error is not None and cycle.response_complete and not self.transport.is_closing():
            # Every answer owed before the refused request has gone out.
            self._deferred = None
            self._unset_keepalive_if_required()
            self._write_error(error)
            self._close_after_answer()
            return
        if self._refused or self.transport.is_closing() or not cycle.response_complete:
            return  # closing, or a pipelined request is in progress
        # Kept alive: idle until the next head begins (see gateway.capacity).
        if self._in_head and self._head_bytes:
            # The next request's head has begun to arrive (pipelined).
            self._table.head_started(self, self.loop.time())
        else:
            self._idle = True
            self._table.idle(self, self.loop.time())

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request the parser refused; ours is in order
        # and in the OpenAI shape.
        self._refuse(BadRequest(msg))

    # -- checks ------------------------------------------------------------------------

    def _check_framing(self) -> None:
        """Host and Transfer-Encoding, which the app must be able to trust."""
        found = self._found
        host = found.get(head.HOST)
        if self._repeated & _HOST_BIT:
            self._stop(BadRequest("More than one Host header."))
        elif host is not None:
            # Checked once per connection while it keeps sending the same Host.
            if host != self._valid_host:
                if not _HOST.fullmatch(host):
                    self._stop(BadRequest("Malformed Host header."))
                self._valid_host = host
            if not self.url.startswith(b"/") and self.url != b"*":
                target = httptools.parse_url(self.url)
                authority = target.host + (b":%d" % target.port if target.port else b"")
                if authority.lower() != host.lower():
                    self._stop(BadRequest("The Host header differs from the request target."))
        elif self.parser.get_http_version() == "1.1":
            self._stop(BadRequest("Missing Host header."))
        codings = found.get(head.TRANSFER_ENCODING)
        if codings is not None:
            if self.parser.get_http_version() != "1.1":
                # RFC 9112 6.1: framing an HTTP/1.0 message this way is faulty.
                self._stop(BadRequest("Transfer-Encoding is not allowed in HTTP/1.0."))
            listed = [c.strip().lower() for c in codings.split(b",") if c.strip()]
            if listed != [b"chunked"]:
                self._stop(CodingNotImplemented("The only transfer coding accepted is chunked."))
        if (
            head.UPGRADE in found
            and self.parser.should_upgrade()
            and (codings is not None or found.get(head.CONTENT_LENGTH) not in (None, b"0"))
        ):
            # llhttp takes whatever follows an upgrade request's head for the
            # new protocol, so its body would never be read as one and the
            # request would wait for it forever (curl --http2 on http:// does this).
            self._stop(BadRequest("A request asking for Upgrade cannot carry a body here."))

    def _head_too_large(self) -> GatewayError:
        if self._url_bytes > self.limits.max_target_bytes:
            return TargetTooLong(
                f"The request target exceeds {self.limits.max_target_bytes} bytes."
            )
        return HeadersTooLarge(self._headers_message())

    def _trailers_message(self) -> str:
        limits = self.limits
        return (
            f"Request trailer fields exceed {limits.max_header_bytes} bytes "
            f"or {limits.max_headers} fields."
        )

    def _headers_message(self) -> str:
        limits = self.limits
        return (
            f"Request headers exceed {limits.max_header_bytes} bytes "
            f"or {limits.max_headers} fields."
        )

    # -- timers --------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _reading_body(self) -> bool:
        cycle = self.cycle
        return (
            cycle is not None
            and cycle.more_body
            and not cycle.response_complete
            and not cycle.disconnected
        )

    def _start_body_clock(self) -> None:
        now = self.loop.time()
        self._body_clock = True
        self._tick_at = self._body_quiet_since = now
        self._body_bytes_at_tick = self._body_bytes
        self._body_time = 0.0
        self._arm(now + self._body_tick)

    def _on_timer(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._in_head:
            deadline = self._head_deadline
            if deadline is None:
                return
            if now >= deadline:
                self._refuse(RequestTimeout("The request head did not arrive in time."))
            else:
                self._arm(deadline)
            return
        if self._body_clock and self._reading_body():
            self._check_body(now)

    def _check_body(self, now: float) -> None:
        limits = self.limits
        elapsed = now - self._tick_at
        self._tick_at = now
        if self.flow.read_paused:
            # We stopped reading (the upstream takes the body more slowly than
            # the client sends it): that time is not the client's.
            self._body_quiet_since = now
        else:
            self._body_time += elapsed
            if self._body_bytes != self._body_bytes_at_tick:
                self._body_bytes_at_tick = self._body_bytes
                self._body_quiet_since = now
            elif now - self._body_quiet_since >= limits.body_timeout:
                self._end_body(
                    RequestTimeout(f"No request body received for {limits.body_timeout:g} s.")
                )
                return
            if (
                limits.body_min_rate
                and self._body_time >= limits.body_min_rate_grace
                and self._body_bytes < limits.body_min_rate * self._body_time
            ):
                self._end_body(
                    RequestTimeout(
                        f"The request body arrived slower than {limits.body_min_rate} bytes/s."
                    )
                )
                return
        self._arm(now + self._body_tick)

    # -- answers ------------------------------------------------------------------------

    def _stop(self, error: GatewayError) -> None:
        self._refusal = error
        raise _Refused(error.message)

    def _refuse(self, error: GatewayError) -> None:
        """Refuse the request head being read: read nothing more, answer, close.

        Answers go out in the order of the requests (RFC 9112 9.3.2): while an
        earlier request's answer is owed (in progress, or pipelined behind
        another), the refusal waits for it (``on_response_complete``). Written
        now, it would be taken for that earlier answer, which would then
        find the connection half closed.
        """
        self._refused = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._write_error(error)
            self._close_after_answer()
        else:
            self._deferred = error

    def _end_body(self, error: GatewayError) -> None:
        cycle = self.cycle
        if cycle is not None:
            self._answer_for(cycle, error)

    def _answer_for(self, cycle: Any, error: GatewayError) -> None:
        """End the current request: the error if nothing was sent yet, then close.

        The app's receive() then reports a disconnect and its later sends are
        dropped, so it stops (and closes its upstream request) on its own.
        """
        self._stop_reading(cycle)
        if not cycle.response_started:
            cycle.response_started = True
            self._write_error(error)
            self._close_after_answer()
        else:
            self.transport.close()

    def _linger_after(self, cycle: Any) -> None:
        """The app answered before the request body was in: close, lingering."""
        self._stop_reading(cycle)
        self._close_after_answer()

    def _stop_reading(self, cycle: Any) -> None:
        """Nothing more is read for ``cycle``; its app sees a disconnect."""
        self._refused = True
        cycle.disconnected = True
        cycle.message_event.set()

    def _close_after_answer(self) -> None:
        """Close so that the client can read the answer: closing a socket with
        unread input sends a reset, which may destroy the answer in flight.
        So send FIN after the answer, read (and drop) a little more, and
        close when the client does or a moment later."""
        self._release_client()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER, self.transport.close)

    def _write_error(self, error: GatewayError) -> None:
        body = error.body()
        head = b"".join(n + b": " + v + b"\r\n" for n, v in error_response_headers(error, body))
        self.transport.write(STATUS_LINE[error.status] + head + b"connection: close\r\n\r\n" + body)
