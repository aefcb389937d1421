"""The app's own backend: serves the page and mints ChatKit client secrets.

Run (``examples/self-hosted/run`` does it all)::

    uvicorn --app-dir examples/self-hosted --factory web_app:create_app --port 8000

``POST /api/chatkit/session`` is the code a hosted-ChatKit app already has:
the official ``openai`` SDK's ``client.beta.chatkit.sessions.create``. The
only change for self-hosted ChatKit is ``base_url``, which points at the
gateway; the gateway issues the session itself because the workflow is
configured in its ``GATEWAY_WORKFLOWS``.

Environment:

- ``EXAMPLE_GATEWAY_URL``: the gateway as the browser and this backend reach
  it (``http://127.0.0.1:8080``).
- ``OPENAI_API_KEY``: a key of the app in the gateway's ``GATEWAY_ISSUER_KEYS``.
- ``EXAMPLE_WORKFLOW_ID`` (``wf_self_hosted_example``), ``EXAMPLE_SESSION_SECONDS``
  (600), ``EXAMPLE_MAX_REQUESTS_PER_1_MINUTE`` (30: the gateway's policy
  counts model turns against it; reads have their own window),
  ``EXAMPLE_DOMAIN_KEY`` (ChatKit JS wants one; any placeholder works on
  localhost).

There is no login in this example: a cookie with a random name stands in for
the app's own user, so two browsers are two users. A real app passes its
signed-in user's id as ``user``; that string is what the ChatKit server sees.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger("web_app")

STATIC = Path(__file__).resolve().parent / "static"
USER_COOKIE = "example_user"


@dataclass(frozen=True)
class WebConfig:
    """Everything the backend reads from its environment, read once at start."""

    gateway_url: str = "http://127.0.0.1:8080"
    api_key: str = ""
    workflow_id: str = "wf_self_hosted_example"
    session_seconds: int = 600
    max_requests_per_1_minute: int = 30
    domain_key: str = "domain_pk_localhost_dev"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WebConfig:
        api_key = environ.get("OPENAI_API_KEY", "")
        if not api_key:
            raise SystemExit(
                "web_app: set OPENAI_API_KEY to a key listed in the gateway's "
                "GATEWAY_ISSUER_KEYS (examples/self-hosted/run makes one)."
            )
        return cls(
            gateway_url=environ.get("EXAMPLE_GATEWAY_URL", cls.gateway_url).rstrip("/"),
            api_key=api_key,
            workflow_id=environ.get("EXAMPLE_WORKFLOW_ID", cls.workflow_id),
            session_seconds=int(environ.get("EXAMPLE_SESSION_SECONDS", cls.session_seconds)),
            max_requests_per_1_minute=int(
                environ.get("EXAMPLE_MAX_REQUESTS_PER_1_MINUTE", cls.max_requests_per_1_minute)
            ),
            domain_key=environ.get("EXAMPLE_DOMAIN_KEY", cls.domain_key),
        )


def create_app(config: WebConfig | None = None) -> Starlette:
    """``GET /`` the page, ``POST /api/chatkit/session`` a fresh client secret."""
    config = config or WebConfig.from_env()
    # One client for the process: it keeps its connections to the gateway open.
    client = openai.AsyncOpenAI(api_key=config.api_key, base_url=f"{config.gateway_url}/v1")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.close()

    async def create_session(request: Request) -> Response:
        user = request.cookies.get(USER_COOKIE) or f"user_{secrets.token_hex(4)}"
        try:
            session = await client.beta.chatkit.sessions.create(
                user=user,
                workflow={"id": config.workflow_id},
                expires_after={"anchor": "created_at", "seconds": config.session_seconds},
                rate_limits={"max_requests_per_1_minute": config.max_requests_per_1_minute},
            )
        except openai.APIStatusError as exc:
            # The page needs to know it failed; it never needs the gateway's details.
            logger.warning("session create failed: HTTP %s", exc.status_code)
            return JSONResponse({"error": "session_unavailable"}, status_code=502)
        except openai.APIConnectionError:
            logger.warning("session create failed: the gateway is unreachable")
            return JSONResponse({"error": "session_unavailable"}, status_code=502)
        response = JSONResponse(
            {"client_secret": session.client_secret, "expires_at": session.expires_at},
            headers={"Cache-Control": "no-store"},
        )
        response.set_cookie(USER_COOKIE, user, httponly=True, samesite="strict")
        return response

    async def page_config(request: Request) -> Response:
        settings = {"url": f"{config.gateway_url}/chatkit", "domainKey": config.domain_key}
        return Response(
            f"window.CHATKIT_CONFIG = {json.dumps(settings)};\n",
            media_type="text/javascript",
        )

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def gateway_fetch(request: Request) -> Response:
        return FileResponse(STATIC / "gateway-fetch.js", media_type="text/javascript")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/config.js", page_config, methods=["GET"]),
            Route("/gateway-fetch.js", gateway_fetch, methods=["GET"]),
            Route("/api/chatkit/session", create_session, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
