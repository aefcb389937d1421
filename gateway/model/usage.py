"""The usage a model call reports, read from the model's own answer.

- Responses API: the ``response.usage`` of the stream's last event,
  ``response.completed``, ``response.incomplete`` or ``response.failed``;
  the body's ``usage`` when not streamed.
- Chat Completions: the usage chunk (empty ``choices``) that
  ``stream_options.include_usage`` adds before ``[DONE]``; the body's
  ``usage`` when not streamed. The gateway asks for that chunk itself when
  the caller did not, and then keeps it from the caller.

Input, cached input and output are kept apart: cached input is part of
``input_tokens`` as the API reports it, reasoning part of output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.model.sse import EventSplitter, event_data

RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
#: The Responses stream events that carry the call's usage: its last.
_FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
_FINAL_MARKS = tuple(t.encode() for t in _FINAL_TYPES)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int  # as reported: cached input included
    cached_input_tokens: int
    output_tokens: int  # reasoning included

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return self.input_tokens - self.cached_input_tokens


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def usage_from(route: str, usage: Any) -> Usage | None:
    """A ``usage`` object of either API, or None if it is not one."""
    if not isinstance(usage, dict):
        return None
    if route == RESPONSES:
        names = ("input_tokens", "input_tokens_details", "output_tokens")
    else:
        names = ("prompt_tokens", "prompt_tokens_details", "completion_tokens")
    input_tokens, output_tokens = _count(usage.get(names[0])), _count(usage.get(names[2]))
    if input_tokens is None or output_tokens is None:
        return None
    details = usage.get(names[1])
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(input_tokens, min(cached or 0, input_tokens), output_tokens)


def body_usage(route: str, body: bytes) -> Usage | None:
    """The usage of a whole (not streamed) answer."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return usage_from(route, document.get("usage")) if isinstance(document, dict) else None


class StreamMeter:
    """Watches a model's event stream go by and finds its usage.

    :meth:`feed` returns what to pass on. Everything passes unchanged and at
    once, except with ``hide_usage`` (a Chat Completions caller that did not
    ask for usage): then whole events pass, without the usage chunk, and a
    partial event waits for its end.
    """

    __slots__ = ("_hide", "_route", "_splitter", "usage")

    def __init__(self, route: str, *, hide_usage: bool = False) -> None:
        self._route = route
        self._hide = hide_usage and route == CHAT
        self._splitter = EventSplitter()
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        events = self._splitter.feed(chunk)
        if not self._hide:
            for event in events:
                self._read(event)
            return chunk
        return b"".join(event for event in events if not self._read(event))

    def rest(self) -> bytes:
        """At the end of the stream: what is left to pass on (a last event
        that ended in a lone CR, or one cut short, passed as it came)."""
        events = self._splitter.close()
        if not self._hide:
            for event in events:
                self._read(event)
            return b""
        kept = b"".join(event for event in events if not self._read(event))
        return kept + self._splitter.rest()

    def _read(self, event: bytes) -> bool:
        """Record the usage the event carries; True if it is the usage chunk."""
        # Only the one event with usage is parsed: every other one is passed
        # over by substring tests (a Responses stream's first events carry
        # "usage": null inside a whole response object, so "usage" alone
        # would parse them too).
        if b'"usage"' not in event:
            return False
        if self._route == RESPONSES and not any(t in event for t in _FINAL_MARKS):
            return False
        if self._route == CHAT and b'"choices":[]' not in event and b'"choices": []' not in event:
            return False
        data = event_data(event)
        if data is None:
            return False
        try:
            document = json.loads(data)
        except ValueError:
            return False
        if not isinstance(document, dict):
            return False
        if self._route == RESPONSES:
            response = document.get("response")
            if document.get("type") in _FINAL_TYPES and isinstance(response, dict):
                self.usage = usage_from(RESPONSES, response.get("usage")) or self.usage
            return False
        usage = usage_from(CHAT, document.get("usage"))
        if usage is None:
            return False
        self.usage = usage
        return document.get("choices") == []
