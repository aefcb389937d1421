"""A fake of the OpenAI ChatKit API, served over real HTTP.

It is the only stand-in our tests allow: the gateway reaches it over a real
socket, so streaming, disconnects and resets behave as they do in production.
Wire facts follow OpenAI's published ChatKit spec and what its official SDKs send.

    async with FakeUpstream() as up:
        up.inject("status", path_prefix="/v1/chatkit/sessions", status=503)
        ...  # drive the gateway at up.url
        await up.wait_for(lambda: up.count("/v1/chatkit/sessions") == 3)

Request bodies are always consumed as a stream and hashed incrementally before
any fault or endpoint logic runs, so every ``Seen`` record knows whether the
full body arrived, and a 256 MB upload costs only a bounded buffer.

Run standalone (for benchmarks): ``python -m tests.fake_upstream --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self, TypeVar, cast, get_args

from aiohttp import web
from multidict import MultiMapping

FaultName = Literal["status", "delay", "stall", "reset", "stall_mid_stream", "reset_mid_stream"]
FAULTS: Final[frozenset[str]] = frozenset(get_args(FaultName))
_MID_STREAM: Final = frozenset({"stall_mid_stream", "reset_mid_stream"})

# Bodies up to this size are kept for JSON parsing; larger ones are only hashed.
_KEEP_BODY_LIMIT: Final = 1 << 20
# Bodies declared at most this long are read in one call (bounded by the declaration).
_SMALL_BODY: Final = 1 << 16
_EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
_JSON: Final = {"Content-Type": "application/json"}
_HOP_HEADERS: Final = (
    ("Connection", "X-Hop-Secret, keep-alive"),
    ("X-Hop-Secret", "1"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("X-End-To-End", "yes"),
)


@dataclass
class Seen:
    """One request that reached the fake; fields fill in as the exchange progresses."""

    method: str
    path: str  # raw (still percent-encoded) path, without the query
    query: str  # raw query string, exactly as received
    headers: list[tuple[str, str]]  # in the order received, duplicates kept
    authorization: str | None
    body_bytes: int = 0
    body_sha256: str = _EMPTY_SHA256
    completed: bool = False  # the whole request body arrived
    disconnected: bool = False  # the client went away before we finished answering
    aborted: bool = False  # the fake reset the connection on purpose (a fault)
    status: int | None = None  # status line we sent, if any
    fault: str | None = None

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


@dataclass
class Fault:
    """An injected fault; ``remaining`` None means it never runs out."""

    name: FaultName
    path_prefix: str | None
    method: str | None
    remaining: int | None
    params: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_prefix is None or path.startswith(self.path_prefix)
        )


# -- ChatKit resources: errors, sessions, threads ------------------------------

JSONObject = dict[str, Any]
_T = TypeVar("_T")


class ApiError(Exception):
    """An OpenAI-style error answer, raised anywhere below the request pipeline."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> JSONObject:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONObject:
    """``{"error": {message, type, param, code}}`` as the OpenAI API shapes it."""
    kind = "invalid_request_error"
    if status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_KIND_NAMES: Final = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}


def _field(obj: JSONObject, key: str, where: str, kind: type, *, required: bool = False) -> Any:
    param = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        if required:
            raise ApiError(
                400,
                f"Missing required parameter: '{param}'.",
                param=param,
                code="missing_required_parameter",
            )
        return None
    # bool is an int subclass in Python, but not in JSON Schema.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ApiError(
            400,
            f"Invalid type for '{param}': expected {_KIND_NAMES[kind]}, "
            f"but got {type(value).__name__} instead.",
            param=param,
            code="invalid_type",
        )
    return value


def _bounded(value: int | None, param: str, low: int, high: int | None = None) -> int | None:
    if value is not None and value < low:
        raise ApiError(
            400,
            f"Invalid '{param}': integer below minimum value. Expected a value greater "
            f"than or equal to {low}, but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    if value is not None and high is not None and value > high:
        raise ApiError(
            400,
            f"Invalid '{param}': integer above maximum value. Expected a value less "
            f"than or equal to {high}, but got {value} instead.",
            param=param,
            code="integer_above_max_value",
        )
    return value


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def build_session(body: object, *, now: float) -> JSONObject:
    """Validate a ``CreateChatSessionBody`` and resolve it into a ``ChatSession``."""
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid body: expected a JSON object.", code="invalid_type")
    user = _field(body, "user", "", str, required=True)
    if not user:
        raise ApiError(
            400,
            "Invalid 'user': string too short. Expected a string with minimum length 1, "
            "but got an empty string instead.",
            param="user",
            code="string_below_min_length",
        )
    workflow = _field(body, "workflow", "", dict, required=True)
    state = _field(workflow, "state_variables", "workflow", dict)
    if state is not None and len(state) > 64:
        raise ApiError(
            400,
            f"Invalid 'workflow.state_variables': at most 64 keys, got {len(state)}.",
            param="workflow.state_variables",
        )
    for key, value in (state or {}).items():
        if not isinstance(value, str | bool | int | float):
            raise ApiError(
                400,
                f"Invalid type for 'workflow.state_variables.{key}': expected a string, "
                "boolean or number.",
                param=f"workflow.state_variables.{key}",
                code="invalid_type",
            )
    tracing = _field(workflow, "tracing", "workflow", dict) or {}
    seconds = 600
    expires = _field(body, "expires_after", "", dict)
    if expires is not None:
        anchor = _field(expires, "anchor", "expires_after", str, required=True)
        if anchor != "created_at":
            raise ApiError(
                400,
                f"Invalid value: '{anchor}'. Supported values are: 'created_at'.",
                param="expires_after.anchor",
                code="invalid_value",
            )
        raw_seconds = _field(expires, "seconds", "expires_after", int, required=True)
        seconds = _or(_bounded(raw_seconds, "expires_after.seconds", 1, 600), 600)
    rate_limits = _field(body, "rate_limits", "", dict) or {}
    per_minute = _or(
        _bounded(
            _field(rate_limits, "max_requests_per_1_minute", "rate_limits", int),
            "rate_limits.max_requests_per_1_minute",
            1,
        ),
        10,
    )
    return {
        "id": f"cksess_{secrets.token_hex(16)}",
        "object": "chatkit.session",
        "expires_at": int(now) + seconds,
        "client_secret": f"ek_{secrets.token_urlsafe(32)}",
        "user": user,
        "workflow": {
            "id": _field(workflow, "id", "workflow", str, required=True),
            "version": _field(workflow, "version", "workflow", str),
            "state_variables": state,
            "tracing": {"enabled": _or(_field(tracing, "enabled", "workflow.tracing", bool), True)},
        },
        "rate_limits": {"max_requests_per_1_minute": per_minute},
        "max_requests_per_1_minute": per_minute,
        "status": "active",
        "chatkit_configuration": _configuration(
            _field(body, "chatkit_configuration", "", dict) or {}
        ),
    }


def _configuration(raw: JSONObject) -> JSONObject:
    where = "chatkit_configuration"
    titling = _field(raw, "automatic_thread_titling", where, dict) or {}
    upload = _field(raw, "file_upload", where, dict) or {}
    history = _field(raw, "history", where, dict) or {}
    up, hist = f"{where}.file_upload", f"{where}.history"
    return {
        "automatic_thread_titling": {
            "enabled": _or(
                _field(titling, "enabled", f"{where}.automatic_thread_titling", bool), True
            )
        },
        "file_upload": {
            "enabled": _or(_field(upload, "enabled", up, bool), False),
            "max_file_size": _or(
                _bounded(_field(upload, "max_file_size", up, int), f"{up}.max_file_size", 1, 512),
                512,
            ),
            "max_files": _or(
                _bounded(_field(upload, "max_files", up, int), f"{up}.max_files", 1), 10
            ),
        },
        "history": {
            "enabled": _or(_field(history, "enabled", hist, bool), True),
            # null means "all history is retained" (API reference).
            "recent_threads": _bounded(
                _field(history, "recent_threads", hist, int), f"{hist}.recent_threads", 1
            ),
        },
    }


def stale_cancel_shape(session: JSONObject, *, now: int) -> JSONObject:
    """The cancel response as the API reference's (stale) example shows it: no secret."""
    return {
        "id": session["id"],
        "object": "chatkit.session",
        "workflow": {"id": session["workflow"]["id"], "version": session["workflow"]["version"]},
        "scope": {"customer_id": session["user"]},
        "max_requests_per_1_minute": session["max_requests_per_1_minute"],
        "ttl_seconds": max(0, session["expires_at"] - now),
        "status": "cancelled",
        "cancelled_at": now,
    }


class Catalogue:
    """Seeded threads and their items, behind the list/retrieve/delete endpoints."""

    def __init__(self) -> None:
        self.threads: dict[str, JSONObject] = {}
        self.items: dict[str, list[JSONObject]] = {}
        # Fixed ids and times so tests can name them: cthr_seed0..2, oldest first.
        for index, user in enumerate(("user_alice", "user_alice", "user_bob")):
            thread_id, created = f"cthr_seed{index}", 1_700_000_000 + 60 * index
            self.threads[thread_id] = {
                "id": thread_id,
                "object": "chatkit.thread",
                "created_at": created,
                "title": f"Seeded thread {index}",
                "status": {"type": "active"},
                "user": user,
            }
            self.items[thread_id] = [
                {
                    "id": f"cthi_seed{index}_{turn}",
                    "object": "chatkit.thread_item",
                    "thread_id": thread_id,
                    "created_at": created + turn,
                    "type": kind,
                    "content": [{"type": part, "text": f"{kind} {index}"}],
                }
                for turn, (kind, part) in enumerate(
                    [
                        ("chatkit.user_message", "input_text"),
                        ("chatkit.assistant_message", "output_text"),
                    ]
                )
            ]

    def thread(self, thread_id: str) -> JSONObject:
        thread = self.threads.get(thread_id)
        if thread is None:
            raise ApiError(404, f"Chatkit Thread with id '{thread_id}' not found.")
        return thread

    def delete(self, thread_id: str) -> JSONObject:
        self.thread(thread_id)
        del self.threads[thread_id], self.items[thread_id]
        return {"id": thread_id, "object": "chatkit.thread.deleted", "deleted": True}

    def list_threads(self, query: MultiMapping[str]) -> JSONObject:
        user = query.get("user")
        threads = [t for t in self.threads.values() if user is None or t["user"] == user]
        return _page(threads, query)

    def list_items(self, thread_id: str, query: MultiMapping[str]) -> JSONObject:
        self.thread(thread_id)
        return _page(self.items[thread_id], query)


def _page(records: list[JSONObject], query: MultiMapping[str]) -> JSONObject:
    """One cursor page: ``after``/``before`` name ids in the requested order."""
    limit = _or(_bounded(_query_number(query, "limit", 20, int), "limit", 0, 100), 20)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(
            400,
            f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.",
            param="order",
            code="invalid_value",
        )
    ordered = sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=order == "desc")
    for name in ("after", "before"):
        cursor = query.get(name)
        if cursor is None:
            continue
        ids = [record["id"] for record in ordered]
        if cursor not in ids:
            raise ApiError(400, f"Invalid '{name}': no object with id '{cursor}'.", param=name)
        at = ids.index(cursor)
        ordered = ordered[at + 1 :] if name == "after" else ordered[:at]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


# -- the server ----------------------------------------------------------------


BENCH_BODY = json.dumps(
    {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
).encode()


class FakeUpstream:
    """The OpenAI ChatKit API as a real aiohttp server, with faults and recording."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        clock: Callable[[], float] = time.time,
        record: bool = True,
        cancel_shape: Literal["full", "stale"] = "full",
        compress: Literal["never", "accepted", "always"] = "never",
    ) -> None:
        # None accepts any ``sk-`` key; a value demands exactly that key.
        self.api_key = api_key
        # JSON answers gzipped like the real API ("accepted": when the request
        # allows gzip) or regardless of Accept-Encoding ("always").
        self.compress: Literal["never", "accepted", "always"] = compress
        self.cancel_shape: Literal["full", "stale"] = cancel_shape
        self.record = record
        self.requests: list[Seen] = []
        self.sessions: dict[str, JSONObject] = {}
        self.catalogue = Catalogue()
        self._clock = clock
        self._faults: list[Fault] = []
        self._active = 0
        self._waiters: set[asyncio.Event] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._runner: web.ServerRunner | None = None
        self._url: str | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._stopping = False
        server = web.Server(
            self._handle,
            # Cancel the handler when its client disconnects: that is how stalls end
            # and how ``Seen.disconnected`` is observed.
            handler_cancellation=True,
            access_log=None,
            # Hash bodies exactly as sent, even if the gateway forwards gzip.
            auto_decompress=False,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self._url = f"http://{bound_host}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is None:
            return
        # Stalled handlers would otherwise hold shutdown for the full timeout.
        self._stopping = True
        for task in list(self._handlers):
            task.cancel()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Base URL without the ``/v1`` suffix, e.g. ``http://127.0.0.1:54321``."""
        if self._url is None:
            raise RuntimeError("FakeUpstream is not started: call await start() first")
        return self._url

    # -- faults and records ----------------------------------------------------

    def inject(
        self,
        fault: FaultName,
        *,
        path_prefix: str | None = None,
        method: str | None = None,
        times: int | None = 1,
        **params: Any,
    ) -> Fault:
        """Make the next ``times`` matching requests misbehave (None: forever).

        ``status`` takes ``status`` (and optional ``headers``, ``message``, and
        ``chunked=True`` to send the answer without a Content-Length);
        ``delay`` takes ``seconds``; the mid-stream faults take ``after`` events.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose one of {sorted(FAULTS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1, or None for forever")
        if fault == "status" and not isinstance(params.get("status"), int):
            raise ValueError("the 'status' fault needs status=<int>")
        if fault == "delay" and not isinstance(params.get("seconds"), int | float):
            raise ValueError("the 'delay' fault needs seconds=<number>")
        injected = Fault(fault, path_prefix, method and method.upper(), times, params)
        self._faults.append(injected)
        return injected

    def clear_faults(self) -> None:
        self._faults.clear()

    def count(self, path_prefix: str | None = None, method: str | None = None) -> int:
        """Requests seen whose path starts with ``path_prefix`` and method matches."""
        return sum(
            1
            for seen in self.requests
            if (path_prefix is None or seen.path.startswith(path_prefix))
            and (method is None or seen.method == method.upper())
        )

    def reset_records(self) -> None:
        self.requests.clear()
        self._changed()

    @property
    def active(self) -> int:
        """Requests currently being handled (bodies read, answers being written)."""
        return self._active

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a deadline is the point of this helper
    ) -> None:
        """Wait until ``predicate()`` holds, re-checking on every change of the fake.

        Changes are: a request arrives, its body completes, it is answered, or its
        client disconnects. Raises TimeoutError describing what was seen.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    changed = asyncio.Event()
                    self._waiters.add(changed)
                    try:
                        await changed.wait()
                    finally:
                        self._waiters.discard(changed)
        except TimeoutError:
            seen = [f"{s.method} {s.path} status={s.status}" for s in self.requests[-10:]]
            raise TimeoutError(
                f"condition still false after {timeout}s; active={self._active}, "
                f"last requests: {seen}"
            ) from None

    def _changed(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def _take_fault(self, request: web.BaseRequest, seen: Seen) -> Fault | None:
        name = request.headers.get("x-fake-fault")
        if name is not None:
            if name not in FAULTS:
                raise ApiError(400, f"unknown x-fake-fault {name!r}", param="x-fake-fault")
            params: dict[str, Any] = {"status": 500, "seconds": 1.0, "after": 1}
            for key, kind in (("status", int), ("seconds", float), ("after", int)):
                raw = request.headers.get(f"x-fake-fault-{key}")
                try:
                    params[key] = params[key] if raw is None else kind(raw)
                except ValueError:
                    raise ApiError(400, f"bad x-fake-fault-{key}: {raw!r}") from None
            return Fault(cast(FaultName, name), None, None, 0, params, hits=1)
        for fault in self._faults:
            if fault.matches(seen.method, seen.path):
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    # -- the request pipeline ----------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # raw_path is the request target as sent; yarl's views of it are decoded.
        path, _, query = request.raw_path.partition("?")
        if query == "bench=1":
            # For scripts/bench: every route gives the same constant answer, so
            # comparing two gateway routes measures the gateway, not our handlers.
            await request.read()
            return web.Response(body=BENCH_BODY, headers=_JSON)
        seen = Seen(
            method=request.method,
            path=path,
            query=query,
            headers=list(request.headers.items()),
            authorization=request.headers.get("Authorization"),
        )
        if self.record:
            self.requests.append(seen)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._active += 1
        self._changed()
        response: web.StreamResponse | None = None
        try:
            try:
                body = await self._consume(request, seen)
                fault = self._take_fault(request, seen)
                if fault is not None:
                    seen.fault = fault.name
                    response = await self._pre_fault(request, seen, fault)
                response = response or await self._route(request, seen, body, fault)
            except ApiError as exc:
                response = self._json(request, exc.status, exc.body())
            seen.status = response.status
            return response
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # Our own abort or shutdown also cancels us; only a client leaving counts.
            seen.disconnected = not (seen.aborted or self._stopping)
            if isinstance(exc, ConnectionResetError):
                # A write hit the closing socket. End the handler the way aiohttp
                # ends it on disconnect, rather than have it log a 500.
                raise asyncio.CancelledError from exc
            raise
        finally:
            self._active -= 1
            if task is not None:
                self._handlers.discard(task)
            self._changed()

    async def _consume(self, request: web.BaseRequest, seen: Seen) -> bytes | None:
        """Read the whole body, hashing as it arrives; keep it only if it is small."""
        length = request.content_length
        if length is not None and length <= _SMALL_BODY:
            # The benchmark hot path: one read instead of an async iteration.
            body = await request.read()
            seen.body_bytes, seen.body_sha256 = len(body), hashlib.sha256(body).hexdigest()
            seen.completed = True
            self._changed()
            return body
        digest = hashlib.sha256()
        kept: list[bytes] | None = []
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            seen.body_bytes += len(chunk)
            if kept is not None:
                kept.append(chunk)
                if seen.body_bytes > _KEEP_BODY_LIMIT:
                    kept = None
        seen.body_sha256 = digest.hexdigest()
        seen.completed = True
        self._changed()
        return None if kept is None else b"".join(kept)

    async def _pre_fault(
        self, request: web.BaseRequest, seen: Seen, fault: Fault
    ) -> web.StreamResponse | None:
        """Apply a fault that acts before the answer; None lets the request proceed."""
        if fault.name == "status":
            status = int(fault.params["status"])
            message = fault.params.get("message", f"Injected fault: HTTP {status}.")
            if fault.params.get("chunked"):
                return await self._chunked_json(request, status, error_body(status, message))
            return self._json(
                request, status, error_body(status, message), fault.params.get("headers")
            )
        if fault.name == "delay":
            await asyncio.sleep(float(fault.params["seconds"]))
        elif fault.name == "stall":
            await _forever()
        elif fault.name == "reset":
            await _abort(request, seen)
        return None

    async def _route(
        self, request: web.BaseRequest, seen: Seen, body: bytes | None, fault: Fault | None
    ) -> web.StreamResponse:
        path = seen.path  # still percent-encoded; ChatKit ids never need encoding
        if path == "/healthz":
            return self._json(request, 200, {"status": "ok"})
        if not path.startswith("/v1/chatkit/"):
            raise ApiError(404, f"Invalid URL ({request.method} {path})")
        parts = path.removeprefix("/v1/chatkit/").split("/")
        if parts[0] not in ("sessions", "threads"):
            return await self._client_traffic(request, seen, body, fault)
        self._require_api_key(seen.authorization)
        query = request.query
        match request.method, parts:
            case "POST", ["sessions"]:
                session = build_session(_parse_json(body), now=self._clock())
                self.sessions[session["id"]] = session
                return self._json(request, 200, session)
            case "POST", ["sessions", session_id, "cancel"]:
                return self._json(request, 200, self._cancel(session_id))
            case "GET", ["threads"]:
                return self._json(request, 200, self.catalogue.list_threads(query))
            case "GET", ["threads", thread_id]:
                return self._json(request, 200, self.catalogue.thread(thread_id))
            case "DELETE", ["threads", thread_id]:
                return self._json(request, 200, self.catalogue.delete(thread_id))
            case "GET", ["threads", thread_id, "items"]:
                return self._json(request, 200, self.catalogue.list_items(thread_id, query))
        raise ApiError(404, f"Invalid URL ({request.method} {path})")

    def _require_api_key(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if not token.startswith("sk-") or (self.api_key is not None and token != self.api_key):
            raise ApiError(
                401, f"Incorrect API key provided: {token[:8]}****.", code="invalid_api_key"
            )

    def _cancel(self, session_id: str) -> JSONObject:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f"Chatkit Session with id '{session_id}' not found.")
        session["status"] = "cancelled"
        self._changed()
        if self.cancel_shape == "stale":
            return stale_cancel_shape(session, now=int(self._clock()))
        return dict(session)

    async def _client_traffic(
        self, request: web.BaseRequest, seen: Seen, body: bytes | None, fault: Fault | None
    ) -> web.StreamResponse:
        wants_stream = "text/event-stream" in request.headers.get("Accept", "")
        if not wants_stream and body and b'"stream"' in body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            wants_stream = isinstance(parsed, dict) and parsed.get("stream") is True
        # A mid-stream fault only makes sense on a stream, so it forces one.
        if wants_stream or (fault is not None and fault.name in _MID_STREAM):
            return await self._stream(request, seen, fault)
        headers: dict[str, str | list[str]] = {}
        for name, value in seen.headers:
            previous = headers.get(name.lower())
            if previous is None:
                headers[name.lower()] = value
            elif isinstance(previous, list):
                previous.append(value)
            else:
                headers[name.lower()] = [previous, value]
        echo = {
            "object": "chatkit.echo",
            "method": seen.method,
            "path": seen.path,
            "query": seen.query,
            "headers": headers,
            "body_bytes": seen.body_bytes,
            "body_sha256": seen.body_sha256,
        }
        return self._json(request, 200, echo)

    async def _stream(
        self, request: web.BaseRequest, seen: Seen, fault: Fault | None
    ) -> web.StreamResponse:
        events = _query_number(request.query, "events", 5, int)
        interval = _query_number(request.query, "interval", 0.05, float)
        stop_after = events
        if fault is not None and fault.name in _MID_STREAM:
            stop_after = min(events, int(fault.params.get("after", 1)))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self._decorate(request, response)
        writer = await response.prepare(request)
        if writer is None:  # pragma: no cover - only for an already-finished response
            raise RuntimeError("stream response was already finished")
        # aiohttp holds headers back to coalesce them with the first body write;
        # a client waiting on headers must see them now.
        writer.send_headers()
        seen.status = 200
        for index in range(stop_after):
            if index:
                await asyncio.sleep(interval)
            payload = {"type": "fake.event", "index": index, "count": events}
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            await writer.drain()
        if fault is not None and fault.name == "stall_mid_stream":
            await _forever()
        elif fault is not None and fault.name == "reset_mid_stream":
            await _abort(request, seen)
        await response.write_eof()
        return response

    def _json(
        self,
        request: web.BaseRequest,
        status: int,
        payload: object,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body = json.dumps(payload).encode()
        accepted = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        if self.compress == "always" or (self.compress == "accepted" and accepted):
            response = web.Response(status=status, body=gzip.compress(body), headers=_JSON)
            response.headers["Content-Encoding"] = "gzip"
        else:
            response = web.Response(status=status, body=body, headers=_JSON)
        if headers:
            response.headers.update(headers)
        self._decorate(request, response)
        return response

    async def _chunked_json(
        self, request: web.BaseRequest, status: int, payload: object
    ) -> web.StreamResponse:
        """A JSON answer in 64 KiB chunks: its size is known only once it has all arrived."""
        body = json.dumps(payload).encode()
        response = web.StreamResponse(status=status, headers=_JSON)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 65536):
            await response.write(body[start : start + 65536])
        await response.write_eof()
        return response

    def _decorate(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Add the response headers that header-handling tests ask for by query."""
        if "?" not in request.raw_path:
            return  # the hot path: no query, nothing to parse
        query = request.query
        for index in range(_query_number(query, "set_cookies", 0, int)):
            response.headers.add("Set-Cookie", f"fake{index}=v{index}; Path=/; HttpOnly")
        if query.get("hop") == "1":
            for name, value in _HOP_HEADERS:
                response.headers[name] = value


async def _forever() -> None:
    """Never return; the handler ends when its client leaves or the fake stops."""
    await asyncio.get_running_loop().create_future()


async def _abort(request: web.BaseRequest, seen: Seen) -> None:
    """Reset the TCP connection without answering, then wait to be cancelled."""
    seen.aborted = True
    transport = request.transport
    if transport is not None:
        transport.abort()
    # connection_lost cancels this handler (handler_cancellation=True).
    await _forever()


def _parse_json(body: bytes | None) -> object:
    if body is None:
        raise ApiError(413, "Request body too large for a JSON endpoint.")
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. The OpenAI API expects "
            "a JSON payload.",
        ) from None


_N = TypeVar("_N", int, float)


def _query_number(query: MultiMapping[str], name: str, default: _N, kind: type[_N]) -> _N:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, f"Invalid '{name}': {raw!r}.", param=name) from None
    if value < 0:
        raise ApiError(400, f"Invalid '{name}': must not be negative.", param=name)
    return value


async def _serve(host: str, port: int, api_key: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Standalone runs last for a whole benchmark: do not grow a record per request.
    upstream = FakeUpstream(api_key=api_key, record=False)
    await upstream.start(host, port)
    try:
        print(f"fake upstream listening on {upstream.url}", flush=True)
        await stop.wait()
    finally:
        await upstream.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI ChatKit API for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any sk-)")
    args = parser.parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args.host, args.port, args.api_key))


if __name__ == "__main__":
    main()
