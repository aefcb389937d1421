"""Reading JSON that arrives from outside: request bodies, the upstream's answers.

``json.loads`` fails in three ways, and only two of them are ``ValueError``:
bad syntax (``JSONDecodeError``), bytes that are not UTF-8
(``UnicodeDecodeError``), and nesting deeper than the interpreter's stack
(``RecursionError``, about a thousand ``[`` suffice). A body is the client's
to choose, so every one of them is the client's mistake, answered 400
``invalid_json``, never a 500 with a traceback.

A JSON document may also repeat a key (RFC 8259 4 leaves the meaning open):
one parser keeps the first, another the last. The gateway decides with what it
reads (which workflow a create is for, which secret to revoke), so a document
it could read two ways is refused rather than guessed at.

Strings may hold lone surrogates (``"\\ud800"``): valid JSON, but not text
that can be encoded. :func:`is_text` is how a field that will be hashed,
stored or sent in a header is checked.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import BadRequest


class Unreadable(ValueError):
    """The bytes are not one JSON document the gateway can read unambiguously."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise Unreadable("a key appears twice in one object")
    return document


def loads(data: bytes) -> Any:
    """``json.loads`` whose every failure is :class:`Unreadable` (a ``ValueError``)."""
    try:
        # Decoded here, strictly: json.loads would take UTF-16 and UTF-8 with
        # surrogates ("surrogatepass"), which RFC 8259 8.1 leaves out.
        return json.loads(data.decode(), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise Unreadable("nested too deeply") from None
    except Unreadable:
        raise
    except UnicodeDecodeError:
        raise Unreadable("not UTF-8") from None
    except ValueError as exc:  # JSONDecodeError: says where, never quotes the text
        raise Unreadable(str(exc)) from None


def request_json(body: bytes) -> Any:
    """A request body's JSON document; :class:`BadRequest` ``invalid_json`` if unreadable."""
    try:
        return loads(body)
    except Unreadable:
        raise BadRequest(
            "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None


def request_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; :class:`BadRequest` otherwise."""
    document = request_json(body)
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return document


def is_text(value: str) -> bool:
    """Whether ``value`` is well-formed Unicode (no lone surrogate), so it encodes."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
