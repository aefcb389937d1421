"""The gateway's exceptions, and how each becomes an OpenAI-style response.

    GatewayError                    any error the gateway answers itself
    ├── BadRequest (400)            malformed target, path, header or body
    ├── AuthError (401)             missing, malformed, unknown, revoked, expired secret
    │   └── InvalidApiKey (401)     session API call without a valid issuer key
    ├── PermissionDenied (403)      an app's key used beyond its scope; a banned user
    ├── NotFound (404)              no route: never forwarded
    │   └── SessionNotFound (404)   cancel of a session id the gateway issued but forgot
    ├── MethodNotAllowed (405)
    ├── RequestTimeout (408)        the client was too slow sending its request
    ├── PayloadTooLarge (413)
    ├── TargetTooLong (414)
    ├── HeadersTooLarge (431)
    ├── CodingNotImplemented (501)  a transfer coding other than chunked
    ├── Overloaded (503)            connection caps reached: try another replica
    ├── RateLimited (429)           carries the rate-limit headers
    ├── UpstreamError
    │   ├── UpstreamUnavailable (502)
    │   └── UpstreamTimeout (504)
    └── StoreUnavailable (503)      the shared store did not answer: fail closed
        └── NotReplicated (503)     a revocation the master took, too few replicas

    ConfigError                     bad settings: start-up stops, exit status 2

    Signals between layers, never answered as such:
    StreamAborted                   cut a response that already started (the
                                    server drops the connection, so the client
                                    sees a truncated answer, not a clean end)
    ClientDisconnected              the client went away during its upload

aiohttp's exceptions become UpstreamError in exactly one place,
``gateway.upstream.translate_errors``; redis-py's become StoreUnavailable in
the Redis store.

Every response the gateway makes itself has the body
``{"error": {"message", "type", "param", "code"}}`` that the official SDKs
parse; upstream responses pass through untouched. The starlette apps that
serve the gateway's own endpoints (health, metrics, admin) answer through
``EXCEPTION_HANDLERS``, their own 404 and 405 included.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from email.utils import formatdate
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from gateway.types import Headers


class ConfigError(Exception):
    """A setting is invalid; the message names the variable."""


class StreamAborted(Exception):
    """Raised after the response started to make the server drop the connection,
    so the client sees a truncated response rather than a clean end."""


class ClientDisconnected(Exception):
    """The client went away; raised into the upstream request body to abort it.

    Raising (rather than ending the body early) matters: a short body under a
    forwarded Content-Length would leave the pooled connection waiting for
    bytes, and the next request on it would be read as the rest of this body.
    """


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    #: The issuer app a session call was refused for, for the access log.
    app: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = list(headers)

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PermissionDenied(GatewayError):
    """The caller is known but may not do this: the app's key is not scoped to
    the workflow, or the user is banned. Not retried by the official SDKs."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code: str | None = "unknown_route"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class TargetTooLong(GatewayError):
    status = 414
    type = "invalid_request_error"
    code = "request_target_too_long"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class CodingNotImplemented(GatewayError):
    status = 501
    type = "invalid_request_error"
    code = "transfer_coding_not_implemented"


class Overloaded(GatewayError):
    status = 503
    type = "api_error"
    code = "overloaded"


class AuthError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_client_secret"


class InvalidApiKey(AuthError):
    """The session API's key check, worded as OpenAI's API words it."""

    code = "invalid_api_key"


class SessionNotFound(NotFound):
    code = None  # OpenAI's own not-found body for sessions carries no code

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Chatkit Session with id '{session_id}' not found.")


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"  # not "requests": this is the gateway's limit
    code = "rate_limit_exceeded"
    #: The refused session's workflow, when known: its policy says how the
    #: refusal is answered.
    workflow_id = ""


class UpstreamError(GatewayError):
    type = "api_error"


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class StoreUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "store_unavailable"


class NotReplicated(StoreUnavailable):
    """The master holds the revocation, but fewer replicas than required
    acknowledged it: it would not survive a failover yet, so it is not stored."""


# Rejections are the answer to floods (a bad or over-limit secret, repeated):
# the same few bodies, over and over, so they are encoded once.
@functools.lru_cache(maxsize=256)
def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


def http_date() -> bytes:
    """The Date header's value, formatted once per second."""
    return _date_at(int(time.time()))


@functools.lru_cache(maxsize=1)
def _date_at(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode()


def error_response_headers(exc: GatewayError, body: bytes) -> Headers:
    return [
        (b"date", http_date()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *exc.headers,
    ]


# -- the gateway's own endpoints (starlette apps: health, metrics, admin) -------------

_BY_STATUS: dict[int, type[GatewayError]] = {
    400: BadRequest,
    401: AuthError,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: PayloadTooLarge,
    414: TargetTooLong,
    431: HeadersTooLarge,
    503: Overloaded,
}


def error_response(exc: GatewayError) -> Response:
    """A starlette response carrying the error's status, body and headers."""
    return Response(
        exc.body(),
        status_code=exc.status,
        media_type="application/json",
        headers={name.decode("latin-1"): value.decode("latin-1") for name, value in exc.headers},
    )


def as_gateway_error(exc: Exception, *, method: str) -> GatewayError:
    """What an exception in one of the gateway's own endpoints answers.

    starlette's own refusals (no route, wrong method) keep their status and
    headers (``Allow``); anything else that is not a GatewayError is a bug,
    answered 500 here and logged with its traceback by starlette.
    """
    if isinstance(exc, GatewayError):
        return exc
    if not isinstance(exc, HTTPException):
        return GatewayError("The gateway failed to answer.", code="internal_error")
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    if exc.status_code == 404:
        return NotFound("Unknown route.", headers=headers)
    if exc.status_code == 405:
        return MethodNotAllowed(f"Method {method} is not allowed on this route.", headers=headers)
    cls = _BY_STATUS.get(exc.status_code)
    if cls is not None:
        return cls(exc.detail, headers=headers)
    error = GatewayError(exc.detail, headers=headers)
    error.status = exc.status_code
    return error


async def _answer(request: Request, exc: Exception) -> Response:
    return error_response(as_gateway_error(exc, method=request.method))


#: ``exception_handlers`` for every starlette app the gateway serves.
EXCEPTION_HANDLERS: Mapping[Any, ExceptionHandler] = {
    GatewayError: _answer,
    HTTPException: _answer,
    Exception: _answer,
}
