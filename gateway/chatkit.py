"""What a ChatKit request is, read from its envelope. Pure functions.

A self-hosted ChatKit server takes every call on one ``POST /chatkit`` whose
JSON body (the envelope) says what it is: ``{"type", "params", "metadata"}``.
What a request costs depends on that type (a turn runs the model, a read
only the server's store), so admission sorts requests into classes before
counting them. The body is parsed once here and forwarded byte for byte.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
from typing import Any, NamedTuple

from gateway.errors import BadRequest, PayloadTooLarge

logger = logging.getLogger(__name__)
_decode = json.JSONDecoder().decode


class RequestClass(enum.StrEnum):
    """What a ChatKit request costs, coarsely; the names are policy vocabulary."""

    TURN = "turn"  # runs the agent (the model)
    READ = "read"  # the server's store only
    WRITE = "write"  # the server's store (or app code, for a sync custom action)
    UPLOAD = "upload"  # an attachment: its record, then its bytes
    TRANSCRIBE = "transcribe"  # speech to text of base64 audio


#: ChatKit's request types by class, as chatkit-python's server dispatches them.
TYPES: dict[str, RequestClass] = {
    "threads.create": RequestClass.TURN,
    "threads.add_user_message": RequestClass.TURN,
    "threads.retry_after_item": RequestClass.TURN,
    "threads.add_client_tool_output": RequestClass.TURN,
    "threads.add_structured_input": RequestClass.TURN,
    "threads.custom_action": RequestClass.TURN,
    "threads.get_by_id": RequestClass.READ,
    "threads.list": RequestClass.READ,
    "items.list": RequestClass.READ,
    "threads.update": RequestClass.WRITE,
    "threads.delete": RequestClass.WRITE,
    "items.feedback": RequestClass.WRITE,
    "attachments.delete": RequestClass.WRITE,
    "threads.sync_custom_action": RequestClass.WRITE,
    "attachments.create": RequestClass.UPLOAD,
    "input.transcribe": RequestClass.TRANSCRIBE,
}
TRANSCRIBE_TYPE = "input.transcribe"
#: Unknown types logged so far (bounded: a client may send any string).
_UNKNOWN_SEEN: set[str] = set()
_UNKNOWN_LOGGED_MAX = 256


def classify(request_type: str) -> RequestClass:
    """The class of a request type. A type this gateway does not know (a newer
    ChatKit) counts as a turn, the dearest class: an unknown type must not be
    a way around the turn limit."""
    known = TYPES.get(request_type)
    if known is not None:
        return known
    if request_type not in _UNKNOWN_SEEN and len(_UNKNOWN_SEEN) < _UNKNOWN_LOGGED_MAX:
        _UNKNOWN_SEEN.add(request_type)
        logger.warning("Unknown ChatKit request type %r: counted as a turn", request_type[:64])
    return RequestClass.TURN


class Envelope(NamedTuple):
    """The parts of a ChatKit envelope admission looks at."""

    type: str
    cls: RequestClass
    params: dict[str, Any]

    @property
    def model(self) -> str | None:
        """``params.input.inference_options.model``, the model the client asks for."""
        # Spelled out rather than walked generically: it runs for every turn.
        given = self.params.get("input")
        options = given.get("inference_options") if isinstance(given, dict) else None
        value = options.get("model") if isinstance(options, dict) else None
        return value if isinstance(value, str) else None

    @property
    def declared_size(self) -> int | float | None:
        """``params.size`` of an ``attachments.create`` (the client's claim)."""
        value = self.params.get("size")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return value


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_json")


def parse_envelope(body: bytes, *, max_bytes: int, max_transcribe_bytes: int) -> Envelope:
    """Parse and classify a ``POST /chatkit`` body, or raise the 400/413 refusing it.

    ``body`` has been read up to the larger of the two bounds; which one
    applies is known only once the type is.
    """
    try:
        # Strict UTF-8, as gateway.jsonbody reads every other body: json.loads
        # of bytes would also take UTF-16 and surrogates, and costs a Python
        # call more per request.
        document = _decode(body.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _invalid("The request body is not valid JSON.") from exc
    if not isinstance(document, dict):
        raise _invalid("The request body must be a JSON object (a ChatKit envelope).")
    request_type = document.get("type")
    if not isinstance(request_type, str) or not request_type:
        raise BadRequest(
            "The ChatKit envelope needs a string 'type'.", param="type", code="invalid_json"
        )
    bound = max_transcribe_bytes if request_type == TRANSCRIBE_TYPE else max_bytes
    if len(body) > bound:
        raise PayloadTooLarge(f"A '{request_type[:64]}' request body is at most {bound} bytes.")
    params = document.get("params")
    return Envelope(
        request_type, classify(request_type), params if isinstance(params, dict) else {}
    )


_TRANSCRIBE_FIRST = re.compile(rb'\s*\{\s*"type"\s*:\s*"input\.transcribe"')


def may_be_transcribe(head: bytes) -> bool:
    """Whether a body's first bytes open an ``input.transcribe`` envelope.

    Only such a body may be read past the ordinary envelope bound, before
    admission; ChatKit clients write ``type`` first. A transcription whose
    ``type`` comes later is held to the ordinary bound (a 413), never read
    further: the safe side for a body held before its secret is checked.
    """
    return _TRANSCRIBE_FIRST.match(head) is not None


def needs(envelope: Envelope) -> tuple[str, int]:
    """What of the session's chatkit_configuration a request needs, and the
    size it declares (see :class:`gateway.store.base.AdmitRequest`)."""
    if envelope.type == "threads.list":
        return "history", 0
    if envelope.type == "attachments.create":
        size = envelope.declared_size
        if size is None or size <= 0:
            return "attach", 0
        if not math.isfinite(size):  # json reads Infinity and NaN
            return "attach", 2**53
        return "attach", min(math.ceil(size), 2**53)
    return "", 0


def requested_model(envelope: Envelope) -> str | None:
    """The model a turn names, which the session's policy may refuse; None for
    other classes and for a turn naming none (it gets the server's default,
    which the operator chose)."""
    if envelope.cls is not RequestClass.TURN:
        return None
    return envelope.model


def error_event(message: str) -> bytes:
    """One ChatKit stream ``error`` event, as a ChatKit server would send it:
    the widget shows ``message`` in the conversation and offers to retry."""
    event = {"type": "error", "code": "custom", "message": message, "allow_retry": True}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
