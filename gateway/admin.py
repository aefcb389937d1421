"""The operators' HTTP API, on its own listener and off unless a token is set.

    POST /admin/revoke                {"session_id": ...} or {"client_secret": ...},
                                      or {"user": ..., "for_seconds": N} (a ban)
    GET  /admin/sessions/{session_id} status, limit, remaining quota, expiry, user, app
    GET  /admin/revocations?tail=N    the audit log, newest last
    GET  /admin/users/{user}          the user's active sessions, and a ban
    DELETE /admin/bans/{user}         end a user's ban early
    GET  /admin/apps/{name}           an issuer app's limits, creates and sessions

Every call needs ``Authorization: Bearer <GATEWAY_ADMIN_TOKEN>``, compared in
constant time. The listener is separate so that it can be kept off the network
the client traffic comes from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.apps import AppKeys, build_apps
from gateway.auth import constant_time_equal
from gateway.errors import StoreUnavailable, error_body
from gateway.model.report import user_usage
from gateway.registry import SESSION_ID
from gateway.store.base import IndexedSession
from gateway.users import MAX_BAN_SECONDS, app_view, ban, user_view

if TYPE_CHECKING:
    from gateway.app import Components

logger = logging.getLogger(__name__)


def _error(
    status: int, message: str, *, code: str, type: str = "invalid_request_error"
) -> Response:
    return Response(
        error_body(message, type=type, code=code), status_code=status, media_type="application/json"
    )


class AdminAPI:
    def __init__(self, components: Components) -> None:
        self._c = components
        token = components.settings.admin_token
        if token is None:
            raise ValueError("the admin API needs GATEWAY_ADMIN_TOKEN")
        self._expected = b"Bearer " + token.get_secret_value().encode()
        self.app = Starlette(
            routes=[
                Route("/admin/revoke", self.revoke, methods=["POST"]),
                Route("/admin/sessions/{session_id}", self.session, methods=["GET"]),
                Route("/admin/revocations", self.revocations, methods=["GET"]),
                # Before the user's own route, whose {user:path} would take it.
                Route("/admin/users/{user:path}/usage", self.usage, methods=["GET"]),
                Route("/admin/users/{user:path}", self.user, methods=["GET"]),
                Route("/admin/bans/{user:path}", self.lift_ban, methods=["DELETE"]),
                Route("/admin/apps/{name}", self.app_info, methods=["GET"]),
            ]
        )
        self._apps = AppKeys(build_apps(components.settings))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not constant_time_equal(given, self._expected):
                response = _error(
                    401, "A valid admin token is required.", code="invalid_admin_token"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def revoke(self, request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            return _error(400, "The body must be JSON.", code="invalid_json")
        if not isinstance(payload, dict):
            return _error(400, "The body must be a JSON object.", code="invalid_json")
        if "user" in payload:
            return await self._ban(payload)
        if "for_seconds" in payload:
            return _error(400, "for_seconds goes with user.", code="invalid_request")
        session_id = payload.get("session_id")
        secret = payload.get("client_secret")
        if (session_id is None) == (secret is None):
            return _error(
                400,
                "Give exactly one of session_id, client_secret or user.",
                code="invalid_request",
            )
        secret_hash = None
        if secret is not None:
            if not isinstance(secret, str) or not secret:
                return _error(
                    400, "client_secret must be a non-empty string.", code="invalid_request"
                )
            secret_hash = self._c.hasher(secret.encode())
        elif not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            return _error(400, "session_id is malformed.", code="invalid_request")
        result = await self._c.revoker.revoke(
            secret_hash=secret_hash, session_id=session_id, reason="admin"
        )
        if result is None:
            return JSONResponse(
                {
                    "revoked": True,
                    "stored": False,
                    "pending": True,
                    "secret_hash_prefix": secret_hash[:12] if secret_hash else None,
                },
                status_code=202,
            )
        return JSONResponse(
            {
                "revoked": True,
                "stored": True,
                "session_id": result.session_id,
                "secret_hash_prefix": result.secret_hash[:12] if result.secret_hash else None,
                "already_revoked": result.already_revoked,
                "session_known": result.registered,
            }
        )

    async def _ban(self, payload: dict[str, Any]) -> Response:
        user = payload["user"]
        for_seconds = payload.get("for_seconds", 0)
        if set(payload) - {"user", "for_seconds"}:
            return _error(400, "A ban takes only user and for_seconds.", code="invalid_request")
        if not isinstance(user, str) or not user:
            return _error(400, "user must be a non-empty string.", code="invalid_request")
        if (
            not isinstance(for_seconds, int)
            or isinstance(for_seconds, bool)
            or not 0 <= for_seconds <= MAX_BAN_SECONDS
        ):
            return _error(
                400,
                f"for_seconds must be an integer from 0 to {MAX_BAN_SECONDS}.",
                code="invalid_request",
            )
        revoker = self._c.revoker

        async def revoke(session: IndexedSession) -> bool:
            result = await revoker.revoke(
                secret_hash=session.secret_hash, session_id=session.session_id, reason="ban"
            )
            return result is not None

        try:
            result = await ban(self._c.store, revoke, user, for_seconds=for_seconds)
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        return JSONResponse(result.as_json())

    async def user(self, request: Request) -> Response:
        try:
            view = await user_view(self._c.store, request.path_params["user"])
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        return JSONResponse(view)

    async def lift_ban(self, request: Request) -> Response:
        user = request.path_params["user"]
        try:
            lifted = await self._c.store.lift_ban(user)
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        return JSONResponse({"user": user, "lifted": lifted})

    async def app_info(self, request: Request) -> Response:
        name = request.path_params["name"]
        app = self._apps.app(name)
        if app is None:
            return _error(404, f"No app named '{name}' is configured.", code="not_found")
        try:
            stats = await self._c.store.app_stats(name)
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        return JSONResponse(app_view(app, stats))

    async def session(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if not SESSION_ID.match(session_id):
            return _error(400, "session_id is malformed.", code="invalid_request")
        try:
            info = await self._c.store.lookup(session_id)
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        if info is None:
            return _error(404, f"No session with id '{session_id}' is known.", code="not_found")
        return JSONResponse(dataclasses.asdict(info))

    async def revocations(self, request: Request) -> Response:
        try:
            tail = int(request.query_params.get("tail", "20"))
        except ValueError:
            return _error(400, "tail must be an integer.", code="invalid_request")
        if not 1 <= tail <= 10_000:
            return _error(400, "tail must be between 1 and 10000.", code="invalid_request")
        try:
            entries = await self._c.store.audit_tail(tail)
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        return JSONResponse({"data": [dataclasses.asdict(e) for e in entries]})

    async def usage(self, request: Request) -> Response:
        """A user's model usage per workflow, window, session and model."""
        user = request.path_params["user"]
        workflows = list(self._c.settings.workflows)
        wanted = request.query_params.get("workflow")
        if wanted is not None:
            if wanted not in workflows:
                return _error(404, f"No workflow '{wanted}' is configured.", code="not_found")
            workflows = [wanted]
        try:
            report = await user_usage(self._c.store, workflows, user)
        except StoreUnavailable as exc:
            return _error(503, str(exc), code="store_unavailable", type="api_error")
        return JSONResponse(report)


class Listener:
    """Serves an ASGI app on a port of its own inside the gateway's event loop
    (the admin API, /metrics). With several workers each binds the port with
    SO_REUSEPORT, and any of them may answer."""

    def __init__(self, app: Any, *, host: str, port: int, name: str) -> None:
        self._name = name
        self._socket = reuse_port_socket(host, port)
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the {self._name} listener stopped at start-up")
            await asyncio.sleep(0.01)
        logger.info("%s listening on %s", self._name, self._socket.getsockname())

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close()


class AdminServer(Listener):
    """Serves :class:`AdminAPI` on GATEWAY_ADMIN_HOST:GATEWAY_ADMIN_PORT; all
    workers act on the same store."""

    def __init__(self, components: Components) -> None:
        settings = components.settings
        super().__init__(
            AdminAPI(components),
            host=settings.admin_host,
            port=settings.admin_port,
            name="Admin API",
        )


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket several worker processes can share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()  # a port taken fails start-up; the socket must not outlive it
        raise
    sock.setblocking(False)
    return sock
