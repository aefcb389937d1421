"""The model routes: what a ChatKit server's model client calls.

``POST /v1/responses`` and ``POST /v1/chat/completions``, with a model token
as the bearer. The body is read whole (bounded by
``GATEWAY_MODEL_MAX_BODY_BYTES``): the gateway reads the model name and
whether the answer streams, and for a streamed Chat Completion it asks for
the usage chunk itself when the caller did not. Everything else about the
request is the caller's, forwarded as it came.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import BadRequest
from gateway.model.tokens import ModelTokens

if TYPE_CHECKING:
    from gateway.model.metering import Metering
from gateway.model.usage import CHAT, RESPONSES, Usage

PATHS = (RESPONSES, CHAT)


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """A model call as the gateway forwards it."""

    route: str
    model: str
    stream: bool
    body: bytes
    #: The gateway asked for the usage chunk: it is not the caller's to see.
    hide_usage: bool


def prepare(route: str, body: bytes) -> ModelRequest:
    """Read what the gateway needs of a model request; raise BadRequest."""
    try:
        document: Any = json.loads(body)
    except ValueError:
        raise BadRequest("The request body must be a JSON object.") from None
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("The request must name a model.", param="model")
    stream = document.get("stream") is True
    hide_usage = False
    if route == CHAT and stream:
        options = document.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("stream_options must be an object.", param="stream_options")
        if options is None or options.get("include_usage") is not True:
            # Usage comes only with this option; without it the gateway could
            # not count the call. Re-encoded only in this case: otherwise the
            # bytes go as the caller sent them.
            document["stream_options"] = {**(options or {}), "include_usage": True}
            body = json.dumps(document, separators=(",", ":")).encode()
            hide_usage = True
    return ModelRequest(route, model, stream, body, hide_usage)


_MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")


class ModelLabels:
    """The ``model`` label of the token metric: the caller names the model,
    so the names it may add are capped (then ``other``)."""

    def __init__(self, limit: int = 64) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, model: str) -> str:
        if model in self._seen:
            return model
        if len(self._seen) >= self._limit or not _MODEL_NAME.match(model):
            return "other"
        self._seen.add(model)
        return model


def token_kinds(usage: Usage) -> tuple[tuple[str, int], ...]:
    """The metric's kinds, which add up to the call's total tokens."""
    return (
        ("input", usage.uncached_input_tokens),
        ("cached_input", usage.cached_input_tokens),
        ("output", usage.output_tokens),
    )


_REPLACED_HEADERS = frozenset({"authorization", "accept-encoding", "content-length"})


class ModelUpstream:
    """Where model calls go and the key they carry, which nothing prints:
    no repr, no log line and no error message holds it."""

    __slots__ = ("_authorization", "max_body", "metering", "origin", "tokens")

    def __init__(
        self,
        *,
        origin: str,
        api_key: str,
        tokens: ModelTokens,
        metering: Metering,
        max_body: int,
    ) -> None:
        self.origin = origin
        self._authorization = "Bearer " + api_key
        self.tokens = tokens
        self.metering = metering
        self.max_body = max_body

    def __repr__(self) -> str:
        return f"ModelUpstream({self.origin!r})"

    def request_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The forwarded headers with the real key, asking for an answer the
        gateway can read (uncompressed: the usage is in it). Content-Length is
        the HTTP client's to set: the gateway may have re-encoded the body."""
        out = [(n, v) for n, v in headers if n not in _REPLACED_HEADERS]
        out.append(("authorization", self._authorization))
        out.append(("accept-encoding", "identity"))
        return out
