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
import hashlib
import logging
import socket
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.apps import AppKeys, build_apps
from gateway.auth import FailedAttempts, bearer_secret, constant_time_equal
from gateway.errors import EXCEPTION_HANDLERS, AuthError, BadRequest, NotFound, error_response
from gateway.jsonbody import is_text, request_object
from gateway.model.report import user_usage
from gateway.registry import SESSION_ID
from gateway.store.base import IndexedSession
from gateway.users import MAX_BAN_SECONDS, app_view, ban, user_view

if TYPE_CHECKING:
    from gateway.app import Components

logger = logging.getLogger(__name__)


class AdminAPI:
    def __init__(self, components: Components) -> None:
        self._c = components
        token = components.settings.admin_token
        if token is None:
            raise ValueError("the admin API needs GATEWAY_ADMIN_TOKEN")
        # Compared as digests: equal length whatever is presented, so the
        # comparison's time says nothing about the token's length either.
        self._expected = hashlib.sha256(token.get_secret_value().encode()).digest()
        self._failures = FailedAttempts(
            components.metrics.auth_failures.labels("admin_token"), logger, "admin token"
        )
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
            ],
            exception_handlers=EXCEPTION_HANDLERS,
        )
        # An API path is exact: /admin/sessions/x/ is no route, not a redirect.
        self.app.router.redirect_slashes = False
        self._apps = AppKeys(build_apps(components.settings))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._authorized(scope["headers"]):
            self._failures.record()
            refusal = AuthError("A valid admin token is required.", code="invalid_admin_token")
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        try:
            given = bearer_secret(headers)
        except AuthError:
            return False
        return constant_time_equal(hashlib.sha256(given).digest(), self._expected)

    async def revoke(self, request: Request) -> Response:
        payload = request_object(await request.body())
        if "user" in payload:
            return await self._ban(payload)
        if "for_seconds" in payload:
            raise BadRequest("for_seconds goes with user.", param="for_seconds")
        session_id = payload.get("session_id")
        secret = payload.get("client_secret")
        if (session_id is None) == (secret is None):
            raise BadRequest("Give exactly one of session_id, client_secret or user.")
        secret_hash = None
        if secret is not None:
            if not isinstance(secret, str) or not secret or not is_text(secret):
                raise BadRequest("client_secret must be a non-empty string.", param="client_secret")
            secret_hash = self._c.hasher(secret.encode())
        elif not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise BadRequest("session_id is malformed.", param="session_id")
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
            raise BadRequest("A ban takes only user and for_seconds.")
        if not isinstance(user, str) or not user or not is_text(user):
            raise BadRequest("user must be a non-empty string.", param="user")
        if (
            not isinstance(for_seconds, int)
            or isinstance(for_seconds, bool)
            or not 0 <= for_seconds <= MAX_BAN_SECONDS
        ):
            raise BadRequest(
                f"for_seconds must be an integer from 0 to {MAX_BAN_SECONDS}.", param="for_seconds"
            )
        revoker = self._c.revoker

        async def revoke(session: IndexedSession) -> bool:
            result = await revoker.revoke(
                secret_hash=session.secret_hash, session_id=session.session_id, reason="ban"
            )
            return result is not None

        result = await ban(self._c.store, revoke, user, for_seconds=for_seconds)
        return JSONResponse(result.as_json())

    async def user(self, request: Request) -> Response:
        view = await user_view(self._c.store, request.path_params["user"])
        return JSONResponse(view)

    async def lift_ban(self, request: Request) -> Response:
        user = request.path_params["user"]
        lifted = await self._c.store.lift_ban(user)
        return JSONResponse({"user": user, "lifted": lifted})

    async def app_info(self, request: Request) -> Response:
        name = request.path_params["name"]
        app = self._apps.app(name)
        if app is None:
            raise NotFound(f"No app named '{name}' is configured.", code="not_found")
        stats = await self._c.store.app_stats(name)
        return JSONResponse(app_view(app, stats))

    async def session(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if not SESSION_ID.match(session_id):
            raise BadRequest("session_id is malformed.", param="session_id")
        info = await self._c.store.lookup(session_id)
        if info is None:
            raise NotFound(f"No session with id '{session_id}' is known.", code="not_found")
        return JSONResponse(dataclasses.asdict(info))

    async def revocations(self, request: Request) -> Response:
        try:
            tail = int(request.query_params.get("tail", "20"))
        except ValueError:
            raise BadRequest("tail must be an integer.", param="tail") from None
        if not 1 <= tail <= 10_000:
            raise BadRequest("tail must be between 1 and 10000.", param="tail")
        entries = await self._c.store.audit_tail(tail)
        return JSONResponse({"data": [dataclasses.asdict(e) for e in entries]})

    async def usage(self, request: Request) -> Response:
        """A user's model usage per workflow, window, session and model."""
        user = request.path_params["user"]
        workflows = list(self._c.settings.workflows)
        wanted = request.query_params.get("workflow")
        if wanted is not None:
            if wanted not in workflows:
                raise NotFound(f"No workflow '{wanted}' is configured.", code="not_found")
            workflows = [wanted]
        report = await user_usage(self._c.store, workflows, user)
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
            # The client port's protocol: its head limits and timeouts, and
            # requests it cannot parse refused in OpenAI's shape, not uvicorn's text.
            http="gateway.protocol:GatewayHttpProtocol",
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
