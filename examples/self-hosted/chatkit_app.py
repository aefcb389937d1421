"""A self-hosted ChatKit server that trusts only the identity the gateway sends.

Run behind chatkit-gateway (``examples/self-hosted/run`` does it all)::

    uvicorn --app-dir examples/self-hosted --factory chatkit_app:create_app --port 8001

The gateway admits a browser's request by its client secret, removes the
secret and any ``X-ChatKit-*`` header the browser sent, and adds who the
request is from: ``X-ChatKit-User`` (percent-encoded UTF-8),
``X-ChatKit-Session-Id``, ``X-ChatKit-Workflow-Id`` and, when the gateway has a
signing key, ``X-ChatKit-Assertion`` (an HS256 JWT over the same facts). The
request context here is built from those headers and nothing else; with
``CHATKIT_IDENTITY_SIGNING_KEY`` set it is built only from a valid assertion,
so a request that reached this server some other way is refused with 401.

Environment:

- ``CHATKIT_IDENTITY_SIGNING_KEY``: the gateway's ``GATEWAY_IDENTITY_SIGNING_KEY``.
  Unset: the headers are trusted, so this server must be reachable only through
  the gateway (bind it to 127.0.0.1 or a private network).
- ``CHATKIT_IDENTITY_ISSUER``: the assertion's expected ``iss`` (``chatkit-gateway``).
- ``CHATKIT_WORKFLOW_IDS``: comma-separated workflows this server serves; requests
  for others are refused. Unset: any workflow the gateway routes here.
- ``CHATKIT_MODEL_BASE_URL``: the gateway's ``/v1`` (``http://gateway:8080/v1``).
  Set, turns are answered by a model (``CHATKIT_MODEL``) through the Agents
  SDK, whose OpenAI client uses the turn's ``X-ChatKit-Model-Token`` as its
  key and the gateway as its base URL: this server holds no OpenAI key; the
  gateway counts every token to the turn's user and session.
- ``OPENAI_API_KEY``: answer with a model (``CHATKIT_MODEL``, default
  ``gpt-4.1-mini``) through the Agents SDK, calling OpenAI directly.
  Neither set: echo the user's message back
  word by word, ``CHATKIT_ECHO_DELAY_SECONDS`` apart (0.05), so the example runs
  with no key and no network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jwt
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.store import NotFoundError
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
    UserMessageTextContent,
)
from memory_store import MemoryStore, RequestContext
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

logger = logging.getLogger("chatkit_app")

USER_HEADER = "X-ChatKit-User"
SESSION_HEADER = "X-ChatKit-Session-Id"
WORKFLOW_HEADER = "X-ChatKit-Workflow-Id"
WORKFLOW_VERSION_HEADER = "X-ChatKit-Workflow-Version"
EXPIRES_AT_HEADER = "X-ChatKit-Expires-At"
ASSERTION_HEADER = "X-ChatKit-Assertion"
MODEL_TOKEN_HEADER = "X-ChatKit-Model-Token"  # noqa: S105 - a header name
# What every assertion must carry; PyJWT refuses a token missing any of them.
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "sid", "exp", "iat"]
# Tolerated clock difference between the gateway and this server, seconds.
_LEEWAY_SECONDS = 5


class IdentityError(Exception):
    """The request does not say, verifiably, who it is from (answered with 401)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class IdentityConfig:
    """How much to trust the identity headers."""

    signing_key: str | None = None
    issuer: str = "chatkit-gateway"
    workflow_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads from its environment, read once at start."""

    identity: IdentityConfig = field(default_factory=IdentityConfig)
    echo_delay_seconds: float = 0.05
    openai_api_key: str | None = None
    model_base_url: str | None = None
    model: str = "gpt-4.1-mini"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServerConfig:
        workflows = environ.get("CHATKIT_WORKFLOW_IDS", "")
        return cls(
            identity=IdentityConfig(
                signing_key=environ.get("CHATKIT_IDENTITY_SIGNING_KEY") or None,
                issuer=environ.get("CHATKIT_IDENTITY_ISSUER") or "chatkit-gateway",
                workflow_ids=frozenset(w.strip() for w in workflows.split(",") if w.strip()),
            ),
            echo_delay_seconds=float(environ.get("CHATKIT_ECHO_DELAY_SECONDS", "0.05")),
            openai_api_key=environ.get("OPENAI_API_KEY") or None,
            model_base_url=environ.get("CHATKIT_MODEL_BASE_URL") or None,
            model=environ.get("CHATKIT_MODEL") or "gpt-4.1-mini",
        )


def _single(headers: Headers, name: str) -> str | None:
    """The header's one value; two copies are ambiguous, so refused."""
    values = headers.getlist(name)
    if len(values) > 1:
        raise IdentityError("ambiguous_identity", f"More than one {name} header.")
    return values[0] if values else None


def _required(headers: Headers, name: str) -> str:
    value = _single(headers, name)
    if not value:
        raise IdentityError(
            "missing_identity",
            f"No {name} header: this server only answers requests that came "
            "through chatkit-gateway.",
        )
    return value


def context_from_headers(headers: Headers, config: IdentityConfig) -> RequestContext:
    """The request's context from the gateway's identity headers, or IdentityError."""
    try:
        user = urllib.parse.unquote(_required(headers, USER_HEADER), errors="strict")
    except UnicodeDecodeError as exc:
        raise IdentityError("invalid_identity", f"{USER_HEADER} is not UTF-8.") from exc
    session_id = _required(headers, SESSION_HEADER)
    workflow_id = _required(headers, WORKFLOW_HEADER)
    if config.workflow_ids and workflow_id not in config.workflow_ids:
        raise IdentityError("unknown_workflow", f"This server does not serve {workflow_id}.")
    expires_at = _single(headers, EXPIRES_AT_HEADER)
    if config.signing_key is not None:
        _verify_assertion(
            headers,
            config.signing_key,
            config.issuer,
            user=user,
            session_id=session_id,
            workflow=workflow_id,
        )
    return RequestContext(
        user=user,
        session_id=session_id,
        workflow_id=workflow_id,
        workflow_version=_single(headers, WORKFLOW_VERSION_HEADER),
        expires_at=int(expires_at) if expires_at and expires_at.isdigit() else None,
        model_token=_single(headers, MODEL_TOKEN_HEADER),
    )


def _verify_assertion(
    headers: Headers, key: str, issuer: str, *, user: str, session_id: str, workflow: str
) -> None:
    """Check the signed assertion and that the plain headers say the same thing.

    The audience is the workflow, so an assertion made for another workflow's
    server (which may share the key) is refused here.
    """
    token = _single(headers, ASSERTION_HEADER)
    if not token:
        raise IdentityError("missing_assertion", f"No {ASSERTION_HEADER} header.")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            audience=workflow,
            issuer=issuer,
            leeway=_LEEWAY_SECONDS,
            options={"require": _REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as exc:
        # PyJWT's message names the failed check (signature, exp, aud, ...), never the key.
        raise IdentityError("invalid_assertion", f"Invalid {ASSERTION_HEADER}: {exc}") from exc
    if claims["sub"] != user or claims["sid"] != session_id:
        raise IdentityError(
            "invalid_assertion", f"{ASSERTION_HEADER} does not match the identity headers."
        )


def _user_text(message: UserMessageItem | None) -> str:
    if message is None:
        return ""
    return " ".join(
        part.text for part in message.content if isinstance(part, UserMessageTextContent)
    )


class EchoChatKitServer(ChatKitServer[RequestContext]):
    """Answers with a model when given a key, else echoes the message word by word."""

    def __init__(self, store: MemoryStore, config: ServerConfig) -> None:
        super().__init__(store)
        self.config = config

    async def respond(
        self,
        thread: ThreadMetadata,
        input_user_message: UserMessageItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        if self.config.openai_api_key is not None or self.config.model_base_url is not None:
            async for event in self._model_answer(thread, context):
                yield event
            return
        words = f"{context.user} said: {_user_text(input_user_message)}".split()
        deltas = [words[0], *(f" {word}" for word in words[1:])]
        async for event in self.stream_text(
            thread, context, deltas, self.config.echo_delay_seconds
        ):
            yield event

    async def stream_text(
        self,
        thread: ThreadMetadata,
        context: RequestContext,
        deltas: list[str],
        delay: float,
    ) -> AsyncIterator[ThreadStreamEvent]:
        """One assistant message streamed as one ``text_delta`` event per delta, ``delay`` apart."""
        item = AssistantMessageItem(
            id=self.store.generate_item_id("message", thread, context),
            thread_id=thread.id,
            created_at=datetime.now(),
            content=[],
        )
        yield ThreadItemAddedEvent(item=item)
        yield ThreadItemUpdatedEvent(
            item_id=item.id,
            update=AssistantMessageContentPartAdded(
                content_index=0, content=AssistantMessageContent(text="")
            ),
        )
        for index, delta in enumerate(deltas):
            if index and delay > 0:
                await asyncio.sleep(delay)
            yield ThreadItemUpdatedEvent(
                item_id=item.id,
                update=AssistantMessageContentPartTextDelta(content_index=0, delta=delta),
            )
        content = AssistantMessageContent(text="".join(deltas))
        yield ThreadItemUpdatedEvent(
            item_id=item.id,
            update=AssistantMessageContentPartDone(content_index=0, content=content),
        )
        yield ThreadItemDoneEvent(item=item.model_copy(update={"content": [content]}))

    async def _model_answer(
        self, thread: ThreadMetadata, context: RequestContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        # Imported here: the echo mode never needs the Agents SDK's model stack.
        from agents import Agent, Model, OpenAIResponsesModel, Runner
        from chatkit.agents import AgentContext, simple_to_agent_input, stream_agent_response
        from openai import AsyncOpenAI

        model: str | Model = self.config.model
        if self.config.model_base_url is not None:
            if context.model_token is None:
                raise RuntimeError("No X-ChatKit-Model-Token: is GATEWAY_MODEL_API_KEY set?")
            # One client per turn: its key is the turn's own model token.
            client = AsyncOpenAI(api_key=context.model_token, base_url=self.config.model_base_url)
            model = OpenAIResponsesModel(model=self.config.model, openai_client=client)
        recent = await self.store.load_thread_items(thread.id, None, 20, "asc", context)
        agent = Agent[AgentContext[RequestContext]](
            name="Assistant",
            instructions="You are a helpful assistant. Answer briefly.",
            model=model,
        )
        agent_context = AgentContext(thread=thread, store=self.store, request_context=context)
        result = Runner.run_streamed(
            agent, await simple_to_agent_input(recent.data), context=agent_context
        )
        async for event in stream_agent_response(agent_context, result):
            yield event


def _error(status: int, code: str, message: str) -> JSONResponse:
    """An OpenAI-style error body, the shape the gateway's own errors have."""
    error_type = "authentication_error" if status == 401 else "invalid_request_error"
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(
    config: ServerConfig | None = None, server: EchoChatKitServer | None = None
) -> Starlette:
    """The ASGI app: ``POST /chatkit`` for ChatKit, ``GET /healthz`` for probes."""
    config = config or ServerConfig.from_env()
    chatkit = server or EchoChatKitServer(MemoryStore(), config)

    async def chatkit_endpoint(request: Request) -> Response:
        try:
            context = context_from_headers(request.headers, config.identity)
        except IdentityError as exc:
            logger.warning("refused a request without a valid identity: %s", exc.code)
            return _error(401, exc.code, exc.message)
        try:
            result = await chatkit.process(await request.body(), context)
        except ValidationError:
            return _error(400, "invalid_request", "Not a ChatKit request.")
        except NotFoundError as exc:
            return _error(404, "not_found", str(exc))
        if isinstance(result, StreamingResult):
            return StreamingResponse(result, media_type="text/event-stream")
        return Response(result.json, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/chatkit", chatkit_endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
